"""Stability guards (docs/STABILITY.md): watch each step's metrics, and decide whether the run goes on, skips the
update, rolls back or halts. Pure python: the decisions are made here, the driver carries them out.
"""

from lcot_mega.guards.bounds import UpdateBounds
from lcot_mega.guards.guard import NONFINITE_EXEMPT, Guard, Verdict
from lcot_mega.guards.log import GUARD_LOG_FILE, GuardLog
from lcot_mega.guards.monitor import MONITOR_KEYS, NONFINITE, Action, Breach, Monitor

__all__ = [
    "GUARD_LOG_FILE",
    "MONITOR_KEYS",
    "NONFINITE",
    "NONFINITE_EXEMPT",
    "Action",
    "Breach",
    "Guard",
    "GuardLog",
    "Monitor",
    "UpdateBounds",
    "Verdict",
]
