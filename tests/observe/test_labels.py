"""Label keys (string values such as `guard/action`): written and read back as strings, skipped by scalar charts."""

from __future__ import annotations

import io
import json
import warnings

import pytest

from lcot_mega.config import LoggingConfig
from lcot_mega.observe import LABEL_KEYS, METRICS_FILE, MetricsLogger, Progress, is_label, metric_series, read_metrics

SKIP = {"guard/action": "skip", "guard/reason": "grad_norm 31 > 10 x median 3", "guard/breaches": 1}


def test_guard_labels_are_labels_and_numbers_are_not():
    assert {"guard/action", "guard/reason"} <= LABEL_KEYS
    assert is_label("guard/action") and not is_label("guard/breaches") and not is_label("reward/mean")


def test_labels_are_json_strings_and_read_back_as_strings(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(1, {"guard/action": "ok", "guard/reason": "", "reward/mean": 0.5})
        logger.log(2, SKIP)
    raw = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert raw[1]["guard/action"] == "skip" and raw[1]["guard/breaches"] == 1.0
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [r["guard/action"] for r in records] == ["ok", "skip"]
    assert records[1]["guard/reason"] == "grad_norm 31 > 10 x median 3"
    assert metric_series(records, "guard/action") == ([1, 2], ["ok", "skip"])
    assert metric_series(records, "guard/breaches") == ([2], [1.0])


def test_resume_keeps_the_labels_of_kept_steps(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(1, SKIP)
        logger.log(2, {"guard/action": "halt"})
    with MetricsLogger(tmp_path, LoggingConfig(), resume_step=1) as logger:
        logger.log(2, {"guard/action": "ok"})
    assert [r["guard/action"] for r in read_metrics(tmp_path / METRICS_FILE)] == ["skip", "ok"]


@pytest.mark.parametrize("key, value", [("guard/action", 3.0), ("guard/reason", None), ("guard/breaches", "1")])
def test_a_label_takes_only_strings_and_a_number_key_no_string(tmp_path, key, value):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger, pytest.raises(TypeError, match=key):
        logger.log(0, {key: value})


def test_tensorboard_skips_labels_and_keeps_the_numbers(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing sink would be dropped with a warning
        with MetricsLogger(tmp_path, LoggingConfig(tensorboard=True)) as logger:
            logger.log(1, SKIP)
            logger.log(2, SKIP | {"guard/breaches": 2})
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["guard/breaches"]
    assert [(e.step, e.value) for e in acc.Scalars("guard/breaches")] == [(1, 1.0), (2, 2.0)]


def test_progress_shows_a_label_as_it_is():
    out = io.StringIO()
    progress = Progress(10, stream=out, keys=("guard/action", "guard/breaches"), clock=lambda: 0.0)
    progress.write(1, SKIP)
    assert out.getvalue().rstrip("\n").endswith("| action skip | breaches 1")
