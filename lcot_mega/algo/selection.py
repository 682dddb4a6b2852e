"""Which samples train: DAPO dynamic sampling, the study's polarity selection, world-size trimming.

The polarity and trimming functions return keep-masks [N] bool (True = train on it) and never touch
advantages, except `positive_weight`, which rescales them. `informative_groups` names the groups
dynamic sampling keeps, from rewards alone, so it can run before any advantage is computed.
"""

from __future__ import annotations

import math

import torch

from lcot_mega.algo._checks import as_bool_mask, check_finite
from lcot_mega.algo.groups import check_per_sample, group_any, group_extremes

__all__ = [
    "POLARITY_MODES",
    "informative_groups",
    "positive_weight",
    "select_by_polarity",
    "trim_to_multiple",
    "zero_advantage_groups",
]

POLARITY_MODES = ("positive", "negative", "both", "weighted")
"""Modes of `select_by_polarity`."""


def _check_tol(tol: float) -> None:
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")


def zero_advantage_groups(advantages: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Per sample [N] bool: True when every advantage of its group has |a| <= tol (no learning signal).

    These are the all-correct / all-wrong groups that make GRPO data-inefficient (Mu et al. 2025, claim 2).
    """
    _check_tol(tol)
    check_per_sample(group_ids, advantages=advantages)
    return ~group_any(advantages.abs() > tol, group_ids)


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Sorted unique ids [K] int64 of the groups whose rewards are not all equal: the groups DAPO dynamic
    sampling keeps (Yu et al. 2025, sec. 3.2, eq. 11).

    Every registered advantage estimator gives a group all-zero advantages exactly when its rewards are
    all equal (the contract in advantages.py), so these are the groups with a learning signal under any of
    them, batch-normalising REINFORCE++ included; a single-sample group is never informative.
    """
    n = check_per_sample(group_ids, rewards=rewards)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=group_ids.device)
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # uniq [G] sorted
    lo, hi = group_extremes(rewards, inv, uniq.numel())  # [G], [G]
    return uniq[lo != hi].long()


def _random_subset(candidates: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Bool mask [N] with k of the True entries of `candidates` [N], chosen uniformly without replacement."""
    idx = candidates.nonzero().squeeze(1)  # [M]
    perm = torch.randperm(idx.numel(), generator=generator)[:k].to(idx.device)
    out = torch.zeros_like(candidates)
    out[idx[perm]] = True
    return out


def select_by_polarity(
    advantages: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str,
    reserve_ratio: float = 0.0,
    reserve_min: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep-mask [N] bool of the study's positive-only / negative-only training (Mu et al. 2025, code).

    Advantages are computed on the full group first; selection then DROPS samples by correctness:
    `positive` drops incorrect samples, `negative` drops correct ones, `both` and `weighted` keep all
    (`weighted` is reweighted by `positive_weight`). Of the dropped side, floor(reserve_ratio * n_dropped)
    samples over the whole batch (at least `reserve_min`, at most n_dropped) are kept anyway, chosen
    uniformly with `generator` (a CPU generator). All-wrong groups still train in `negative` mode: their
    samples are incorrect, so kept, with advantage 0 (the study's behaviour). `advantages` is validated
    for shape/finiteness but does not decide selection.
    """
    if mode not in POLARITY_MODES:
        raise ValueError(f"unknown polarity mode {mode!r}; expected one of {list(POLARITY_MODES)}")
    if not 0.0 <= reserve_ratio <= 1.0:
        raise ValueError(f"reserve_ratio must be in [0, 1], got {reserve_ratio}")
    if reserve_min < 0:
        raise ValueError(f"reserve_min must be >= 0, got {reserve_min}")
    n = check_per_sample(group_ids, advantages=advantages, correct=correct)
    correct = as_bool_mask("correct", correct)
    if mode in ("both", "weighted"):
        return torch.ones(n, dtype=torch.bool, device=correct.device)
    dropped = ~correct if mode == "positive" else correct.clone()  # [N]
    n_dropped = int(dropped.sum())
    # 1e-9 guards float products such as 0.29 * 100 = 28.999999999999996 from flooring one short.
    n_reserve = min(max(math.floor(reserve_ratio * n_dropped + 1e-9), reserve_min), n_dropped)
    return ~dropped | _random_subset(dropped, n_reserve, generator)


def trim_to_multiple(keep: torch.Tensor, multiple: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`keep` [N] with (kept count mod `multiple`) kept samples, chosen uniformly with `generator`, set False.

    The study trims the kept count to a multiple of the data-parallel world size; a count below
    `multiple` trims to 0 (the driver then skips the step).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if keep.dim() != 1:
        raise ValueError(f"keep must be a flat per-sample mask [N], got shape {tuple(keep.shape)}")
    keep = as_bool_mask("keep", keep)
    surplus = int(keep.sum()) % multiple
    return keep & ~_random_subset(keep, surplus, generator)


def positive_weight(advantages: torch.Tensor, correct: torch.Tensor, weight: float) -> torch.Tensor:
    """Advantages [N] float32 with correct (positive) samples scaled by `weight`, the rest unchanged.

    W-REINFORCE style reweighting (Zhu et al. 2025, "The Surprising Effectiveness of Negative
    Reinforcement in LLM Reasoning"): weight < 1 leans on negative samples.
    """
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be a flat per-sample tensor [N], got shape {tuple(advantages.shape)}")
    if advantages.shape != correct.shape:
        raise ValueError(f"shape mismatch: advantages {tuple(advantages.shape)}, correct {tuple(correct.shape)}")
    check_finite("advantages", advantages)
    correct = as_bool_mask("correct", correct)
    adv = advantages.to(torch.float32)
    return torch.where(correct, adv * weight, adv)
