"""UpdateBounds: the limits an update's metrics must respect for the optimizer step to be applied.

The driver gets them from `Guard.update_bounds()` and hands them to the actor, which checks them between
backward and the optimizer step. The metrics are reduced over every rank first, so every rank takes the same
decision. Pure python (no torch), so the bounds pickle to Ray actors and remote ranks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["UpdateBounds", "as_number", "format_number"]


def as_number(value: object) -> float | None:
    """`value` as a float when it is a number (int, float, numpy scalar, 0-dim tensor); None for labels and the rest."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str | bytes) or not hasattr(value, "__float__"):
        return None
    try:
        return float(value)  # a 0-dim tensor; a larger one raises and is not a metric
    except (TypeError, ValueError, RuntimeError):
        return None


def format_number(value: float) -> str:
    """Three significant digits, as the guard's reasons and log lines show values and bounds."""
    return f"{value:.3g}"


@dataclass(frozen=True)
class UpdateBounds:
    """Metric key -> (lo, hi) bounds of one step's update; None on a side means unbounded there."""

    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    reject_nonfinite: bool = False
    """Reject the update when any metric is NaN or +-inf, bounded or not."""

    def __post_init__(self) -> None:
        for key, (lo, hi) in self.bounds.items():
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"bounds of {key!r}: lo {lo} > hi {hi}")

    def rejects(self, metrics: Mapping[str, object]) -> list[str]:
        """Why the update must not be applied (one reason per broken bound); empty means apply it.

        A bounded key that is NaN or +-inf always rejects (a comparison with NaN is false, so it would pass
        every bound otherwise); keys absent from `metrics` and non-numeric values are ignored.
        """
        reasons = []
        for key, (lo, hi) in self.bounds.items():
            value = as_number(metrics.get(key))
            if value is None:
                continue
            if not math.isfinite(value):
                reasons.append(f"{key} {value} is not finite")
            elif lo is not None and value < lo:
                reasons.append(f"{key} {format_number(value)} < {format_number(lo)}")
            elif hi is not None and value > hi:
                reasons.append(f"{key} {format_number(value)} > {format_number(hi)}")
        if self.reject_nonfinite:
            for key, raw in metrics.items():
                value = as_number(raw)
                if key not in self.bounds and value is not None and not math.isfinite(value):
                    reasons.append(f"{key} {value} is not finite")
        return reasons
