"""Fixed random actor batches for the train-step tests: the same batch for the same step in every test and rank."""

from __future__ import annotations

import math

import torch

from helpers.tiny_models import VOCAB
from lcot_mega.actor.train_step import TrainBatch

SHAPES = [(3, 9), (1, 5), (6, 2), (2, 7), (4, 4), (5, 3)]
"""(prompt, response) lengths: uneven, so micro-batching and padding are exercised."""


def random_train_batch(step: int, **kwargs) -> TrainBatch:
    """Step `step`'s batch: fixed prompts, responses, advantages and old log-probs (near a uniform policy's, so
    some ratios leave the clip range); `kwargs` go to TrainBatch (update_bounds, nan_loss, ...)."""
    g = torch.Generator().manual_seed(100 + step)
    prompts = [torch.randint(0, VOCAB, (p,), generator=g).tolist() for p, _ in SHAPES]
    responses = [torch.randint(0, VOCAB, (r,), generator=g).tolist() for _, r in SHAPES]
    old = [-math.log(VOCAB) + 0.3 * torch.randn(r, generator=g) for _, r in SHAPES]
    advantages = [float(a) for a in torch.randn(len(SHAPES), generator=g)]
    return TrainBatch(prompts, responses, advantages, old_logprobs=old, temperature=0.7, **kwargs)
