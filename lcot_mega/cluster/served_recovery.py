"""Disaggregated mode's weight group kept equal to the live rollout servers, so that a server which dies or hangs
is restarted and re-synced instead of failing every later weight sync.

Actor rank 0 broadcasts weights to the servers over one collective group (SGLang's `init_weights_update_group`)
whose membership is fixed when it is formed: a dead member blocks every broadcast. `DisaggregatedActorGroup` wraps
the Ray actor group and, under the pool's weight lock (so a sync and a recovery never overlap):
- before each sync, checks the members' health (a server that died after the rollout is not seen by the pool),
  takes failed ones out of the pool (which starts their recovery) and re-forms the group with the live servers;
- as the pool's `resync` callback, re-forms the group with the live servers plus the replacement and broadcasts
  the current weights to all of them at the pool's version (the survivors receive what they already hold).
With no live server at all, a sync only records its version; the first replacement is brought to it.
slime's fault tolerance re-creates its rollout engines' weight group the same way (`--use-fault-tolerance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lcot_mega.rollout.protocol import RolloutEngine


class UnhealthyServerError(ConnectionError):
    """A rollout server failed its health check before a weight sync (an engine failure to the pool)."""


class DisaggregatedActorGroup:
    """The actor group of disaggregated mode with its weight group tracking the live servers (module docstring).
    Every other call goes straight to the wrapped group."""

    def __init__(self, group: Any, servers: Any, backend: str) -> None:
        """`group`: a `RayActorGroup`; `servers`: the `ServedEngineGroup` (URLs, API key, clients); `backend` of
        the weight group. Call `attach(pool)` before the first sync."""
        self.group, self.servers, self.backend = group, servers, backend
        self.pool: Any = None
        self.members: tuple[str, ...] = ()
        """URLs of the servers in rank 0's weight group now."""
        self.generation = 0
        """Weight groups formed so far (the first is 0); each re-formed group gets a fresh name."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)

    def attach(self, pool: Any) -> None:
        """Form the first weight group with every server; `pool` is the driver's `EnginePool` over them."""
        from lcot_mega.cluster.ray_group import ServedEngines

        self.pool = pool
        self.members = tuple(self.servers.wait_ready())
        self.group.attach(ServedEngines(self.members, self.servers.api_key, self.backend))

    def sync_weights(self, version: int) -> dict[str, float]:
        """Broadcast the current weights to the live servers as `version` (see the module docstring)."""
        with self.pool.loading_elsewhere(version):
            self._take_out_unhealthy()
            live = self.pool.live()
            if not live:  # every server is being restarted: the first replacement is resynced to `version`
                return {"sync/servers": 0.0}
            self._retarget(live)
            return self.group.sync_weights(version) | {"sync/servers": float(len(live))}

    def resync(self, i: int, engine: RolloutEngine) -> None:
        """`EnginePool` callback (under its weight lock): bring replacement `i` to the pool's version."""
        live = sorted(set(self.pool.live()) | {i})
        self._retarget(live)
        self.group.sync_weights(self.pool.version)

    def _retarget(self, indices: Sequence[int]) -> None:
        from lcot_mega.cluster.ray_group import ServedEngines

        urls = tuple(self.servers.wait_ready()[i] for i in indices)
        if urls == self.members:
            return
        self.generation += 1
        self.group.retarget(ServedEngines(urls, self.servers.api_key, self.backend), self.generation)
        self.members = urls

    def _take_out_unhealthy(self) -> None:
        live = self.pool.live()
        if not live:
            return
        with ThreadPoolExecutor(len(live)) as ex:  # a hung server takes the health timeout: check all at once
            healthy = list(ex.map(lambda i: self.servers.client(i).health(), live))
        for i, ok in zip(live, healthy, strict=True):
            if not ok:
                self.pool.mark_dead(i, UnhealthyServerError(f"rollout server {i} failed its health check"))
