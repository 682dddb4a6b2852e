"""Served rollout engines kept alive and in step with the actor: one keeper for every mode that has them.

Local served mode (`rollout.served`, or SGLang in `cluster.mode: local`) runs `cluster.num_engines` server
processes under a `ServerSupervisor`; disaggregated mode runs them as Ray actors in their own bundles
(`ServedEngineGroup`). Either way the driver's engine is an `EnginePool` over HTTP clients and `ServedEngines`
is their keeper:
- a server that dies or hangs (the pool sees it fail) is restarted and brought to the pool's weight version
  before it takes requests again (the pool's `on_dead` and `resync` callbacks);
- a recovery holds the pool's weight lock, then reads the weights under the actor's lock; a sync never holds
  the actor's lock while it waits for the pool's, so neither waits on the other forever;
- how the weights travel is the mode's `WeightRoute`: `ThroughPool` (local: the actor is one rank in this
  process and pushes by `update_weights_from_tensor`), or `BroadcastToLive` (disaggregated: actor rank 0
  broadcasts over a weight group re-formed whenever the live servers change, as slime's fault tolerance does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from lcot_mega.rollout.protocol import RolloutEngine

if TYPE_CHECKING:
    from lcot_mega.cluster.actor_group import ActorGroup
    from lcot_mega.rollout.pool import EnginePool


class UnhealthyServerError(ConnectionError):
    """A rollout server failed its health check before a weight sync (an engine failure to the pool)."""


class BrokenBroadcastError(ConnectionError):
    """A rollout server was in a weight broadcast that lost a member: it holds part of the new weights and waits in
    a collective that will never complete, so it is restarted (an engine failure to the pool)."""


class WeightRoute(Protocol):
    """How the actor's weights reach the served engines. `resync` runs under the pool's weight lock."""

    def sync(self, actor: ActorGroup, pool: EnginePool, version: int) -> dict[str, float]:
        """Load the current weights into every live server as `version`; sync metrics."""
        ...

    def resync(self, actor: ActorGroup, pool: EnginePool, i: int, engine: RolloutEngine) -> None:
        """Bring replacement server `i` (client `engine`) to the pool's version."""
        ...


class ServedEngines:
    """The served engines' keeper (see the module docstring). `servers` is the mode's server set (its
    `processes` are what fault drills signal); `restart(i)` kills and restarts server `i` and returns a client
    of the new one. Call `start_pool`, then set `actor` once it exists (until then a replacement keeps the
    model's own weights, which are the actor's initial ones)."""

    def __init__(self, servers: Any, restart: Callable[[int], RolloutEngine], route: WeightRoute | None) -> None:
        self.servers, self.restart, self.route = servers, restart, route
        self.actor: ActorGroup | None = None
        self.pool: EnginePool | None = None

    def start_pool(self, clients: Sequence[RolloutEngine], recovery_wait_s: float) -> EnginePool:
        from lcot_mega.rollout.pool import EnginePool

        self.pool = EnginePool(clients, on_dead=self._on_dead, resync=self._resync, recovery_wait_s=recovery_wait_s)
        return self.pool

    def sync(self, version: int) -> dict[str, float]:
        """Load the actor's current weights into the live servers as `version`."""
        if self.actor is None or self.route is None:
            raise RuntimeError("ServedEngines.sync needs an actor and a weight route")
        return self.route.sync(self.actor, self.pool, version)

    def metrics(self) -> dict[str, float]:
        """`rollout/engine_failures` (servers found dead or hung), `rollout/engine_failovers` (requests re-sent),
        `rollout/engine_restarts` (restarted and re-synced servers that rejoined) since the last call, and
        `rollout/engines_live` now."""
        counts = self.pool.take_counters()
        return {
            "rollout/engine_failures": float(counts["failures"]),
            "rollout/engine_failovers": float(counts["failovers"]),
            "rollout/engine_restarts": float(counts["restarts"]),
            "rollout/engines_live": float(len(self.pool.live())),
        }

    def _on_dead(self, i: int) -> RolloutEngine:
        print(f"lcot-mega: rollout server {i} failed ({self.pool.last_errors[i]!r}); restarting it", flush=True)
        return self.restart(i)

    def _resync(self, i: int, engine: RolloutEngine) -> None:
        if self.actor is not None and self.route is not None:
            self.route.resync(self.actor, self.pool, i, engine)
        print(f"lcot-mega: rollout server {i} restarted with weight version {self.pool.version}", flush=True)

    def shutdown(self) -> None:
        """The pool first (no recovery starts once teardown began), then the servers."""
        if self.pool is not None:
            self.pool.shutdown()
        self.servers.shutdown()


class ThroughPool:
    """Local served mode: the actor's one rank loads the pool like any engine (the pool sends each bucket to every
    live server, under its weight lock); a replacement gets the weights pushed to it alone.

    The sync runs without the actor's lock: the step's thread is the only one that changes the weights, and the
    sync runs on it between updates. Holding the lock would make a sync wait for the pool while holding what a
    recovery (pool lock held) waits for; and a sync while every server restarts must let a replacement join."""

    def sync(self, actor: ActorGroup, pool: EnginePool, version: int) -> dict[str, float]:
        return actor.ranks.call("sync_weights", version)

    def resync(self, actor: ActorGroup, pool: EnginePool, i: int, engine: RolloutEngine) -> None:
        actor.push_weights(engine, pool.version)


class BroadcastToLive:
    """Disaggregated mode: actor rank 0 broadcasts to the servers over one collective group whose membership is
    fixed when it is formed, so a dead member would block every broadcast. Before each sync the members' health
    is checked (a server that died after the rollout is not yet known to the pool) and failed ones are handed to
    the pool's recovery; the group is re-formed under a fresh name whenever the live set changes. A replacement
    is brought in by a broadcast to the live servers and it (the survivors receive what they hold).

    A server that dies during the broadcast itself (after its health check) breaks the group: the others hold part
    of the new weights and wait in a collective that rank 0 gave up (`BroadcastSync` stops waiting for them), and
    with NCCL a communicator that saw an error cannot be trusted again. So every member of that group is restarted
    and rejoins at the new version, like any replacement; the run goes on. A failed sync with every member healthy
    (a probe mismatch, a refused tensor) still raises."""

    def __init__(self, ranks: Any, servers: Any, backend: str) -> None:
        """`ranks`: the actor's `RayRanks` (rank 0 forms the groups); `servers`: the `ServedEngineGroup`."""
        self.ranks, self.servers, self.backend = ranks, servers, backend
        self.members: tuple[str, ...] = ()
        """URLs of the servers in rank 0's weight group now."""
        self.generation = 0
        """Weight groups formed so far (the first is 0); each re-formed group gets a fresh name."""

    def attach(self) -> None:
        """Form the first weight group with every server."""
        from lcot_mega.cluster.ray_group import ServedTargets as Targets

        self.members = tuple(self.servers.wait_ready())
        self.ranks.attach(Targets(self.members, self.servers.api_key, self.backend))

    def sync(self, actor: ActorGroup, pool: EnginePool, version: int) -> dict[str, float]:
        """Under the pool's weight lock (then the actor's, as in a recovery): a replacement joins before or after
        the broadcast, never during it."""
        from lcot_mega.weight_sync.push import WeightSyncError

        with pool.loading_elsewhere(version):
            self._take_out_unhealthy(pool)
            live = pool.live()
            if not live:  # every server is being restarted: the first replacement is resynced to `version`
                return {"sync/servers": 0.0}
            self._retarget(live)
            try:
                return actor.sync_weights(version) | {"sync/servers": float(len(live))}
            except WeightSyncError as e:  # (Ray's task error is an instance of its cause)
                lost = self._take_out_unhealthy(pool)
                if not lost:
                    raise
                self._restart_broken_group(pool, live, lost, version, e)
                return {"sync/servers": 0.0, "sync/servers_restarted": float(len(live))}

    def resync(self, actor: ActorGroup, pool: EnginePool, i: int, engine: RolloutEngine) -> None:
        self._retarget(sorted(set(pool.live()) | {i}))
        actor.sync_weights(pool.version)

    def _retarget(self, indices: Sequence[int]) -> None:
        from lcot_mega.cluster.ray_group import ServedTargets as Targets

        urls = tuple(self.servers.wait_ready()[i] for i in indices)
        if urls == self.members:
            return
        self.generation += 1
        self.ranks.retarget(Targets(urls, self.servers.api_key, self.backend), self.generation)
        self.members = urls

    def _take_out_unhealthy(self, pool: EnginePool) -> list[int]:
        """Live servers that fail their health check are handed to the pool's recovery; their indices."""
        live = pool.live()
        if not live:
            return []
        with ThreadPoolExecutor(len(live)) as ex:  # a hung server takes the health timeout: check all at once
            healthy = list(ex.map(lambda i: self.servers.client(i).health(), live))
        lost = [i for i, ok in zip(live, healthy, strict=True) if not ok]
        for i in lost:
            pool.mark_dead(i, UnhealthyServerError(f"rollout server {i} failed its health check"))
        return lost

    def _restart_broken_group(
        self, pool: EnginePool, members: Sequence[int], lost: Sequence[int], version: int, error: Exception
    ) -> None:
        """The survivors of a broadcast that lost `lost` go to the pool's recovery too (see the class docstring)."""
        survivors = [i for i in members if i not in lost]
        cause = str(error).strip().splitlines()[-1][:300]  # a Ray task error ends with its cause
        print(
            f"lcot-mega: weight sync to version {version} lost rollout server(s) {list(lost)} in the middle of its "
            f"broadcast ({cause}); restarting the group's other server(s) {survivors}, which hold part of the new "
            "weights",
            flush=True,
        )
        for i in survivors:
            pool.mark_dead(
                i, BrokenBroadcastError(f"rollout server {i} was in the broken broadcast to version {version}")
            )
