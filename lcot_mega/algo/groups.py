"""Per-group statistics over flat per-sample tensors, vectorized with `index_add` on the group index.

Every per-sample input of the RL math is a flat tensor [N] in batch order with `group_ids` [N]
(any non-negative ids; a group's samples need not be contiguous). `group_index` maps the ids to a
dense index 0..G-1 (sorted by id); the reductions below sum into [G] and gather back to [N].
Statistics are accumulated in float64 so a group of 16 rewards normalizes the same on any device.
"""

from __future__ import annotations

import torch

from lcot_mega.algo._checks import as_bool_mask, check_finite, check_group_ids, check_same_shape

__all__ = [
    "check_per_sample",
    "group_all",
    "group_any",
    "group_count",
    "group_extremes",
    "group_index",
    "group_mean",
    "group_moments",
    "group_rank",
    "group_stats",
    "segment_sum",
]


def check_per_sample(group_ids: torch.Tensor, **tensors: torch.Tensor) -> int:
    """Validate 1-D per-sample tensors that share `group_ids`; return N.

    Raises ValueError on NaN/Inf, on a tensor that is not 1-D, on a shape mismatch and on bad group ids.
    """
    for name, t in tensors.items():
        if t.dim() != 1:
            raise ValueError(f"{name} must be a flat per-sample tensor [N], got shape {tuple(t.shape)}")
    check_same_shape(**tensors, group_ids=group_ids)
    for name, t in tensors.items():
        check_finite(name, t)
    n = group_ids.numel()
    check_group_ids(group_ids, n)
    return n


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index per sample (0..G-1 in order of sorted group id) and the number of groups G."""
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, uniq.numel()


def segment_sum(values: torch.Tensor, inv: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of `values` [N] per dense group index `inv` [N] -> [G] (same dtype as `values`)."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, inv, values)


def group_extremes(values: torch.Tensor, inv: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 min [G] and max [G] of `values` [N] per dense group index `inv` [N] (equal for a constant group)."""
    v = values.to(torch.float64)  # [N]
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=v.device)  # [G]
    lo = zeros.scatter_reduce(0, inv, v, "amin", include_self=False)
    hi = zeros.scatter_reduce(0, inv, v, "amax", include_self=False)
    return lo, hi


def group_moments(
    values: torch.Tensor, inv: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 mean [G], unbiased std [G] (0 for one sample) and count [G] over dense group index `inv` [N].

    A constant group gets exactly its value as mean and std exactly 0.
    """
    v = values.to(torch.float64)  # [N]
    count = segment_sum(torch.ones_like(v), inv, num_groups)  # [G]
    mean = segment_sum(v, inv, num_groups) / count  # [G]
    # sum/count of equal values can be off by one ulp (3 x 0.1); pin constant groups exactly so
    # their deviations are exactly 0 and normalization cannot blow rounding noise up to +-0.7.
    lo, hi = group_extremes(v, inv, num_groups)
    constant = lo == hi
    mean = torch.where(constant, lo, mean)
    sq = segment_sum((v - mean[inv]) ** 2, inv, num_groups)  # [G]
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    std = torch.where(constant, torch.zeros_like(std), std)
    return mean, std, count


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group mean, unbiased std (n - 1) and size, each broadcast back to the samples: ([N], [N], [N]).

    Mean and std are float32, count int64. A single-sample group has std 0 (the unbiased estimate
    is undefined there); a constant group has std exactly 0 and mean exactly its value.
    """
    n = check_per_sample(group_ids, values=values)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=values.device)
        return empty, empty.clone(), torch.zeros(0, dtype=torch.long, device=values.device)
    inv, g = group_index(group_ids)
    mean, std, count = group_moments(values, inv, g)
    return mean[inv].float(), std[inv].float(), count[inv].long()


def group_count(mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Number of True entries of `mask` [N] in each sample's group, per sample [N] int64."""
    n = check_per_sample(group_ids, mask=mask)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=mask.device)
    inv, g = group_index(group_ids)
    return segment_sum(as_bool_mask("mask", mask).long(), inv, g)[inv]


def group_any(mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per sample [N] bool: True when any sample of its group has `mask` True."""
    return group_count(mask, group_ids) > 0


def group_all(mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per sample [N] bool: True when every sample of its group has `mask` True."""
    return group_count(~as_bool_mask("mask", mask), group_ids) == 0


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Group mean broadcast back per sample [N] in float64, for threshold tests such as `accuracy <= alpha`
    against a Python float. A bool mask gives the group's True fraction."""
    n = check_per_sample(group_ids, values=values)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=values.device)
    inv, g = group_index(group_ids)
    v = values.to(torch.float64)
    return (segment_sum(v, inv, g) / segment_sum(torch.ones_like(v), inv, g))[inv]


def group_rank(mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per sample [N] int64: for a True sample, how many True samples of its group come before it in
    batch order (0 for the earliest); -1 for False samples."""
    n = check_per_sample(group_ids, mask=mask)
    mask = as_bool_mask("mask", mask)
    rank = torch.full((n,), -1, dtype=torch.long, device=mask.device)
    if n == 0 or not bool(mask.any()):
        return rank
    inv, g = group_index(group_ids)
    idx = mask.nonzero().squeeze(1)  # [M] positions of True samples, ascending
    inv_m = inv[idx]  # [M]
    order = torch.argsort(inv_m, stable=True)  # groups contiguous, batch order kept inside a group
    sizes = torch.bincount(inv_m, minlength=g)  # [G]
    starts = torch.cumsum(sizes, 0) - sizes  # [G]
    ranked = torch.arange(idx.numel(), device=mask.device) - starts[inv_m[order]]
    rank[idx[order]] = ranked
    return rank
