"""`MegatronActor`: the policy (and, with a KL loss, a frozen reference) as megatron-core models.

Built on an initialized `torch.distributed` default group (gloo on CPU, nccl on GPU); every rank of that
group constructs one and makes the same calls with the same (whole) batch. Each data-parallel replica
works on its share of the batch; results and metrics come back identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from lcot_mega.actor import checkpoint as megatron_ckpt
from lcot_mega.actor import megatron_adapter as ma
from lcot_mega.actor.batching import TokenSequence
from lcot_mega.actor.logprobs import TokenLogProbs, compute_logprobs
from lcot_mega.actor.mini_batches import combine_metrics, split_batch
from lcot_mega.actor.routing import RouteList
from lcot_mega.actor.train_step import TrainBatch, train_step
from lcot_mega.bridge.arch import ArchSpec
from lcot_mega.bridge.hf_load import load_hf_weights
from lcot_mega.checkpoint.store import CheckpointStore
from lcot_mega.config import ActorConfig, AlgoConfig
from lcot_mega.utils.host_memory import release_free_heap


class MegatronActor:
    """Policy model chunks wrapped in megatron-core DDP, its distributed Adam and LR schedule.

    Attributes for the checkpoint and weight-sync code: `chunks` (DDP-wrapped policy chunks, one per
    virtual pipeline stage; `.module` is the `GPTModel`), `optimizer` (megatron-core `ChainedOptimizer`
    over distributed Adam), `scheduler` (`OptimizerParamScheduler`), `ref_chunks` (unwrapped, frozen;
    None when algo.kl_coef == 0), `layout`, `lr_scale` (see `set_lr_scale`).
    """

    def __init__(self, arch: ArchSpec, cfg: ActorConfig, algo: AlgoConfig, hf_dir: str | Path, seed: int = 1) -> None:
        self.arch, self.cfg, self.algo = arch, cfg, algo
        self.layout = ma.init_parallel(cfg, seed)
        chunks = ma.build_model(arch, cfg)
        load_hf_weights(chunks, hf_dir, arch, *self._tensor_parallel())
        if cfg.freeze_embeddings:
            ma.freeze_embeddings(chunks)
        self.chunks = ma.wrap_ddp(chunks)
        self.optimizer = ma.build_optimizer(self.chunks, cfg)
        self.scheduler = ma.build_scheduler(self.optimizer, cfg)
        self.lr_scale = 1.0
        self.ref_chunks = self._build_reference(hf_dir) if algo.kl_coef > 0 else None

    def _tensor_parallel(self) -> tuple[int, int, tuple[int, int]]:
        """(TP rank, TP size, (expert TP rank, expert TP size)): the slices of the HF tensors this rank loads."""
        layout = self.layout
        return layout.tp_rank, layout.tp_size, (layout.etp_rank, layout.etp_size)

    def _build_reference(self, hf_dir: str | Path) -> list[torch.nn.Module]:
        chunks = ma.build_model(self.arch, self.cfg)
        load_hf_weights(chunks, hf_dir, self.arch, *self._tensor_parallel())
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return chunks

    def _token_logprobs(
        self,
        chunks: list,
        sequences: Sequence[TokenSequence],
        temperature: float,
        entropy: bool,
        routing: RouteList | None = None,
    ):
        cfg = self.cfg
        try:
            return compute_logprobs(
                chunks,
                sequences,
                temperature,
                self.arch.vocab_size,
                cfg.micro_batch_tokens,
                with_entropy=entropy,
                chunk_tokens=cfg.logits_chunk_tokens,
                packed=cfg.pack_sequences,
                routes=routing,
            )
        finally:
            release_free_heap()

    def compute_logprobs(
        self, sequences: Sequence[TokenSequence], temperature: float = 1.0, routing: RouteList | None = None
    ) -> list[torch.Tensor]:
        """Per-sequence [response_len] log-probs under the current policy (logits / temperature), on every rank.
        `routing`: a mixture of experts' routed experts to replay per sequence (`TrainBatch.routing`)."""
        return self._token_logprobs(self.chunks, sequences, temperature, entropy=False, routing=routing).logprobs

    def compute_logprobs_and_entropy(
        self, sequences: Sequence[TokenSequence], temperature: float = 1.0, routing: RouteList | None = None
    ) -> TokenLogProbs:
        """As `compute_logprobs`, plus the per-token entropy of softmax(logits / temperature)."""
        return self._token_logprobs(self.chunks, sequences, temperature, entropy=True, routing=routing)

    def compute_ref_logprobs(self, sequences: Sequence[TokenSequence], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-sequence log-probs under the frozen reference policy (needs algo.kl_coef > 0)."""
        if self.ref_chunks is None:
            raise RuntimeError("no reference model: it is built only when algo.kl_coef > 0")
        return self._token_logprobs(self.ref_chunks, sequences, temperature, entropy=False).logprobs

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """`actor.updates_per_batch` optimizer steps on `batch` (one mini-batch each: `actor.mini_batches`); metrics
        (loss, grad_norm, lr, clip fractions, entropy, kl) combined over them.

        With algo.kl_coef > 0 and no `batch.ref_logprobs`, the reference log-probs are computed first; with more
        than one update and no `batch.old_logprobs`, so are the current policy's (the clip's anchor for all of them).
        """
        policy = batch.objective == "policy"
        if self.algo.kl_coef > 0 and batch.ref_logprobs is None and policy:
            batch = replace(batch, ref_logprobs=self.compute_ref_logprobs(batch.sequences, batch.temperature))
        updates = self.cfg.updates_per_batch if policy else 1
        if updates > 1 and batch.old_logprobs is None:
            old = self.compute_logprobs(batch.sequences, batch.temperature, batch.routing)
            batch = replace(batch, old_logprobs=old)
        try:
            return combine_metrics(
                [
                    train_step(
                        self.chunks, self.optimizer, self.scheduler, part, self.cfg, self.algo, self.arch.vocab_size
                    )
                    for part in split_batch(batch, updates)
                ]
            )
        finally:
            release_free_heap()  # the step's activations and logits chunks: free, but resident until trimmed

    def set_lr_scale(self, scale: float) -> None:
        """Make the schedule's peak and minimum LR the configured ones times `scale` (absolute: calling it twice
        with the same scale changes nothing); the current LR follows at once.

        The scale is this actor's, not the checkpoint's: `load_checkpoint` re-applies it, whatever scale the
        checkpoint was saved at. Call on every rank.
        """
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the LR scale must be finite and > 0, got {scale!r}")
        self.lr_scale = float(scale)
        ma.scale_schedule(self.scheduler, self.cfg, self.lr_scale)

    def save_checkpoint(
        self,
        target: CheckpointStore | str | Path,
        step: int,
        extra: dict | None = None,
        *,
        hf_dir: str | Path | None = None,
    ) -> Path:
        """Save the policy, its distributed Adam (fully reshardable), the LR schedule, RNG states and `step`.

        Call on every rank. `target` is the run's `CheckpointStore` (`megatron_ckpt.dist_store`) or exactly the
        directory to write; returns the committed directory. `extra` (JSON) comes back from `load_checkpoint`;
        `hf_dir` copies the HF config and tokenizer files in, so the checkpoint exports on its own. The
        reference model is not saved: it is the initial policy, which `__init__` re-creates from the HF weights.
        """
        try:
            return megatron_ckpt.save(
                self.chunks,
                target,
                step,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                extra=extra,
                hf_dir=hf_dir,
            )
        finally:
            release_free_heap()

    def load_checkpoint(self, path: str | Path) -> megatron_ckpt.LoadedCheckpoint:
        """Restore what `save_checkpoint` saved from a checkpoint directory, or a store root's newest valid one.

        Call on every rank of an actor built as usual (the HF weights it loaded are overwritten; its reference
        model stays the HF one). Any TP/PP/DP layout loads a checkpoint saved with any other; RNG states are
        restored only under the saved layout (`rng_restored`). A checkpoint of another model shape raises
        `megatron_ckpt.CheckpointMismatchError` before anything is loaded. The LR schedule's position comes from
        the checkpoint, its peak and minimum LR from this actor's config times `lr_scale`.
        """
        loaded = megatron_ckpt.load(self.chunks, path, optimizer=self.optimizer, scheduler=self.scheduler)
        ma.scale_schedule(self.scheduler, self.cfg, self.lr_scale)  # the checkpoint's peak LR is the saving run's
        return loaded
