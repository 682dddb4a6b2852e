"""Truncated importance sampling for the mismatch between rollout-engine and trainer log-probs."""

from __future__ import annotations

import math

import torch

from lcot_mega.algo._checks import as_bool_mask, check_same_shape, count, masked_finite, require_2d

_MODES = ("token", "sequence")


@torch.no_grad()
def importance_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 2.0,
    mode: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated IS weights min(pi_old / pi_rollout, cap) (TIS, Yao et al. 2025, "Your Efficient RL Framework
    Secretly Brings You Off-Policy RL Training").

    Returns weights [B, T] (detached, 0 at padding) to pass to `policy_loss(is_weights=...)`, and metrics.
    `mode="token"`: per-token ratio. `mode="sequence"`: the product of the sequence's token ratios
    (exp of the summed log gap), capped, broadcast to its tokens. Only the top is truncated; weights
    below 1 are kept. `rollout/is_capped_frac` is the fraction of masked tokens whose weight hit the cap.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {list(_MODES)}")
    if not cap >= 1.0:
        raise ValueError(f"cap must be >= 1 (a cap below 1 would down-weight every token), got {cap}")
    require_2d(old_logp=old_logp)
    check_same_shape(old_logp=old_logp, rollout_logp=rollout_logp)
    mask = as_bool_mask("mask", mask, old_logp.shape)
    gap = masked_finite("old_logp", old_logp, mask) - masked_finite("rollout_logp", rollout_logp, mask)  # [B, T]
    log_w = gap if mode == "token" else gap.sum(-1, keepdim=True).expand_as(gap)  # [B, T]
    capped = log_w > math.log(cap)  # [B, T]
    # clamp in log space: exp of a large gap would overflow before the cap is applied
    weights = torch.where(mask, log_w.clamp_max(math.log(cap)).exp(), 0.0)  # [B, T]

    n = count(mask).clamp_min(1)
    abs_gap = gap.abs()  # [B, T], 0 at padding
    values = torch.stack(
        [
            weights.sum(dtype=torch.float32) / n,
            count(capped & mask) / n,
            abs_gap.sum(dtype=torch.float32) / n,
            abs_gap.amax().to(torch.float32) if abs_gap.numel() else n.new_zeros(()),
        ]
    ).tolist()
    names = ("rollout/is_weight_mean", "rollout/is_capped_frac", "rollout/logp_gap_mean", "rollout/logp_gap_max")
    return weights, dict(zip(names, values, strict=True))
