"""Input checks shared by the RL math: fail loudly on NaN/Inf and shape mismatches, never compute on them."""

from __future__ import annotations

import torch


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError naming `name` when `t` holds NaN or Inf (a poisoned reward or log-prob)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); refusing to compute on it")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError when the named tensors do not all have the same shape."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def check_group_ids(group_ids: torch.Tensor, n: int) -> None:
    """Group ids must be a 1-D integer tensor of length n with non-negative values."""
    if group_ids.dim() != 1 or group_ids.numel() != n:
        raise ValueError(f"group_ids must be 1-D with {n} entries, got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if n and int(group_ids.min()) < 0:
        raise ValueError("group_ids must be non-negative")
