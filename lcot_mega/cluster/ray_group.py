"""The actor's ranks as Ray actors: one placement-group bundle and one process per rank.

`RayRanks` is the `RankSet` an `ActorGroup` runs on here: every call goes to all ranks at once (Megatron's
collectives need every rank in them) and returns rank 0's answer. Each `ActorWorker` joins the default
torch.distributed group itself (gloo on CPU, NCCL on GPUs) at rank 0's node address, then builds its
`ActorRank`. `attach` then gives rank 0 what the weights sync into (`RankTargets`): in colocated mode the
rollout engine itself, built in rank 0's process; in disaggregated mode HTTP clients of the served engines and
a `BroadcastSync` towards them. Ray is imported only when a group is built.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lcot_mega.config import Config

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 600.0
"""Model build, weight load and (disaggregated) the servers joining the weight group, per rank."""
CALL_TIMEOUT_S: float | None = None
"""Protocol calls wait as long as the step takes (a long train step is not a failure)."""
ENGINE_METHODS = frozenset(
    {"generate", "score", "abort", "update_weights", "release_memory", "resume_memory", "flush_cache", "health"}
)
"""Rollout-engine calls the colocated proxy may forward to the engine inside rank 0 (see `ray_engines`)."""


def stop_actors(actors: list[Any], pg: Any, what: str, timeout_s: float = 60.0) -> None:
    """Ask `actors` to shut down (bounded wait), then kill them and free their placement group, whatever happened:
    a dead or stuck actor must not keep the others alive."""
    import ray

    try:
        ray.get([a.shutdown.remote() for a in actors], timeout=timeout_s)
    except Exception as e:
        print(f"lcot-mega: {what} did not shut down cleanly: {type(e).__name__}: {e}")
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(pg)


def node_ip() -> str:
    """This process's node address as Ray sees it (what other nodes reach it by)."""
    import ray

    return ray.util.get_node_ip_address()


def master_store(host: str, timeout_s: float) -> Any:
    """Rank 0's rendezvous store, listening on a port the OS picks: bound at once, so no other process can take
    the port between choosing it and listening on it (a real race on a busy machine)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)


def init_process_group_at(
    master_addr: str, port: int, rank: int, world_size: int, timeout_s: float, store: Any = None
) -> str:
    """Join the default group with rank 0 at `master_addr:port` (any node, unlike the loopback-only
    `lcot_mega.utils.distributed.init_process_group`); rank 0 passes its `master_store`. NCCL when this process sees
    a GPU, else gloo; returns the backend."""
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPUs
        torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(master_addr, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return backend


@dataclass(frozen=True)
class ColocatedEngine:
    """Rank 0 builds an `EmbeddedEngine` in its own process and loads every sync into it in place."""

    model_dir: str
    dtype: str
    """A key of `runtime.ROLLOUT_DTYPES`."""
    seed: int


@dataclass(frozen=True)
class ServedTargets:
    """Rank 0 reaches served engines over HTTP and broadcasts each sync to them (`BroadcastSync`)."""

    urls: tuple[str, ...]
    api_key: str | None
    backend: str
    """Of the weight-update group: gloo (CPU) or nccl (GPU servers)."""


RankTargets = ColocatedEngine | ServedTargets


class ActorWorker:
    """One actor rank in its own process (wrapped by `ray.remote` in `RayRanks`).

    Threaded (max_concurrency > 1) so that a colocated engine's `abort` reaches it while `generate` runs (the
    engine has its own locks). The rank's own calls all run on one dedicated thread, one at a time: they are
    collectives, and megatron's CPU shim (a `TorchFunctionMode`) and the current CUDA device are per thread."""

    def __init__(self, threads: int) -> None:
        threads = max(1, threads)
        torch.set_num_threads(threads)
        self.rank_state: Any = None  # ActorRank, built in setup()
        self.engine: Any = None  # colocated: the rollout engine living here (rank 0 only)
        self._store: Any = None  # rank 0: the default group's rendezvous store
        self._actor_thread = ThreadPoolExecutor(
            1, thread_name_prefix="actor-rank", initializer=torch.set_num_threads, initargs=(threads,)
        )

    def _on_actor_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._actor_thread.submit(fn, *args).result()

    def master_address(self) -> tuple[str, int]:
        """(node address, port) of the default group's store, which this worker (rank 0) now hosts."""
        host = node_ip()
        self._store = master_store(host, SETUP_TIMEOUT_S)
        return host, self._store.port

    def setup(self, cfg: Config, master: tuple[str, int], rank: int, world_size: int) -> str:
        """Join the default group at rank 0's `master` address, then build the `ActorRank`; the backend."""
        from lcot_mega.cluster.actor_group import ActorRank

        def build() -> str:
            store = self._store if rank == 0 else None
            backend = init_process_group_at(master[0], master[1], rank, world_size, SETUP_TIMEOUT_S, store)
            self.rank_state = ActorRank(cfg)
            return backend

        return self._on_actor_thread(build)

    def attach(self, targets: RankTargets) -> None:
        """Give this rank (global rank 0) what its weight syncs go to (set apart from `setup`, so served engines
        can start while the ranks build their models)."""

        def build() -> None:
            self.rank_state.set_targets(*self._build_targets(targets, node_ip()))

        self._on_actor_thread(build)

    def retarget(self, targets: ServedTargets, generation: int) -> None:
        """Rank 0 of a disaggregated actor: leave the weight group and form a new one with `targets` (the live
        servers, a replacement among them) under a name of its own, so a dead member never blocks a broadcast.
        The old group's members are asked to leave it; a dead one cannot answer, which is expected."""

        def rebuild() -> None:
            old = self.rank_state.transport
            if old is not None:
                try:
                    old.close(keep=targets.urls)
                except Exception as e:  # the member that died cannot leave; the group is dropped anyway
                    log.info("leaving the old weight group: %s", e)
            self.rank_state.set_targets(*self._build_targets(targets, node_ip(), generation))

        self._on_actor_thread(rebuild)

    def _build_targets(self, targets: RankTargets, host: str, generation: int = 0) -> tuple[list[Any], Any]:
        """(engines loaded in place or probed, transport) for `ActorRank`."""
        if isinstance(targets, ColocatedEngine):
            from lcot_mega.cluster.runtime import ROLLOUT_DTYPES
            from lcot_mega.rollout.embedded import EmbeddedEngine

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = ROLLOUT_DTYPES[targets.dtype]
            self.engine = EmbeddedEngine(targets.model_dir, dtype=dtype, device=device, seed=targets.seed)
            return [self.engine], None
        from lcot_mega.rollout.http_client import SGLangHTTPEngine
        from lcot_mega.weight_sync.broadcast import BroadcastSync

        clients = [SGLangHTTPEngine(url, targets.api_key) for url in targets.urls]
        name = "lcot_actor_weights" if generation == 0 else f"lcot_actor_weights_{generation}"
        transport = BroadcastSync(clients, host, 0, group_name=name, backend=targets.backend)  # 0: bound at once
        return clients, transport  # the clients serve the probe check; tensors travel by broadcast

    # --------------------------------------------------------------------------------- rank calls

    def call(self, method: str, *args: Any) -> Any:
        """`ActorRank.<method>(*args)` on the rank's own thread (`actor_group.RANK_CALLS`)."""
        from lcot_mega.cluster.actor_group import call_rank

        return self._on_actor_thread(call_rank, self.rank_state, method, *args)

    def shutdown(self) -> None:
        """Leave the weight group and the default group (the process itself is killed by the driver)."""
        import torch.distributed as dist

        from lcot_mega.actor import megatron_adapter as ma

        def leave() -> None:
            if self.rank_state is not None:
                self.rank_state.shutdown()
                self.rank_state = None
            if dist.is_initialized():
                ma.destroy_parallel()
                dist.destroy_process_group()
            self._store = None

        if self.engine is not None:
            self.engine.shutdown()
        self._on_actor_thread(leave)
        self._actor_thread.shutdown()

    # ------------------------------------------------------------------------------- colocated engine

    def engine_call(self, method: str, *args: Any) -> Any:
        """`self.engine.<method>(*args)` for the driver's proxy; the engine's own locks make this thread-safe."""
        if method not in ENGINE_METHODS:
            raise ValueError(f"not a rollout-engine call: {method!r}")
        return getattr(self.engine, method)(*args)

    def engine_weight_version(self) -> int:
        return self.engine.weight_version

    def engine_shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def ping(self) -> bool:
        return True


class RayRanks:
    """The `RankSet` of `cluster.actor_ranks` Ray actors in one PACK placement group (see the module docstring)."""

    def __init__(self, cfg: Config, *, max_concurrency: int = 4) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from lcot_mega.cluster.ray_runtime import placement_group

        c = cfg.cluster
        world = c.actor_ranks
        self._closed = False
        # Every call reaches all ranks under one lock, held until they answer: two driver threads (the step and a
        # server's recovery) must never interleave their collectives differently on different ranks.
        self._lock = threading.RLock()
        self.pg = placement_group([{"CPU": c.cpus_per_rank, "GPU": c.gpus_per_rank}] * world, "actor ranks")
        remote = ray.remote(ActorWorker)
        self.workers = [
            remote.options(
                num_cpus=c.cpus_per_rank,
                num_gpus=c.gpus_per_rank,
                max_concurrency=max_concurrency,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(max(1, int(c.cpus_per_rank)))
            for i in range(world)
        ]
        try:
            master = ray.get(self.workers[0].master_address.remote(), timeout=SETUP_TIMEOUT_S)
            setups = [w.setup.remote(cfg, master, rank, world) for rank, w in enumerate(self.workers)]
            self.backend = ray.get(setups, timeout=SETUP_TIMEOUT_S)[0]
        except BaseException:
            self.shutdown()
            raise

    def attach(self, targets: RankTargets) -> None:
        """Rank 0 builds the engine (colocated) or joins the served engines' weight group (disaggregated)."""
        import ray

        with self._lock:
            ray.get(self.workers[0].attach.remote(targets), timeout=SETUP_TIMEOUT_S)

    def retarget(self, targets: ServedTargets, generation: int) -> None:
        """Rank 0 re-forms its weight group with `targets` (disaggregated recovery; `cluster.served`)."""
        import ray

        with self._lock:
            ray.get(self.workers[0].retarget.remote(targets, generation), timeout=SETUP_TIMEOUT_S)

    def call(self, method: str, *args: Any) -> Any:
        """`ActorRank.<method>(*args)` on every rank at once; rank 0's result (every rank computes the same)."""
        import ray

        if len(self.workers) > 1:  # serialize a batch once, not once per rank (Ray resolves top-level refs)
            args = tuple(ray.put(a) for a in args)
        with self._lock:
            refs = [w.call.remote(method, *args) for w in self.workers]
            return ray.get(refs, timeout=CALL_TIMEOUT_S)[0]

    def shutdown(self) -> None:
        """Ranks leave their groups (best effort, bounded), then their processes and the placement group go."""
        if self._closed:
            return
        self._closed = True
        stop_actors(self.workers, self.pg, "actor ranks")
