"""Reading metrics.jsonl back: series per key, null as NaN, a torn last line skipped."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lcot_mega.config import LoggingConfig
from lcot_mega.observe import METRICS_FILE, MetricsLogger, metric_series, read_metrics


def test_round_trip_and_series(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(0, {"reward/accuracy": 0.1, "perf/step_s": 3.0})
        logger.log(1, {"perf/step_s": math.inf})
        logger.log(2, {"reward/accuracy": 0.3})
        records = read_metrics(tmp_path / METRICS_FILE)  # while the run is live
    assert [r["step"] for r in records] == [0, 1, 2]
    assert metric_series(records, "reward/accuracy") == ([0, 2], [0.1, 0.3])
    steps, values = metric_series(records, "perf/step_s")
    assert steps == [0, 1] and values[0] == 3.0 and math.isnan(values[1])
    assert metric_series(records, "eval/x/accuracy") == ([], [])


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "time": 1.0, "a/b": 1.0}\n{"step": 1, "ti')
    assert read_metrics(path) == [{"step": 0, "time": 1.0, "a/b": 1.0}]


def test_damaged_line_before_the_last_raises(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_empty_file_has_no_records(tmp_path):
    (tmp_path / METRICS_FILE).write_text("")
    assert read_metrics(tmp_path / METRICS_FILE) == []


def test_reading_metrics_needs_neither_torch_nor_the_optional_sinks():
    heavy = ("torch", "tensorboard", "wandb")
    code = f"import sys, lcot_mega.observe; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
