"""Reward shaping on per-sample tensors: relative length reward and DAPO's soft overlong punishment."""

from __future__ import annotations

import torch

from lcot_mega.algo._checks import as_bool_mask, check_finite
from lcot_mega.algo.groups import check_per_sample, group_index, segment_sum

__all__ = ["overlong_penalty", "relative_length_reward"]


def _check_lengths(lengths: torch.Tensor) -> None:
    if lengths.dtype == torch.bool:
        raise ValueError("lengths must be a numeric tensor of token counts, got bool")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError("lengths must be non-negative token counts")


def relative_length_reward(
    rewards: torch.Tensor,
    correct: torch.Tensor,
    lengths: torch.Tensor,
    group_ids: torch.Tensor,
    corr_ratio: float = 0.75,
    length_base: float = 500.0,
    lower: float = -0.5,
    upper: float = 1.0,
) -> torch.Tensor:
    """Rewards [N] float32 with the relative length bonus of Mu et al. (2025, study code; from DeepScaleR).

    In a group whose accuracy (fraction correct) is >= `corr_ratio`, each correct sample i gets
    `r_i += clip((mean length of the group's correct samples - len_i) / length_base, lower, upper)`:
    shorter-than-average correct answers gain, longer ones lose. Incorrect samples and groups below
    `corr_ratio` are unchanged.
    """
    if not 0.0 <= corr_ratio <= 1.0:
        raise ValueError(f"corr_ratio must be in [0, 1], got {corr_ratio}")
    if not length_base > 0:
        raise ValueError(f"length_base must be > 0, got {length_base}")
    if not lower <= upper:
        raise ValueError(f"lower must be <= upper, got lower={lower}, upper={upper}")
    n = check_per_sample(group_ids, rewards=rewards, correct=correct, lengths=lengths)
    correct = as_bool_mask("correct", correct)
    _check_lengths(lengths)
    out = rewards.to(torch.float32)
    if n == 0:
        return out.clone()
    inv, g = group_index(group_ids)
    c = correct.to(torch.float64)  # [N]
    size = segment_sum(torch.ones_like(c), inv, g)  # [G]
    n_correct = segment_sum(c, inv, g)  # [G]
    mean_len = segment_sum(lengths.to(torch.float64) * c, inv, g) / n_correct.clamp(min=1)  # [G]
    eligible = correct & ((n_correct / size) >= corr_ratio)[inv]  # [N]
    bonus = ((mean_len[inv] - lengths.to(torch.float64)) / length_base).clamp(lower, upper)  # [N]
    return torch.where(eligible, out.to(torch.float64) + bonus, out.to(torch.float64)).float()


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> torch.Tensor:
    """Soft overlong punishment of DAPO (Yu et al. 2025, eq. 13), the value [N] float32 to ADD to rewards.

    With L_max = `max_len` and L_cache = `buffer_len`: 0 for len <= L_max - L_cache, a linear ramp
    `-penalty_factor * (len - (L_max - L_cache)) / L_cache` inside the buffer, and `-penalty_factor`
    for len > L_max (the ramp reaches it at len == L_max). `buffer_len` must be in (0, max_len].
    """
    if not max_len > 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be a flat per-sample tensor [N], got shape {tuple(lengths.shape)}")
    check_finite("lengths", lengths)
    _check_lengths(lengths)
    start = max_len - buffer_len
    ramp = ((lengths.to(torch.float64) - start) / buffer_len).clamp(0.0, 1.0)  # [N], 1 from len == max_len on
    return (-penalty_factor * ramp).float()
