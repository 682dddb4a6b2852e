"""The progress line: plain lines off a terminal, one redrawn line on it, ETA from recent step times."""

from __future__ import annotations

import io
import math

import pytest

from lcot_mega.config import LoggingConfig
from lcot_mega.observe import MetricsLogger, Progress
from lcot_mega.observe.progress import format_duration, format_value


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


METRICS = {"reward/accuracy": 0.53125, "rollout/response_len_mean": 312.4, "perf/step_s": 4.2134, "x/y": 1.0}


def test_plain_stream_gets_one_line_per_step_with_elapsed_eta_and_metrics():
    clock, out = Clock(), io.StringIO()
    progress = Progress(10, stream=out, clock=clock)
    clock.t = 104.0
    progress.update(1, METRICS)
    clock.t = 110.0
    progress.update(3, {"reward/accuracy": 0.5})  # covers steps 2 and 3: 3 s each
    progress.close()
    # ETA after step 1: 4 s/step * 9 left = 36 s; after step 3: mean(4, 3, 3) * 7 = 23.3 s
    assert out.getvalue().splitlines() == [
        "step  1/10 | 0:00:04 elapsed | ETA 0:00:36 | acc 0.531 | len 312 | s/step 4.21",
        "step  3/10 | 0:00:10 elapsed | ETA 0:00:23 | acc 0.5",
    ]


def test_eta_uses_only_the_last_window_steps_and_counts_from_the_start_step():
    clock = Clock(0.0)
    progress = Progress(100, start_step=40, stream=io.StringIO(), window=2, clock=clock)
    assert math.isnan(progress.eta_seconds(40))
    for step, t in ((41, 10.0), (42, 12.0), (43, 13.0)):
        clock.t = t
        progress.update(step)
    assert progress.eta_seconds(43) == pytest.approx((2.0 + 1.0) / 2 * 57)  # the 10 s first step fell out
    assert progress.line(43, {}, 13.0) == "step  43/100 | 0:00:13 elapsed | ETA 0:01:26"


def test_terminal_gets_one_redrawn_line_cut_to_its_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    clock, tty = Clock(), FakeTTY()
    progress = Progress(5, stream=tty, clock=clock)
    assert progress.is_tty
    for step in (1, 2):
        clock.t += 2.0
        progress.update(step, METRICS)
    text = tty.getvalue()
    assert "\n" not in text
    draws = text.split("\r")[1:]
    assert len(draws) == 2 and all(d.endswith("\x1b[K") for d in draws)
    # 2 s per step, 3 steps left: ETA 0:00:06, cut to 40 - 1 columns so the terminal never wraps it
    assert draws[1] == "step 2/5 | 0:00:04 elapsed | ETA 0:00:0" + "\x1b[K"
    progress.close()
    assert tty.getvalue().endswith("\x1b[K\n")
    progress.close()  # a second close adds nothing
    assert tty.getvalue().count("\n") == 1


def test_progress_is_a_metric_sink_of_the_logger(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path, LoggingConfig(), extra_sinks=[Progress(3, stream=out)]) as logger:
        logger.log(1, {"reward/accuracy": 0.25})
    assert out.getvalue().startswith("step 1/3 | ") and out.getvalue().endswith("| acc 0.25\n")


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.0, "3"), (0.53125, "0.531"), (4.2134, "4.21"), (312.4, "312"), (1.5e-5, "1.5e-05"), (math.nan, "nan")],
)
def test_format_value_is_compact(value, text):
    assert format_value(value) == text


def test_format_duration():
    assert format_duration(0.4) == "0:00:00"
    assert format_duration(3725.6) == "1:02:06"
    assert format_duration(math.nan) == "?"


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="start_step"):
        Progress(10, start_step=11)
    with pytest.raises(ValueError, match="window"):
        Progress(10, window=0)
