"""guards.log: one human-readable line per step the guards flagged, and per recovery the driver took.

`metrics.jsonl` carries the short `guard/reason`; this file has every breach with its value and bound, and
the events in between (rollback, halt), so a run's stability story reads top to bottom. It is only ever
appended to, one flushed line per write, so it survives crashes and resumes whole.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from lcot_mega.guards.bounds import format_number
from lcot_mega.guards.guard import Verdict
from lcot_mega.guards.monitor import Action, Breach

__all__ = ["GUARD_LOG_FILE", "GuardLog"]

GUARD_LOG_FILE = "guards.log"


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _breach_text(b: Breach) -> str:
    return f"{b.monitor} {b.key}={format_number(b.value)} {b.bound} [{b.action}]"


def _one_line(text: str) -> str:
    return " ".join(text.split())


class GuardLog:
    """Appends to `<run_dir>/guards.log`: `2026-11-25T07:30:00Z step 12 skip: grad_norm actor/grad_norm=53.1 ...`."""

    def __init__(self, run_dir: str | os.PathLike, clock: Callable[[], float] = time.time):
        self.path = Path(run_dir) / GUARD_LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run)

    def write(self, step: int, verdict: Verdict) -> None:
        """One line for a flagged step, each breach with its value, bound and action; nothing for an ok step."""
        if verdict.action is Action.OK:
            return
        self._write(step, str(verdict.action), "; ".join(_breach_text(b) for b in verdict.breaches))

    def event(self, step: int, message: str) -> None:
        """A recovery the driver took: "rolled back to step 20, lr x0.5", "halted: 4th rollback"."""
        self._write(step, "event", _one_line(message))

    def _write(self, step: int, kind: str, text: str) -> None:
        self._file.write(f"{_timestamp(self.clock())} step {step} {kind}: {text}\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> GuardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
