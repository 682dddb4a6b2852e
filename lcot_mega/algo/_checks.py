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


def as_bool_mask(name: str, t: torch.Tensor, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """`t` as bool; integer or float masks must hold only 0 and 1 (anything else is a bug upstream)."""
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"shape mismatch: {name} {tuple(t.shape)} vs tokens {tuple(shape)}")
    if t.dtype == torch.bool:
        return t
    check_finite(name, t)
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name} must be a bool mask (or hold only 0/1), got other values")
    return t != 0


def masked_finite(name: str, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reject NaN/Inf where `mask` is true; return `t` with padding replaced by 0 (a new tensor).

    Padding may hold garbage; zeroing it first keeps it out of both values and gradients.
    """
    clean = torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))
    check_finite(name, clean)  # on the zero-padded copy: no data-dependent shape as with t[mask]
    return clean


def require_2d(**tensors: torch.Tensor) -> None:
    """Token tensors are [B, T]."""
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(t.shape)}")


def count(x: torch.Tensor) -> torch.Tensor:
    """Number of true entries as float32 (bf16 cannot count past 256 exactly)."""
    return x.sum().to(torch.float32)
