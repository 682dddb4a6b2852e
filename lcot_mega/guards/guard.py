"""Guard: every monitor of `GuardsConfig`, the update bounds it gives the actor, and each step's verdict.

The driver's use, once per step: `update_bounds()` before the actor's update (skip_step monitors reject the
update on every rank alike), `check()` on the step's metrics, `accept()` only when the update was kept (ok,
log, warn), so a spike never enters the median it is judged against. `state_dict()` travels with the
checkpoint, so a resumed run judges its next step exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lcot_mega.guards.bounds import UpdateBounds, as_number
from lcot_mega.guards.monitor import MONITOR_KEYS, NONFINITE, Action, Breach, Monitor

if TYPE_CHECKING:
    from lcot_mega.config.schema import GuardsConfig

__all__ = ["NONFINITE_EXEMPT", "Guard", "Verdict"]

NONFINITE_EXEMPT = frozenset({"rollout/groups_per_kept_group"})
"""Keys whose +inf is a value, not a numerical failure (groups generated / groups kept, when none was kept)."""

_REASON_BREACHES = 2
"""Breaches named in `guard/reason`; the rest are counted ("+3 more") and all are in guards.log."""


@dataclass(frozen=True)
class Verdict:
    """What one step's metrics ask for: the most severe action of its breaches (ok when there is none)."""

    step: int
    breaches: tuple[Breach, ...] = ()

    @property
    def action(self) -> Action:
        return max((b.action for b in self.breaches), default=Action.OK)

    @property
    def keeps_update(self) -> bool:
        """True for ok/log/warn: the update stands and the step's values join the windows (`Guard.accept`)."""
        return self.action <= Action.WARN

    @property
    def suspect(self) -> bool:
        """A breach is waiting out its monitor's `patience`: the step is kept, but confirms no checkpoint good."""
        return any(b.pending for b in self.breaches)

    def reason(self) -> str:
        """The most severe breaches, short: "grad_norm 53.1 > 10 x median 4.2"; "" when ok."""
        ranked = sorted(self.breaches, key=lambda b: -b.action.severity)
        text = "; ".join(b.describe() for b in ranked[:_REASON_BREACHES])
        more = len(ranked) - _REASON_BREACHES
        return f"{text} (+{more} more)" if more > 0 else text

    def metrics(self) -> dict[str, float | str]:
        """`guard/action` and `guard/reason` (labels, docs/METRICS.md) and the `guard/breaches` count."""
        return {
            "guard/action": str(self.action),
            "guard/reason": self.reason(),
            "guard/breaches": float(len(self.breaches)),
        }


class Guard:
    """The monitors of `cfg` that are on; all inert when `cfg.enabled` is False (no bounds, every verdict ok)."""

    def __init__(self, cfg: GuardsConfig):
        self.cfg = cfg
        self.monitors: list[Monitor] = []
        self.nonfinite_action: Action | None = None
        if not cfg.enabled:
            return
        for name, key in MONITOR_KEYS.items():
            monitor_cfg = getattr(cfg, name)
            if Action.from_config(monitor_cfg.action) is not None:
                self.monitors.append(Monitor(name, key, monitor_cfg))
        self.nonfinite_action = Action.from_config(cfg.nonfinite.action)

    def update_bounds(self) -> UpdateBounds:
        """Bounds for this step's update from every skip_step monitor (ratio bounds once their window is full)."""
        bounds = {}
        for m in self.monitors:
            if m.action is Action.SKIP and m.bounded and m.streak + 1 >= m.cfg.patience:
                lo, hi = m.limits()
                bounds[m.key] = (None if lo is None else lo.threshold, None if hi is None else hi.threshold)
        return UpdateBounds(bounds, reject_nonfinite=self.nonfinite_action is Action.SKIP)

    def check(self, step: int, metrics: Mapping[str, object]) -> Verdict:
        """Every monitor on this step's metrics; keys a step lacks are not judged. History is not changed."""
        breaches = []
        for m in self.monitors:
            value = as_number(metrics.get(m.key))
            breach = None if value is None else m.breach(value)
            if breach is not None:
                breaches.append(breach)
        if self.nonfinite_action is not None:
            breaches.extend(self._nonfinite(metrics, self.nonfinite_action))
        return Verdict(step, tuple(breaches))

    def accept(self, metrics: Mapping[str, object]) -> None:
        """Add a kept step's values to the monitors' windows."""
        for m in self.monitors:
            value = as_number(metrics.get(m.key))
            if value is not None:
                m.accept(value)

    def end_step(self, verdict: Verdict) -> None:
        """Count the step's breaches towards each monitor's `patience` (once per step, with its final verdict)."""
        breached = {b.monitor for b in verdict.breaches}
        for m in self.monitors:
            m.streak = m.streak + 1 if m.name in breached else 0

    def state_dict(self) -> dict[str, Any]:
        """The windows and breach streaks, JSON-serializable (non-finite values never enter the windows)."""
        return {
            "windows": {m.name: list(m.history) for m in self.monitors},
            "streaks": {m.name: m.streak for m in self.monitors},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the windows and streaks; monitors missing from `state` start empty, unknown names are ignored."""
        windows, streaks = state.get("windows", {}), state.get("streaks", {})
        for m in self.monitors:
            m.load_history(windows.get(m.name, ()))
            m.streak = int(streaks.get(m.name, 0))

    @staticmethod
    def _nonfinite(metrics: Mapping[str, object], action: Action) -> list[Breach]:
        out = []
        for key, raw in metrics.items():
            value = as_number(raw)
            if value is not None and not math.isfinite(value) and key not in NONFINITE_EXEMPT:
                out.append(Breach(NONFINITE, key, value, "not finite", action))
        return out
