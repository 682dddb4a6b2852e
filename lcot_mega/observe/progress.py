"""The terminal progress line: step k/N, elapsed time, ETA and a few metrics (pure stdlib).

On a terminal the line is redrawn in place; elsewhere (CI logs, files) each step prints one plain line with
the same content, so logs stay readable.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

__all__ = ["DEFAULT_PROGRESS_KEYS", "Progress", "format_duration", "format_value"]

DEFAULT_PROGRESS_KEYS = ("reward/accuracy", "rollout/response_len_mean", "perf/step_s")
_LABELS = {"reward/accuracy": "acc", "rollout/response_len_mean": "len", "perf/step_s": "s/step"}
_DEFAULT_COLUMNS = 120


def format_duration(seconds: float) -> str:
    """`h:mm:ss` (seconds rounded), '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_value(value: float) -> str:
    """A compact number: integers as such, 3 significant digits below 100, none above."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


class Progress:
    """Shows how far a run is: `step 12/100 | 0:01:23 elapsed | ETA 0:10:02 | acc 0.531 | len 312 | s/step 4.21`.

    The ETA is the mean time per step over the last `window` steps times the steps left; elapsed counts
    from construction. It is a metric sink (`write`/`close`), so `MetricsLogger(extra_sinks=[progress])`
    feeds it; `update` is the same call for use without a logger.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        stream: TextIO | None = None,
        keys: Sequence[str] = DEFAULT_PROGRESS_KEYS,
        *,
        window: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ):
        if total_steps < 1 or not 0 <= start_step <= total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= start_step <= total_steps, got {total_steps} and {start_step}"
            )
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.total, self.keys, self.clock = total_steps, tuple(keys), clock
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = _isatty(self.stream)
        self._start = self._last_time = clock()
        self._last_step = start_step
        self._step_times: collections.deque[float] = collections.deque(maxlen=window)
        self._drawn = False

    def eta_seconds(self, step: int) -> float:
        """Mean recent time per step times the steps left; NaN before any step was timed."""
        if not self._step_times:
            return math.nan
        return sum(self._step_times) / len(self._step_times) * (self.total - step)

    def line(self, step: int, metrics: Mapping[str, float | str], now: float) -> str:
        """The text of one progress line at time `now` (same clock as the constructor's); labels shown as they are."""
        width = len(str(self.total))
        parts = [
            f"step {step:>{width}}/{self.total}",
            f"{format_duration(now - self._start)} elapsed",
            f"ETA {format_duration(self.eta_seconds(step))}",
        ]
        for key in self.keys:
            if key in metrics:
                value = metrics[key]
                shown = value if isinstance(value, str) else format_value(float(value))
                parts.append(f"{_LABELS.get(key, key.rsplit('/', 1)[-1])} {shown}")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, float | str] | None = None) -> None:
        """Record that `step` finished (with its metrics) and redraw."""
        now = self.clock()
        if step > self._last_step:
            # one entry per step, so an update that covers several steps weighs as much as they do
            per_step = (now - self._last_time) / (step - self._last_step)
            self._step_times.extend([per_step] * min(step - self._last_step, self._step_times.maxlen))
        self._last_step, self._last_time = step, now
        text = self.line(step, metrics or {}, now)
        if self.is_tty:
            columns = _columns(self.stream)
            self.stream.write("\r" + text[: columns - 1] + "\x1b[K")  # clear what a longer previous line left
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, step: int, metrics: Mapping[str, float | str]) -> None:
        """The metric-sink form of `update`."""
        self.update(step, metrics)

    def close(self) -> None:
        """End the redrawn line so later output starts on a fresh one."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or _DEFAULT_COLUMNS
    except (AttributeError, OSError, ValueError):  # a fake or redirected stream
        try:
            return int(os.environ.get("COLUMNS", _DEFAULT_COLUMNS))
        except ValueError:
            return _DEFAULT_COLUMNS
