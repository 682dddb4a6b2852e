"""The update half of a step: which samples train (the study's polarity modes, overlong filtering) and the actor's
input.

Mu et al. (2025) train on positives only, negatives only, both, or both with positives down-weighted;
advantages are computed on the full group first and selection then drops samples (`lcot_mega.algo.selection`).
`algo.mask_truncated` (DAPO's overlong filtering, Yu et al. 2025, sec. 3.4) drops the responses cut at
rollout.max_new_tokens the same way, after the advantages. Dropping a sample from the actor's batch is what
masking it out of the loss means here: none of its tokens is weighted and it counts in no loss denominator
(token count, sequence count, or Dr.GRPO's B * max_len), while every per-sample list the actor gets stays aligned.
"""

from __future__ import annotations

import torch

from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.algo.metrics import batch_metrics
from lcot_mega.algo.selection import positive_weight, select_by_polarity
from lcot_mega.config import AlgoConfig
from lcot_mega.types import Batch, Sample


def select_for_update(batch: Batch, algo: AlgoConfig, seed: int) -> tuple[Batch, dict[str, float]]:
    """The samples `algo.polarity` trains on (advantages reweighted in `weighted` mode), without the truncated ones
    when `algo.mask_truncated` is set, and the selection metrics (`polarity/kept_*` describe what trains).

    `seed` drives the random reserve of the dropped polarity, so a resumed run keeps the same samples; the reserve
    is drawn before truncated samples are dropped, so a truncated one drawn into it is dropped too.
    """
    t = batch.tensors()
    adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32)  # [N]
    generator = torch.Generator().manual_seed(seed)
    keep = select_by_polarity(
        adv, t.correct, t.group_ids, algo.polarity, algo.reserve_ratio, algo.reserve_min, generator
    )  # [N] bool
    masked = keep & t.truncated if algo.mask_truncated else torch.zeros_like(keep)  # [N] bool
    keep = keep & ~masked
    trained = positive_weight(adv, t.correct, algo.positive_weight) if algo.polarity == "weighted" else adv  # [N]
    metrics = batch_metrics(adv, t.correct, t.group_ids, keep, update_advantages=trained)
    metrics.pop("reward/accuracy")  # the rollout stage reports accuracy over everything generated
    metrics["select/masked_truncated"] = float(masked.sum())
    if algo.injection.enabled:
        metrics |= injection_share(trained, t.offline, t.lengths, keep)
    if trained is not adv:
        batch.set_advantages(trained)
    return batch.filter(keep), metrics


def injection_share(adv: torch.Tensor, offline: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor) -> dict:
    """What injected offline solutions weigh in the update: how many train, their share of the trained response
    tokens, and their share of the |advantage| mass (the measure `polarity/*_share` uses)."""
    off = offline & keep  # [N]
    tokens = float(lengths[keep].sum())
    mass = float(adv[keep].abs().sum())
    return {
        "injection/trained": float(off.sum()),
        "injection/token_share": float(lengths[off].sum()) / tokens if tokens else 0.0,
        "injection/adv_share": float(adv[off].abs().sum()) / mass if mass else 0.0,
    }


def to_train_batch(batch: Batch, temperature: float) -> TrainBatch:
    """The actor's input: token ids, one advantage per sequence, the engine's log-probs (for the gap metric and,
    the weights of `algo.off_policy`) and which sequences are injected offline solutions (their
    log-prob entry is a placeholder of zeros: no engine sampled them, and the actor reads none of it)."""
    samples = batch.samples

    def rollout_logprobs(s: Sample) -> torch.Tensor:
        if s.rollout_logprobs is None:
            if not s.offline:
                raise ValueError(f"a sampled response of prompt {s.prompt.uid!r} came without rollout log-probs")
            return torch.zeros(s.response_len, dtype=torch.float32)
        return torch.tensor(s.rollout_logprobs, dtype=torch.float32)

    offline = [s.offline for s in samples]
    routing = [s.routed_experts for s in samples]  # a mixture of experts' engine routing (actor.routing_replay)
    return TrainBatch(
        prompt_ids=[list(s.prompt_ids) for s in samples],
        response_ids=[list(s.response_ids) for s in samples],
        advantages=[s.advantage for s in samples],
        rollout_logprobs=[rollout_logprobs(s) for s in samples],
        temperature=temperature,
        offline=offline if any(offline) else None,
        routing=routing if any(r is not None for r in routing) else None,
    )
