"""Batch statistics of the advantage / selection stages as plain floats for the metric sinks.

Keys (stable):
- `reward/accuracy`: fraction of correct samples.
- `adv/zero_frac_samples`, `adv/zero_frac_groups`: share of samples / groups with |a| <= tol
  (a group counts when all its samples do; GRPO's data inefficiency, Mu et al. 2025 claim 2).
- `adv/mean`, `adv/abs_mean`: mean of a and of |a|.
- `polarity/pos_count`, `polarity/neg_count`, `polarity/zero_count`: samples with a > tol, a < -tol, else.
- `polarity/pos_share`, `polarity/neg_share`: each polarity's share of the |a| mass of the positive
  plus negative samples (they sum to 1 when any sample has signal; both 0 otherwise).
- with `keep`: `polarity/kept_pos_count`, `polarity/kept_neg_count`, `polarity/kept_zero_count`,
  `polarity/kept_pos_share`, `polarity/kept_neg_share` over the kept samples, and `select/kept_frac`.
An empty batch gives 0.0 for every key.
"""

from __future__ import annotations

import torch

from lcot_mega.algo._checks import as_bool_mask
from lcot_mega.algo.groups import check_per_sample, group_index, segment_sum

__all__ = ["KEEP_METRIC_KEYS", "METRIC_KEYS", "batch_metrics"]

METRIC_KEYS = (
    "reward/accuracy",
    "adv/zero_frac_samples",
    "adv/zero_frac_groups",
    "adv/mean",
    "adv/abs_mean",
    "polarity/pos_count",
    "polarity/neg_count",
    "polarity/zero_count",
    "polarity/pos_share",
    "polarity/neg_share",
)
"""Keys `batch_metrics` always returns."""

KEEP_METRIC_KEYS = (
    "polarity/kept_pos_count",
    "polarity/kept_neg_count",
    "polarity/kept_zero_count",
    "polarity/kept_pos_share",
    "polarity/kept_neg_share",
    "select/kept_frac",
)
"""Keys `batch_metrics` adds when given `keep`."""


def _polarity(adv: torch.Tensor, tol: float, prefix: str) -> dict[str, float]:
    """Counts and |a|-mass shares of positive (a > tol), negative (a < -tol) and zero samples of `adv` [M]."""
    pos, neg = adv > tol, adv < -tol
    pos_mass, neg_mass = float(adv[pos].sum()), float(-adv[neg].sum())
    mass = pos_mass + neg_mass
    return {
        f"polarity/{prefix}pos_count": float(pos.sum()),
        f"polarity/{prefix}neg_count": float(neg.sum()),
        f"polarity/{prefix}zero_count": float((~pos & ~neg).sum()),
        f"polarity/{prefix}pos_share": pos_mass / mass if mass > 0 else 0.0,
        f"polarity/{prefix}neg_share": neg_mass / mass if mass > 0 else 0.0,
    }


def _mean(t: torch.Tensor) -> float:
    return float(t.to(torch.float64).mean()) if t.numel() else 0.0


def batch_metrics(
    advantages: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    keep: torch.Tensor | None = None,
    tol: float = 1e-8,
    update_advantages: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy, zero-advantage fractions and polarity counts/shares of a batch (keys in the module docstring).

    `update_advantages` [N]: the advantages the update trains with when they differ from the group-normalized
    ones (`weighted` polarity); the kept samples' polarity is reported from them, what the update is made of."""
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    tensors = {"advantages": advantages, "correct": correct}
    if keep is not None:
        tensors["keep"] = keep
    n = check_per_sample(group_ids, **tensors)
    correct = as_bool_mask("correct", correct)
    adv = advantages.to(torch.float64)  # [N]
    zero = adv.abs() <= tol  # [N]
    out = {
        "reward/accuracy": _mean(correct),
        "adv/zero_frac_samples": _mean(zero),
        "adv/zero_frac_groups": 0.0,
        "adv/mean": _mean(adv),
        "adv/abs_mean": _mean(adv.abs()),
        **_polarity(adv, tol, ""),
    }
    if n:
        inv, g = group_index(group_ids)
        signal_per_group = segment_sum((~zero).long(), inv, g)  # [G]
        out["adv/zero_frac_groups"] = float((signal_per_group == 0).double().mean())
    if keep is not None:
        keep = as_bool_mask("keep", keep)
        trained = adv if update_advantages is None else update_advantages.to(torch.float64)  # [N]
        out.update(_polarity(trained[keep], tol, "kept_"))
        out["select/kept_frac"] = _mean(keep)
    return out
