"""One optimizer step of the policy: forward/backward through the pipeline schedule, loss, update gate, clip, Adam.

The loss of the whole batch is L = (sum over tokens of pg + kl_coef * kl - entropy_coef * H) / D, each term
aggregated with `algo.loss_agg` over the SAME global denominator D (the sum of `aggregation_denominator`
over every micro-batch of every data-parallel rank); pg is the clipped surrogate on sampled tokens and the
policy-shaping term -A p / (p + gamma) on injected offline ones (`TrainBatch.offline`, Mu et al. 2025).
Its gradient does not depend on how the batch is cut into micro-batches or spread over DP/TP/PP ranks;
`train_step` says how megatron-core's own scaling is undone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lcot_mega.actor import megatron_adapter as ma
from lcot_mega.actor import routing
from lcot_mega.actor.batching import MicroBatch, TokenSequence, to_token_layout
from lcot_mega.actor.logprobs import TokenStatsHead, is_reporting_rank, micro_batches_for_this_rank, run_schedule
from lcot_mega.algo import (
    aggregate,
    aggregation_denominator,
    kl_penalty,
    off_policy_weights,
    offpolicy_shaped_loss,
    policy_loss,
)
from lcot_mega.config import ActorConfig, AlgoConfig

_POLICY_MEAN_KEYS = (
    "actor/clipfrac",
    "actor/clipfrac_upper",
    "actor/clipfrac_lower",
    "actor/dual_clipfrac",
    "actor/ppo_kl",
    "actor/approx_kl_k3",
    "actor/ratio_mean",
)
_GAP_MEAN_KEYS = ("rollout/logp_gap_mean",)
_IS_MEAN_KEYS = ("rollout/is_weight_mean", "rollout/is_capped_frac", "rollout/is_masked_frac")
_MAX_KEYS = ("actor/ratio_max", "rollout/logp_gap_max")


def off_policy_correction(algo: AlgoConfig) -> tuple[str, float | None, float | None]:
    """The correction the loss applies (name, low, high): `algo.off_policy`, or `tis` at `algo.is_cap` (its
    shorthand; the config refuses both at once)."""
    if algo.is_cap is not None:
        return "tis", None, algo.is_cap
    op = algo.off_policy
    return op.correction, op.low, op.high


@dataclass
class TrainBatch:
    """One optimizer step's data; per-sequence lists in one order, the same on every rank (the whole batch).

    Per-token entries are 1-D tensors of the sequence's response length.
    """

    prompt_ids: Sequence[Sequence[int]]
    response_ids: Sequence[Sequence[int]]
    advantages: Sequence[float | torch.Tensor]
    """One advantage per sequence (GRPO) or one per response token."""
    old_logprobs: Sequence[torch.Tensor] | None = None
    """Log-probs under the policy that sampled (pi_old). None: this forward's own log-probs, detached
    (exact for one update per batch, and it saves a forward pass)."""
    ref_logprobs: Sequence[torch.Tensor] | None = None
    """Reference-policy log-probs for the KL loss; needed only when algo.kl_coef > 0."""
    rollout_logprobs: Sequence[torch.Tensor] | None = None
    """The rollout engine's log-probs (the behaviour policy): the train-vs-rollout gap, and the weights of
    `algo.off_policy` (docs/ALGORITHMS.md, "Off-policy corrections")."""
    temperature: float = 1.0
    """Sampling temperature of the rollout: logits are divided by it, as the engine did."""
    update_bounds: object | None = None
    """The update gate: anything with `rejects(metrics) -> list[str]` (`guards.bounds.UpdateBounds`), asked with
    this step's metrics and pre-clip grad norm; any answer skips the update. None: only a nonfinite gradient
    norm skips it (it always does)."""
    offline: Sequence[bool] | None = None
    """Per sequence: an injected offline solution (`algo.injection`, Mu et al. 2025), trained with the policy-shaping
    loss -A p / (p + gamma) instead of the clipped surrogate, and left out of the importance and train-vs-rollout
    statistics (its `rollout_logprobs` entry is a placeholder: no engine sampled it). None: every sequence is
    on-policy."""
    routing: Sequence[torch.Tensor | None] | None = None
    """A mixture of experts' routing to replay (`actor.routing_replay: rollout`): per sequence, the experts the rollout
    engine chose for its tokens ([tokens, layers * top_k]; None for a sequence no engine routed). None: the actor
    routes every token itself."""
    objective: str = "policy"
    """policy: the clipped surrogate of `algo` (with its KL and entropy terms). sft: the negative log-likelihood
    of the response tokens, aggregated by `algo.loss_agg` (token-mean: masked cross entropy), advantages unused."""

    @classmethod
    def sft(cls, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> TrainBatch:
        """A supervised batch: the loss is the response tokens' cross entropy; the prompt tokens are context only."""
        return cls(prompt_ids, response_ids, advantages=[0.0] * len(prompt_ids), objective="sft")

    def __post_init__(self) -> None:
        if self.objective not in ("policy", "sft"):
            raise ValueError(f"TrainBatch.objective must be 'policy' or 'sft', got {self.objective!r}")
        n = len(self.prompt_ids)
        for name in ("response_ids", "advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs", "offline"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"TrainBatch.{name} has {len(value)} entries for {n} sequences")

    @property
    def sequences(self) -> list[TokenSequence]:
        return list(zip(self.prompt_ids, self.response_ids, strict=True))


def global_denominator(micro_batches: list[MicroBatch], algo: AlgoConfig) -> torch.Tensor:
    """Sum of `aggregation_denominator` over this rank's micro-batches and over all data-parallel ranks."""
    local = torch.zeros((), dtype=torch.float32, device=ma.compute_device())
    for mb in micro_batches:
        if mb.num_rows:
            local += aggregation_denominator(mb.rows(mb.loss_mask), algo.loss_agg, algo.loss_max_len)
    group = ma.data_parallel_group()
    if group.size() > 1:
        dist.all_reduce(local, group=group)
    return local


@dataclass(frozen=True)
class StatKeys:
    """The per-micro-batch statistics by how they are reduced; the same on every rank.

    Summed ones are loss terms (each micro-batch's share of the whole-batch value). Token means travel as sums
    over tokens and are divided after the reduction: `token_means` by every response token, `policy_means` (ratio,
    clip, importance and train-vs-rollout statistics) by the on-policy tokens only, since injected offline tokens
    have no sampling policy to compare with.
    """

    sums: list[str]
    token_means: list[str]
    policy_means: list[str]
    maxes: list[str]


def metric_keys(algo: AlgoConfig, with_is: bool, with_gap: bool | None = None) -> StatKeys:
    """The statistics a step reports; `with_gap` (the batch has rollout log-probs; default: `with_is`) adds the
    train-vs-rollout log-prob gap, `with_is` the off-policy weights' statistics."""
    with_gap = with_is if with_gap is None else with_gap or with_is
    sums = ["tokens", "policy_tokens", "actor/loss", "actor/pg_loss"] + (["actor/kl_loss"] if algo.kl_coef > 0 else [])
    policy = [*_POLICY_MEAN_KEYS, *(_GAP_MEAN_KEYS if with_gap else ()), *(_IS_MEAN_KEYS if with_is else ())]
    return StatKeys(sums, ["actor/entropy"], policy, list(_MAX_KEYS if with_gap else _MAX_KEYS[:1]))


class _MicroBatchLoss:
    """The loss function the schedule calls on the last pipeline stage: (mb, output) -> (scaled loss, stats)."""

    def __init__(
        self, batch: TrainBatch, algo: AlgoConfig, head: TokenStatsHead, denominator: torch.Tensor, scale: float
    ):
        self.batch, self.algo, self.head, self.den, self.scale = batch, algo, head, denominator, scale
        self.with_gap = batch.rollout_logprobs is not None
        self.correction = off_policy_correction(algo)
        self.with_is = self.correction[0] != "none" and self.with_gap
        if self.correction[0] != "none" and batch.objective == "policy" and not self.with_gap:
            raise ValueError(
                f"algo.off_policy correction {self.correction[0]!r} needs TrainBatch.rollout_logprobs (the behaviour"
                " policy's log-probs)"
            )
        self.keys = metric_keys(algo, self.with_is, self.with_gap)

    def __call__(self, mb: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = self.keys
        stats = {key: 0.0 for key in (*k.sums, *k.token_means, *k.policy_means, *k.maxes)}
        if mb.num_rows == 0:  # keeps the schedules aligned; a zero loss that still reaches every parameter
            return self.head.zero_loss(output), _as_tensors(stats, output.device)
        mask = mb.rows(mb.loss_mask)  # [n, s]
        with_grad = self.algo.entropy_coef > 0 and torch.is_grad_enabled()  # the entropy is a loss term
        logp, entropy = self.head(mb, output, self.batch.temperature, entropy=True, entropy_grad=with_grad)  # [n, s]
        stats["actor/entropy"] = torch.where(mask, entropy.detach(), 0.0).sum() / mask.sum().clamp_min(1)
        offline = self._offline_mask(mb, mask)  # [n, s]
        on_policy = mask & ~offline
        if self.batch.objective == "sft":
            pg = self._aggregate(-logp, mask)  # cross entropy of the response tokens
            loss = pg
        else:
            pg = self._policy_term(mb, logp, on_policy, stats)
            if offline.any():
                pg = pg + offpolicy_shaped_loss(
                    logp,
                    to_token_layout(self.batch.advantages, mb),
                    offline,
                    gamma=self.algo.injection.gamma,
                    agg=self.algo.loss_agg,
                    max_len=self.algo.loss_max_len,
                    denominator=self.den,
                )
            loss = pg + self._regularizers(mb, logp, entropy, mask, stats)
        n, n_policy = mask.sum().float(), on_policy.sum().float()
        for key in self.keys.token_means:
            stats[key] = stats[key] * n  # token means -> sums, divided by all tokens after the reduction
        for key in self.keys.policy_means:
            stats[key] = stats[key] * n_policy  # divided by the on-policy tokens after the reduction
        stats |= {"tokens": n, "policy_tokens": n_policy, "actor/loss": loss.detach(), "actor/pg_loss": pg.detach()}
        # a fresh tensor: the schedule divides the returned loss in place
        return loss * self.scale, _as_tensors(stats, output.device)

    def _offline_mask(self, mb: MicroBatch, mask: torch.Tensor) -> torch.Tensor:
        """[n, s] bool: the response tokens of injected offline sequences (none without `TrainBatch.offline`)."""
        if self.batch.offline is None or not any(self.batch.offline):
            return torch.zeros_like(mask)
        flags = [float(bool(f)) for f in self.batch.offline]
        return mask & (to_token_layout(flags, mb) > 0.5)

    def _aggregate(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return aggregate(tokens, mask, self.algo.loss_agg, self.algo.loss_max_len, denominator=self.den)

    def _policy_term(self, mb: MicroBatch, logp: torch.Tensor, mask: torch.Tensor, stats: dict) -> torch.Tensor:
        """Clipped surrogate of the on-policy tokens (`mask`) over the global denominator, weighted by the
        off-policy correction when one is configured."""
        algo, b = self.algo, self.batch
        old = to_token_layout(b.old_logprobs, mb) if b.old_logprobs is not None else logp.detach()  # [n, s]
        is_weights = None
        if self.with_gap:
            rollout = to_token_layout(b.rollout_logprobs, mb)  # [n, s]
            is_weights, is_metrics = off_policy_weights(old, rollout, mask, *self.correction)
            stats.update({k: v for k, v in is_metrics.items() if self.with_is or "logp_gap" in k})
        pg, metrics = policy_loss(
            logp,
            old,
            to_token_layout(b.advantages, mb),
            mask,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            dual_clip=algo.dual_clip,
            agg=algo.loss_agg,
            max_len=algo.loss_max_len,
            is_weights=is_weights,
            denominator=self.den,
        )
        stats.update(metrics)
        return pg

    def _regularizers(
        self, mb: MicroBatch, logp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, stats: dict
    ) -> torch.Tensor | float:
        """kl_coef * KL - entropy_coef * H, aggregated like the policy term."""
        algo, out = self.algo, 0.0
        if algo.kl_coef > 0:
            ref = to_token_layout(self.batch.ref_logprobs, mb)  # [n, s]
            kl = self._aggregate(kl_penalty(logp, ref, algo.kl_kind, mask), mask)
            out = out + algo.kl_coef * kl
            stats["actor/kl_loss"] = kl.detach()
        if algo.entropy_coef > 0:
            out = out - algo.entropy_coef * self._aggregate(entropy, mask)
        return out


def _as_tensors(stats: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32).detach().to(device, copy=True) for k, v in stats.items()}


def reduce_stats(per_micro_batch: list[dict[str, torch.Tensor]], keys: StatKeys) -> dict[str, float]:
    """Sum (or max) the statistics over micro-batches and data-parallel replicas; the same dict on every rank.

    Only the reporting rank of each replica (last stage, TP rank 0) contributes; others add zeros.
    """
    sum_keys, max_keys = keys.sums + keys.token_means + keys.policy_means, keys.maxes
    device = ma.compute_device()
    sums = torch.zeros(len(sum_keys), device=device)
    maxes = torch.zeros(len(max_keys), device=device)
    if is_reporting_rank():
        for stats in per_micro_batch:
            sums += torch.stack([stats[k] for k in sum_keys])
            maxes = torch.maximum(maxes, torch.stack([stats[k] for k in max_keys]))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)  # every value is >= 0 (ratios, |gaps|)
    out = dict(zip(sum_keys, sums.tolist(), strict=True)) | dict(zip(max_keys, maxes.tolist(), strict=True))
    tokens, policy_tokens = out.pop("tokens"), out.pop("policy_tokens")
    for key in keys.token_means:
        out[key] /= max(tokens, 1.0)
    for key in keys.policy_means:
        out[key] /= max(policy_tokens, 1.0)
    out["actor/response_tokens"] = tokens
    return out


def prepare_update(optimizer) -> tuple[bool, object]:
    """First half of megatron-core's `ChainedOptimizer.step`: gradients into the main (fp32) shards, then the
    pre-clip norm over all of them (all-reduced: the same on every rank). (found_inf, norm as megatron has it).

    A nonfinite norm counts as found_inf: without a loss scaler megatron-core would step on NaN gradients.
    """
    found_inf = bool(optimizer.prepare_grads())
    grad_norm = None if found_inf else optimizer.get_grad_norm()
    return found_inf or not math.isfinite(float(grad_norm)), grad_norm


@torch.no_grad()
def apply_update(optimizer, grad_norm) -> bool:
    """Second half of `ChainedOptimizer.step`: clip each sub-optimizer's gradients by the total `grad_norm`, then
    Adam and the parameter all-gather (`step_with_ready_grads`). Returns megatron-core's success flag."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            decoupled = opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            clip_grad_by_total_norm_fp32(params, opt.config.clip_grad, grad_norm, use_decoupled_grad=decoupled)
    return bool(optimizer.step_with_ready_grads())


def gate_passes(found_inf: bool, bounds: object | None, metrics: dict[str, float]) -> bool:
    """Whether to apply the update: finite gradients and no objection from `bounds`, agreed by every rank.

    The metrics are identical on every rank already; the MAX all-reduce (one rank rejecting rejects) keeps the
    decision common whatever `bounds` does: ranks that disagreed would deadlock in the parameter all-gather.
    """
    reject = found_inf or (bounds is not None and bool(bounds.rejects(metrics)))
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(reject)], device=ma.compute_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        reject = bool(flag.item() > 0)
    return not reject


def train_step(
    chunks: list[torch.nn.Module],
    optimizer,
    scheduler,
    batch: TrainBatch,
    actor_cfg: ActorConfig,
    algo: AlgoConfig,
    vocab_size: int,
) -> dict[str, float]:
    """One optimizer step on `batch` (the whole batch, on every rank); returns the same metrics on every rank.

    `chunks` are the DDP-wrapped model chunks, `optimizer`/`scheduler` megatron-core's (see
    `megatron_adapter.build_optimizer`/`build_scheduler`). The loss scaling is derived in the body. The update
    is gated (`gate_passes`): when it is skipped, weights, Adam state and the LR schedule stay as they were.
    """
    if algo.kl_coef > 0 and batch.ref_logprobs is None and batch.objective == "policy":
        raise ValueError("algo.kl_coef > 0 needs TrainBatch.ref_logprobs (MegatronActor computes them)")
    sp = ma.unwrap(chunks[0]).config.sequence_parallel
    micro_batches = micro_batches_for_this_rank(
        batch.sequences, actor_cfg.micro_batch_tokens, actor_cfg.pack_sequences, sp
    )
    micro_batches = routing.with_targets(chunks, micro_batches, batch.sequences, batch.routing)
    denominator = global_denominator(micro_batches, algo)
    # Loss scaling. Micro-batch m of DP rank r has numerator N_rm (policy + KL - entropy terms summed over its
    # tokens); the whole-batch loss is L = sum_{r,m} N_rm / D, D the global denominator. With M micro-batches
    # per rank (the same on every rank) and R data-parallel ranks, megatron-core scales twice on its own:
    #   1. the schedule divides the loss a micro-batch returns by M (forward_step_calc_loss, 2-tuple path);
    #   2. DDP pre-scales every gradient by 1/R, then SUM-reduces over DP (the average of the replicas).
    # So each micro-batch returns l_rm = M * R * N_rm / D. The schedule backpropagates l_rm / M = R N_rm / D,
    # rank r accumulates g_r = R / D * sum_m grad N_rm, and DDP yields (1/R) sum_r g_r = sum_{r,m} grad N_rm / D
    # = grad L. TP ranks all compute the same loss and keep the gradient of their own shard; pipeline stages
    # get theirs through the schedule's backward; neither adds a factor.
    # Context parallelism (C ranks per replica) changes nothing here: the schedule multiplies the loss by C (its
    # 2-tuple path) and DDP pre-scales by 1 / (R C) over the data-and-context-parallel group. Every CP rank of a
    # replica computes the same N_rm from the gathered log-probs, whose backward hands each rank only its own
    # tokens' share (`context_parallel.gather_token_values`), so the CP ranks' gradients add up to C R / D *
    # grad N_rm, and DDP's 1 / (R C) leaves grad L.
    scale = len(micro_batches) * ma.data_parallel_group().size()
    head = TokenStatsHead(chunks, vocab_size, actor_cfg.logits_chunk_tokens)
    loss_fn = _MicroBatchLoss(batch, algo, head, denominator, scale)

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    config = ma.unwrap(chunks[0]).config
    routing.start_counting(chunks)
    stats = run_schedule(chunks, micro_batches, loss_fn, forward_only=False, head=head)
    found_inf, grad_norm = prepare_update(optimizer)

    metrics = reduce_stats(stats, loss_fn.keys)
    if config.num_moe_experts:  # collective: every rank's MoE layers and tokens
        metrics.update(routing.moe_metrics(chunks, config.num_layers, config.num_moe_experts, len(micro_batches)))
    metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["actor/micro_batches"] = float(len(micro_batches))
    update_ok = passed = gate_passes(found_inf, batch.update_bounds, metrics)
    if passed:
        scheduler.step(increment=1)  # before the update: the k-th update uses lr(k) (build_scheduler)
        update_ok = apply_update(optimizer, grad_norm)
    metrics["actor/lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["actor/update_ok"] = float(update_ok)
    metrics["actor/gate_skipped"] = float(not passed)
    return metrics
