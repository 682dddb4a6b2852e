"""One stability monitor: a metric key, its bounds (absolute, and relative to a running median) and an action.

docs/STABILITY.md says what each monitor watches and why its default is what it is.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lcot_mega.guards.bounds import format_number

if TYPE_CHECKING:
    from lcot_mega.config.schema import MonitorConfig

__all__ = ["MONITOR_KEYS", "NONFINITE", "Action", "Breach", "Limit", "Monitor"]

NONFINITE = "nonfinite"
"""The monitor that looks at every numeric metric of a step for NaN and +-inf (it has no key of its own)."""

MONITOR_KEYS: dict[str, str] = {
    "entropy": "actor/entropy",
    "kl_ref": "actor/kl_loss",
    "kl_old": "actor/ppo_kl",
    "clipfrac": "actor/clipfrac",
    "grad_norm": "actor/grad_norm",
    "response_len": "rollout/response_len_mean",
    "truncation": "rollout/truncated_frac",
    "repetition": "rollout/repetition_frac",
    "logp_gap": "rollout/logp_gap_mean",
    "reward": "reward/mean",
    "staleness": "rollout/staleness_mean",
    "off_policy_masked": "rollout/is_masked_frac",
    "expert_load": "moe/expert_load_max",
    "router_entropy": "moe/router_entropy",
    "replay_mismatch": "moe/replay_mismatch",
}
"""`guards.<name>` config field -> the metric key (docs/METRICS.md) that monitor watches."""


class Action(enum.StrEnum):
    """What a breach asks for, from least to most severe; a step's verdict is the most severe of its breaches.

    A member equals its word (`Action.SKIP == "skip"`, the word of metrics and logs); comparisons order by
    severity, not alphabet.
    """

    OK = "ok"
    LOG = "log"  # recorded in guards.log only
    WARN = "warn"  # recorded and printed
    SKIP = "skip"  # the update is not applied (config word: skip_step)
    ROLLBACK = "rollback"  # restore the last good checkpoint
    HALT = "halt"  # stop the run

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    def __lt__(self, other: object) -> bool:
        return self.severity < _severity(other)

    def __le__(self, other: object) -> bool:
        return self.severity <= _severity(other)

    def __gt__(self, other: object) -> bool:
        return self.severity > _severity(other)

    def __ge__(self, other: object) -> bool:
        return self.severity >= _severity(other)

    @classmethod
    def from_config(cls, action: str) -> Action | None:
        """A MonitorConfig.action as an Action; None for "off"."""
        if action not in _CONFIG_ACTIONS:
            raise ValueError(f"monitor action {action!r} is not one of {list(_CONFIG_ACTIONS)}")
        return _CONFIG_ACTIONS[action]


_SEVERITY = {a: i for i, a in enumerate(Action)}


def _severity(other: object) -> int:
    """The severity of an Action or of its word ("skip"); TypeError for anything else."""
    try:
        return _SEVERITY[Action(other)]
    except ValueError:
        raise TypeError(f"cannot order an Action and {other!r}") from None


_CONFIG_ACTIONS: dict[str, Action | None] = {
    "off": None,
    "log": Action.LOG,
    "warn": Action.WARN,
    "skip_step": Action.SKIP,
    "rollback": Action.ROLLBACK,
    "halt": Action.HALT,
}


@dataclass(frozen=True)
class Limit:
    """One side's bound as a number and as the text a reason shows ("30", "10 x median 3")."""

    threshold: float
    text: str


@dataclass(frozen=True)
class Breach:
    """A metric that left its monitor's bounds."""

    monitor: str
    key: str
    value: float
    bound: str
    """The bound it broke, as text: "> 10 x median 4.2", "< 0.01", "not finite"."""
    action: Action
    pending: bool = False
    """Downgraded to a warning while its monitor's `patience` runs (the action it asks for comes later)."""

    def describe(self) -> str:
        """Short text such as "grad_norm 53.1 > 10 x median 4.2" (the key names a non-finite metric)."""
        label = self.key if self.monitor == NONFINITE else self.monitor
        return f"{label} {format_number(self.value)} {self.bound}"


class Monitor:
    """Bounds on one metric key: `min`/`max`, and `min_ratio`/`max_ratio` times the median of the last `window`
    accepted values once that many are known.

    Ratio bounds apply only while the median is positive (a ratio of a negative or zero median does not say
    "collapse" or "spike"); a metric that can be negative is bounded with `min`/`max`. A non-finite value
    breaches any monitor that has a bound, since it compares false with every number.
    """

    def __init__(self, name: str, key: str, cfg: MonitorConfig):
        action = Action.from_config(cfg.action)
        if action is None:
            raise ValueError(f"monitor {name!r} is off; build only the monitors that are on")
        self.name, self.key, self.cfg, self.action = name, key, cfg, action
        self.history: deque[float] = deque(maxlen=cfg.window)
        """The last `window` accepted finite values, oldest first."""
        self.streak = 0
        """Consecutive steps, up to the last one ended, in which this monitor breached (`Guard.end_step`)."""

    @property
    def bounded(self) -> bool:
        """Whether any bound is configured (full window or not)."""
        c = self.cfg
        return any(b is not None for b in (c.min, c.max, c.min_ratio, c.max_ratio))

    def median(self) -> float | None:
        """Median of the window once it holds `window` values; None before."""
        if len(self.history) < self.cfg.window:
            return None
        return statistics.median(self.history)

    def limits(self) -> tuple[Limit | None, Limit | None]:
        """The (lo, hi) bounds for the next value: the tighter of the absolute and the ratio bound on each side."""
        c, median = self.cfg, self.median()
        ratio_ok = median is not None and median > 0
        lows, highs = [], []
        if c.min is not None:
            lows.append(Limit(c.min, format_number(c.min)))
        if c.max is not None:
            highs.append(Limit(c.max, format_number(c.max)))
        if ratio_ok and c.min_ratio is not None:
            lows.append(Limit(c.min_ratio * median, f"{format_number(c.min_ratio)} x median {format_number(median)}"))
        if ratio_ok and c.max_ratio is not None:
            highs.append(Limit(c.max_ratio * median, f"{format_number(c.max_ratio)} x median {format_number(median)}"))
        lo = max(lows, key=lambda b: b.threshold, default=None)
        hi = min(highs, key=lambda b: b.threshold, default=None)
        return lo, hi

    def breach(self, value: float) -> Breach | None:
        """The breach `value` makes, or None when it is within bounds."""
        if not self.bounded:
            return None
        lo, hi = self.limits()
        if not math.isfinite(value):
            bound = "not finite"
        elif lo is not None and value < lo.threshold:
            bound = f"< {lo.text}"
        elif hi is not None and value > hi.threshold:
            bound = f"> {hi.text}"
        else:
            return None
        patience = self.cfg.patience
        if self.action > Action.WARN and self.streak + 1 < patience:
            bound = f"{bound} ({self.streak + 1} of {patience} steps in a row)"
            return Breach(self.name, self.key, value, bound, Action.WARN, pending=True)
        return Breach(self.name, self.key, value, bound, self.action)

    def accept(self, value: float) -> None:
        """Add the value of a step whose update was kept (non-finite values are not history)."""
        if math.isfinite(value):
            self.history.append(value)

    def load_history(self, values: Iterable[float]) -> None:
        """Replace the window (its newest `window` values are kept if the window shrank)."""
        self.history.clear()
        for value in values:
            self.accept(float(value))
