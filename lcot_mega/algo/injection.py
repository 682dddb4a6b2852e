"""The study's offline injection: replace wrong answers of hard groups with correct offline solutions."""

from __future__ import annotations

import torch

from lcot_mega.algo._checks import as_bool_mask
from lcot_mega.algo.groups import check_per_sample, group_mean, group_rank

__all__ = ["offline_injection_mask"]


def _check_available(available: torch.Tensor, group_ids: torch.Tensor) -> None:
    if available.dim() != 1 or available.is_floating_point() or available.dtype == torch.bool:
        raise ValueError(
            "available must be a 1-D integer tensor indexed by group id, "
            f"got {available.dtype} of shape {tuple(available.shape)}"
        )
    if available.numel() and bool((available < 0).any()):
        raise ValueError("available must hold non-negative counts")
    if group_ids.numel() and int(group_ids.max()) >= available.numel():
        raise ValueError(
            f"available has {available.numel()} entries but group id {int(group_ids.max())} occurs; "
            "it must be indexed by group id (length > max group id)"
        )


def offline_injection_mask(
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    alpha: float,
    available: torch.Tensor,
    truncated: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sample [N] bool: the online responses to replace by offline correct solutions (Mu et al. 2025, code).

    In every group whose accuracy (fraction correct, over all its samples) is <= `alpha`, the incorrect
    samples are marked, earliest in batch order first, at most `available[g]` of them for group id g.
    `available` is a 1-D int64 tensor indexed by group id (length > max group id; ids without offline
    solutions hold 0); count only usable solutions there (the study skips truncated offline solutions).
    Samples with `truncated` True are never marked (they still count toward accuracy).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    tensors = {"correct": correct} if truncated is None else {"correct": correct, "truncated": truncated}
    n = check_per_sample(group_ids, **tensors)
    correct = as_bool_mask("correct", correct)
    _check_available(available, group_ids)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=correct.device)
    hard = group_mean(correct, group_ids) <= alpha  # [N]
    candidates = ~correct & hard
    if truncated is not None:
        candidates &= ~as_bool_mask("truncated", truncated)
    rank = group_rank(candidates, group_ids)  # [N], -1 off candidates
    budget = available.to(group_ids.device)[group_ids]  # [N]
    return candidates & (rank < budget)
