"""The actor as the driver sees it: one object whose calls run on every actor rank.

`ActorRank` is what one process of the actor holds: its `MegatronActor` shard, the run's checkpoint store
and how its weights reach the rollout engines. Every rank makes the same calls with the same arguments
(Megatron's collectives need it); results are the same on every rank, so a group returns rank 0's.
`LocalActorGroup` is one rank in the driver's own process (world size 1 over gloo); the Ray group in
`lcot_mega.cluster.ray_group` puts each rank in its own Ray actor. The driver only sees `ActorGroup`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from lcot_mega.actor.batching import TokenSequence
from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.config import Config
from lcot_mega.rollout.protocol import RolloutEngine
from lcot_mega.weight_sync.push import ProbeCheck, WeightTransport


@runtime_checkable
class ActorGroup(Protocol):
    """The policy being trained, wherever its ranks run."""

    def compute_logprobs(self, sequences: Sequence[TokenSequence], temperature: float) -> list[torch.Tensor]:
        """Per-sequence [response_len] log-probs under the current weights."""
        ...

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on the whole batch; its metrics."""
        ...

    def sync_weights(self, version: int) -> dict[str, float]:
        """Load the current weights into the rollout engines as `version`; sync metrics."""
        ...

    def set_lr_scale(self, scale: float) -> None:
        """Peak and minimum LR := the configured ones times `scale` (absolute; kept across checkpoint loads)."""
        ...

    def sharpen(self, scale: float) -> None:
        """Multiply the policy's final norm weight by `scale` (fault injection: an entropy collapse)."""
        ...

    def arm_save_fault(self, kind: str) -> None:
        """Make the next checkpoint write fail ("crash" mid-write, "disk_full"): fault injection."""
        ...

    def save_checkpoint(self, step: int, extra: dict) -> str:
        """Save model, optimizer, schedule and `extra` (the driver's state) as checkpoint `step`; its path."""
        ...

    def load_checkpoint(self, path: str | None = None) -> tuple[int, dict]:
        """Restore checkpoint `path` (None: the run's newest valid one); its (step, extra)."""
        ...

    def shutdown(self) -> None: ...


class ActorRank:
    """One rank of the actor: model shard, checkpoint store, weight-sync target.

    `engines` are rollout engines this process loads in place (local and colocated modes; only global rank 0
    passes them). `transport` moves weights to engines in other processes (disaggregated mode: a broadcast).
    `probe` verifies each sync against the engines' log-probs of a fixed sequence.
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
        self.store = dist_store(Path(cfg.trainer.run_dir) / "checkpoints", cfg.trainer.keep_last)
        self.engines, self.transport, self.probe = list(engines), transport, probe
        self.bucket_bytes = bucket_bytes

    def compute_logprobs(self, sequences: Sequence[TokenSequence], temperature: float) -> list[torch.Tensor]:
        return self.actor.compute_logprobs(sequences, temperature)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.actor.train_step(batch)

    def set_lr_scale(self, scale: float) -> None:
        self.actor.set_lr_scale(scale)

    def sharpen(self, scale: float) -> None:
        self.actor.sharpen(scale)

    def arm_save_fault(self, kind: str) -> None:
        from lcot_mega.checkpoint.store import injected_save_fault

        self.store.before_commit = injected_save_fault(kind)

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
        )
        return report.metrics()

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


class LocalActorGroup:
    """The actor as one rank in this process (world size 1, gloo on CPU): the quick start and the tests."""

    def __init__(self, make_rank: Callable[[], ActorRank]) -> None:
        import torch.distributed as dist

        from lcot_mega.utils.distributed import free_port, init_process_group

        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            init_process_group(0, 1, free_port())
        self.rank = make_rank()

    def compute_logprobs(self, sequences: Sequence[TokenSequence], temperature: float) -> list[torch.Tensor]:
        return self.rank.compute_logprobs(sequences, temperature)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.rank.train_step(batch)

    def set_lr_scale(self, scale: float) -> None:
        self.rank.set_lr_scale(scale)

    def sharpen(self, scale: float) -> None:
        self.rank.sharpen(scale)

    def arm_save_fault(self, kind: str) -> None:
        self.rank.arm_save_fault(kind)

    def sync_weights(self, version: int) -> dict[str, float]:
        return self.rank.sync_weights(version)

    def save_checkpoint(self, step: int, extra: dict) -> str:
        return self.rank.save_checkpoint(step, extra)

    def load_checkpoint(self, path: str | None = None) -> tuple[int, dict]:
        return self.rank.load_checkpoint(path)

    def latest_checkpoint(self) -> str | None:
        return self.rank.latest_checkpoint()

    def shutdown(self) -> None:
        import torch.distributed as dist

        from lcot_mega.actor import megatron_adapter as ma

        self.rank.shutdown()
        if self._owns_group and dist.is_initialized():
            ma.destroy_parallel()
            dist.destroy_process_group()
