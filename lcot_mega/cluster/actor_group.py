"""The actor as the driver sees it: one `ActorGroup` whose calls run on every actor rank.

`ActorRank` is what one process of the actor holds: its `MegatronActor` shard, the run's checkpoint store
and how its weights reach the rollout engines. Every rank makes the same calls with the same arguments
(Megatron's collectives need it); results are the same on every rank, so a group returns rank 0's.
Where the ranks run is a `RankSet`: `LocalRanks` is one rank in the driver's own process (world size 1 over
gloo); `RayRanks` (`lcot_mega.cluster.ray_group`) puts each rank in its own Ray actor. `ActorGroup` is the one
surface over either, in every cluster mode: a new rank method is one method on `ActorRank`, one here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from lcot_mega.actor.batching import TokenSequence
from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.config import Config
from lcot_mega.rollout.protocol import RolloutEngine
from lcot_mega.weight_sync.delta import DeltaEncoder
from lcot_mega.weight_sync.push import ProbeCheck, WeightTransport, fixed_probe_ids

RANK_CALLS = frozenset(
    {
        "compute_logprobs",
        "train_step",
        "sync_weights",
        "push_weights",
        "set_lr_scale",
        "save_checkpoint",
        "load_checkpoint",
        "latest_checkpoint",
        "apply",
    }
)
"""The `ActorRank` methods a `RankSet` runs (what `ActorGroup` offers)."""


class RankSet(Protocol):
    """Where the actor's ranks run."""

    def call(self, method: str, *args: Any) -> Any:
        """`ActorRank.<method>(*args)` on every rank at once (one of `RANK_CALLS`); rank 0's result."""
        ...

    def shutdown(self) -> None: ...


def call_rank(rank: ActorRank, method: str, *args: Any) -> Any:
    """`rank.<method>(*args)` for a `RankSet`, refusing anything outside `RANK_CALLS`."""
    if method not in RANK_CALLS:
        raise ValueError(f"not an actor rank call: {method!r} (one of {sorted(RANK_CALLS)})")
    return getattr(rank, method)(*args)


class ActorGroup:
    """The policy being trained, wherever its ranks run (see the module docstring).

    Every call holds `lock` until all ranks answer: two driver threads (the step, and a served engine's recovery
    reading the weights) never interleave their collectives differently on different ranks, and a recovery never
    reads a half-applied optimizer step. Where both are taken, the engine pool's weight lock comes first
    (`cluster.served`)."""

    def __init__(self, ranks: RankSet) -> None:
        self.ranks = ranks
        self.lock = threading.RLock()

    def _call(self, method: str, *args: Any) -> Any:
        with self.lock:
            return self.ranks.call(method, *args)

    def compute_logprobs(self, sequences: Sequence[TokenSequence], temperature: float) -> list[torch.Tensor]:
        """Per-sequence [response_len] log-probs under the current weights."""
        return self._call("compute_logprobs", [(list(p), list(r)) for p, r in sequences], temperature)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on the whole batch; its metrics."""
        return self._call("train_step", batch)

    def sync_weights(self, version: int) -> dict[str, float]:
        """Load the current weights into the rollout engines the ranks hold as `version`; sync metrics. The driver
        syncs through `Runtime.sync_weights`, which also keeps served engines' membership right."""
        return self._call("sync_weights", version)

    def push_weights(self, engine: RolloutEngine, version: int) -> None:
        """Load the current weights into `engine` alone as `version` (a restarted server; one rank only)."""
        self._call("push_weights", engine, version)

    def set_lr_scale(self, scale: float) -> None:
        """Peak and minimum LR := the configured ones times `scale` (absolute; kept across checkpoint loads)."""
        self._call("set_lr_scale", scale)

    def save_checkpoint(self, step: int, extra: dict) -> str:
        """Save model, optimizer, schedule and `extra` (the driver's state) as checkpoint `step`; its path."""
        return self._call("save_checkpoint", step, extra)

    def load_checkpoint(self, path: str | None = None) -> tuple[int, dict]:
        """Restore checkpoint `path` (None: the run's newest valid one); its (step, extra)."""
        return self._call("load_checkpoint", path)

    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint of the run, or None on a fresh run."""
        return self._call("latest_checkpoint")

    def apply(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(rank, *args)` on every `ActorRank`; rank 0's result. For work no method names (drills,
        diagnostics); `fn` must be a module-level function, so Ray can send it by reference."""
        return self._call("apply", fn, *args)

    def shutdown(self) -> None:
        self.ranks.shutdown()


class ActorRank:
    """One rank of the actor: model shard, checkpoint store, weight-sync target.

    `engines` are rollout engines this process loads in place (local and colocated modes; only global rank 0
    passes them). `transport` moves weights to engines in other processes (disaggregated mode: a broadcast).
    `probe` verifies each sync against the engines' log-probs of a fixed sequence (default: `sync_probe`).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        engines: Sequence[RolloutEngine] = (),
        transport: WeightTransport | None = None,
        probe: ProbeCheck | None = None,
        bucket_bytes: int | None = None,
    ) -> None:
        from transformers import AutoConfig

        from lcot_mega.actor.actor import MegatronActor
        from lcot_mega.actor.checkpoint import dist_store
        from lcot_mega.bridge.arch import arch_from_hf_config

        self.cfg = cfg
        self.hf_dir = Path(cfg.model.path)
        arch = arch_from_hf_config(AutoConfig.from_pretrained(self.hf_dir))
        self.actor = MegatronActor(arch, cfg.actor, cfg.algo, self.hf_dir, seed=cfg.trainer.seed)
        self.store = dist_store(
            Path(cfg.trainer.run_dir) / "checkpoints", cfg.trainer.keep_last, keep_good=cfg.trainer.keep_good
        )
        self.engines, self.transport = list(engines), transport
        self.probe = probe if probe is not None else sync_probe(cfg, arch.vocab_size)
        self.bucket_bytes = bucket_bytes
        self.delta = None if cfg.rollout.sync == "full" else DeltaEncoder(getattr(torch, cfg.model.dtype))
        """`rollout.sync: delta`: the mirror of what the engines hold (rank 0), reset whenever they may not."""

    def compute_logprobs(self, sequences: Sequence[TokenSequence], temperature: float) -> list[torch.Tensor]:
        return self.actor.compute_logprobs(sequences, temperature)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.actor.train_step(batch)

    def set_lr_scale(self, scale: float) -> None:
        self.actor.set_lr_scale(scale)

    def set_targets(self, engines: Sequence[RolloutEngine], transport: WeightTransport | None) -> None:
        """What the weights sync into from now on (a re-formed weight group: a replacement server holds its own
        weights, so a delta sync has no baseline)."""
        self.engines, self.transport = list(engines), transport
        if self.delta is not None:
            self.delta.reset()

    def sync_weights(self, version: int) -> dict[str, float]:
        from lcot_mega.weight_sync.push import DEFAULT_BUCKET_BYTES, sync_weights

        report = sync_weights(
            self.actor.chunks,
            self.actor.arch,
            self.engines,
            version,
            bucket_bytes=self.bucket_bytes or DEFAULT_BUCKET_BYTES,
            verify=self.probe,
            transport=self.transport,
            weight_dtype=self.cfg.rollout.weight_dtype,
            delta=self.delta,
            engine_dtype=getattr(torch, self.cfg.model.dtype),
        )
        return report.metrics()

    def push_weights(self, engine: RolloutEngine, version: int) -> None:
        """The weights as they are now into `engine` alone (no collective: only a one-rank actor may call it, so
        tensor parallelism is 1 and the HF tensors are read straight from the parameters)."""
        from lcot_mega.bridge.hf_export import DEFAULT_BUCKET_BYTES, iter_hf_buckets
        from lcot_mega.weight_sync.push import engine_buckets

        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("push_weights reads the full weights from one rank; this actor has several")
        if self.delta is not None:  # `engine` gets today's weights, not the mirror: the next sync is full
            self.delta.reset()
        buckets = iter_hf_buckets(self.actor.chunks, self.actor.arch, self.bucket_bytes or DEFAULT_BUCKET_BYTES)
        dtype = getattr(torch, self.cfg.model.dtype)
        for bucket in engine_buckets(buckets, self.cfg.rollout.weight_dtype, dtype=dtype):  # FP8 servers want FP8
            engine.update_weights(bucket, version)
        engine.update_weights((), version)
        engine.flush_cache()

    def apply(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self, *args)

    def save_checkpoint(self, step: int, extra: dict) -> str:
        return str(self.actor.save_checkpoint(self.store, step, extra, hf_dir=self.hf_dir))

    def load_checkpoint(self, path: str | None = None) -> tuple[int, dict]:
        loaded = self.actor.load_checkpoint(path or self.store.root)
        return loaded["step"], loaded["extra"]

    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint of the run, or None on a fresh run."""
        head = self.store.head()
        return None if head is None else str(self.store.path_for(head))

    def shutdown(self) -> None:
        if self.transport is not None and hasattr(self.transport, "close"):
            self.transport.close()


class LocalRanks:
    """One actor rank in this process (world size 1, gloo on CPU): the quick start and the tests."""

    def __init__(self, make_rank: Callable[[], ActorRank]) -> None:
        import torch.distributed as dist

        from lcot_mega.utils.distributed import free_port, init_process_group

        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            init_process_group(0, 1, free_port())
        self.rank = make_rank()

    def call(self, method: str, *args: Any) -> Any:
        return call_rank(self.rank, method, *args)

    def shutdown(self) -> None:
        import torch.distributed as dist

        from lcot_mega.actor import megatron_adapter as ma

        self.rank.shutdown()
        if self._owns_group and dist.is_initialized():
            ma.destroy_parallel()
            dist.destroy_process_group()


def local_actor(make_rank: Callable[[], ActorRank]) -> ActorGroup:
    """The actor as one rank in this process."""
    return ActorGroup(LocalRanks(make_rank))


def sync_probe(cfg: Config, vocab_size: int) -> ProbeCheck | None:
    """The per-sync check of `rollout.verify_sync`: 16 fixed token ids spread over the vocabulary, at
    `rollout.verify_tolerance` or the tolerance its dtypes allow (exact only where everything is float32)."""
    if not cfg.rollout.verify_sync:
        return None
    tolerance = cfg.rollout.verify_tolerance
    if tolerance is None:
        on_gpu = torch.cuda.is_available()
        actor_fp32 = cfg.actor.precision == "fp32" or (cfg.actor.precision == "auto" and not on_gpu)
        exact = actor_fp32 and cfg.actor.fp8 is None and cfg.model.dtype == "float32"
        tolerance = 1e-3 if exact and cfg.rollout.weight_dtype == "auto" else 1.0
    return ProbeCheck(fixed_probe_ids(vocab_size), tolerance)
