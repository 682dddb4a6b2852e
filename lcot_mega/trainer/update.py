"""The update half of a step: which samples train (the study's polarity modes) and the actor's input.

Mu et al. (2025) train on positives only, negatives only, both, or both with positives down-weighted;
advantages are computed on the full group first and selection then drops samples (`lcot_mega.algo.selection`).
"""

from __future__ import annotations

import torch

from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.algo.metrics import batch_metrics
from lcot_mega.algo.selection import positive_weight, select_by_polarity
from lcot_mega.config import AlgoConfig
from lcot_mega.types import Batch


def select_for_update(batch: Batch, algo: AlgoConfig, seed: int) -> tuple[Batch, dict[str, float]]:
    """The samples `algo.polarity` trains on (advantages reweighted in `weighted` mode), and polarity metrics.

    `seed` drives the random reserve of the dropped polarity, so a resumed run keeps the same samples.
    """
    t = batch.tensors()
    adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32)  # [N]
    generator = torch.Generator().manual_seed(seed)
    keep = select_by_polarity(
        adv, t.correct, t.group_ids, algo.polarity, algo.reserve_ratio, algo.reserve_min, generator
    )  # [N] bool
    trained = positive_weight(adv, t.correct, algo.positive_weight) if algo.polarity == "weighted" else adv  # [N]
    metrics = batch_metrics(adv, t.correct, t.group_ids, keep, update_advantages=trained)
    metrics.pop("reward/accuracy")  # the rollout stage reports accuracy over everything generated
    if trained is not adv:
        batch.set_advantages(trained)
    return batch.filter(keep), metrics


def to_train_batch(batch: Batch, temperature: float) -> TrainBatch:
    """The actor's input: token ids, one advantage per sequence, and the engine's log-probs (for the gap
    metric and, with `algo.is_cap`, truncated importance sampling)."""
    samples = batch.samples
    return TrainBatch(
        prompt_ids=[list(s.prompt_ids) for s in samples],
        response_ids=[list(s.response_ids) for s in samples],
        advantages=[s.advantage for s in samples],
        rollout_logprobs=[torch.tensor(s.rollout_logprobs, dtype=torch.float32) for s in samples],
        temperature=temperature,
    )
