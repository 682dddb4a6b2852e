"""MetricsLogger and the JSONL file: content, flushing, NaN, key checks, resume after a crash."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from lcot_mega.config import LoggingConfig
from lcot_mega.observe import METRICS_FILE, MetricsLogger, read_metrics


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        self.t += 0.5
        return self.t


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_each_step_is_one_flushed_json_line_readable_while_open(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(), clock=FakeClock()) as logger:
        logger.log(1, {"reward/accuracy": 0.25, "rollout/rounds": 2, "actor/entropy": torch.tensor(1.5)})
        assert lines(tmp_path) == [
            {"step": 1, "time": 1000.5, "reward/accuracy": 0.25, "rollout/rounds": 2.0, "actor/entropy": 1.5}
        ]
        logger.log(2, {"reward/accuracy": np.float32(0.5)})
        assert [r["step"] for r in lines(tmp_path)] == [1, 2]
        assert logger.last_step == 2
    assert logger.path == tmp_path / METRICS_FILE


def test_values_are_python_floats(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(0, {"a/int": 3, "a/bool": True, "a/tensor": torch.tensor(2, dtype=torch.int64)})
    record = lines(tmp_path)[0]
    assert all(type(record[k]) is float for k in ("a/int", "a/bool", "a/tensor"))
    assert type(record["time"]) is float


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(0, {"a/nan": math.nan, "a/inf": torch.tensor(-math.inf), "a/ok": 1.0})
    text = (tmp_path / METRICS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)  # strict JSON
    assert record["a/nan"] is None and record["a/inf"] is None and record["a/ok"] == 1.0
    back = read_metrics(tmp_path / METRICS_FILE)[0]
    assert math.isnan(back["a/nan"]) and math.isnan(back["a/inf"])


@pytest.mark.parametrize(
    "key", ["accuracy", "Reward/accuracy", "reward/", "/reward", "reward//mean", "reward/acc-uracy", "reward/acc ", 3]
)
def test_malformed_key_is_rejected_before_anything_is_written(tmp_path, key):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        with pytest.raises(ValueError, match="group/name"):
            logger.log(0, {"reward/mean": 1.0, key: 1.0})
        assert (tmp_path / METRICS_FILE).read_text() == ""
        logger.log(0, {"eval/aime_2024/pass@8": 0.5, "perf/rollout_tok_s": 1.0})  # the step is still free


@pytest.mark.parametrize("value", [torch.ones(2), torch.ones(1), "1.0", None])
def test_value_that_is_not_a_scalar_is_rejected(tmp_path, value):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger, pytest.raises((TypeError, ValueError), match="a/b"):
        logger.log(0, {"a/b": value})


def test_steps_must_increase(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(3, {"a/b": 1.0})
        for step in (3, 2):
            with pytest.raises(ValueError, match="not after the last logged step 3"):
                logger.log(step, {"a/b": 1.0})
        with pytest.raises(ValueError, match="int >= 0"):
            logger.log(-1, {"a/b": 1.0})
        with pytest.raises(ValueError, match="int >= 0"):
            logger.log(4.0, {"a/b": 1.0})
        logger.log(np.int64(4), {"a/b": 1.0})
    assert [r["step"] for r in lines(tmp_path)] == [3, 4]


def test_a_new_run_starts_the_file_anew(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(0, {"a/b": 1.0})
    with pytest.warns(UserWarning, match="not a resume"), MetricsLogger(tmp_path, LoggingConfig()) as logger:
        logger.log(0, {"a/b": 2.0})
    assert [r["a/b"] for r in lines(tmp_path)] == [2.0]


def run_steps(logger: MetricsLogger, steps: range) -> None:
    for k in steps:
        logger.log(k, {"reward/accuracy": k / 10, "perf/step_s": 1.0 + k})


def test_resume_keeps_steps_up_to_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    with MetricsLogger(whole, LoggingConfig()) as logger:
        run_steps(logger, range(10))
    with MetricsLogger(crashed, LoggingConfig()) as logger:
        run_steps(logger, range(8))  # the run dies after step 7; its last checkpoint is step 5
    with MetricsLogger(crashed, LoggingConfig(), resume_step=5) as logger:
        assert [r["step"] for r in lines(crashed)] == list(range(6))
        assert logger.last_step == 5
        with pytest.raises(ValueError, match="not after"):
            logger.log(5, {"a/b": 1.0})
        run_steps(logger, range(6, 10))

    def strip_time(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    assert strip_time(lines(crashed)) == strip_time(lines(whole))


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig()) as logger:
        run_steps(logger, range(4))
    path = tmp_path / METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 4, "time": 1.0, "reward/accur')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        logger = MetricsLogger(tmp_path, LoggingConfig(), resume_step=10)
    with logger:
        assert [r["step"] for r in lines(tmp_path)] == [0, 1, 2, 3]
        logger.log(4, {"reward/accuracy": 0.4})
    assert [r["step"] for r in lines(tmp_path)] == [0, 1, 2, 3, 4]


def test_resume_keeps_a_complete_last_record_that_lacks_its_newline(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "time": 1.0, "a/b": 1.0}\n{"step": 1, "time": 2.0, "a/b": null}')
    with MetricsLogger(tmp_path, LoggingConfig(), resume_step=1) as logger:
        logger.log(2, {"a/b": 3.0})
    assert [r["step"] for r in lines(tmp_path)] == [0, 1, 2]


def test_resume_refuses_a_damaged_line_before_the_last(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "time": 1.0}\ngarbage\n{"step": 2, "time": 1.0}\n')
    with pytest.raises(ValueError, match="line 2"):
        MetricsLogger(tmp_path, LoggingConfig(), resume_step=5)
    assert path.read_text().count("\n") == 3  # untouched


def test_resume_of_a_run_without_a_metrics_file(tmp_path):
    with MetricsLogger(tmp_path / "new", LoggingConfig(), resume_step=3) as logger:
        assert logger.last_step is None
        logger.log(4, {"a/b": 1.0})
    assert [r["step"] for r in lines(tmp_path / "new")] == [4]


class ExplodingSink:
    def __init__(self):
        self.closed = False

    def write(self, step, metrics):
        raise RuntimeError("dashboard down")

    def close(self):
        self.closed = True


class RecordingSink:
    def __init__(self):
        self.calls, self.closed = [], False

    def write(self, step, metrics):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def test_a_failing_optional_sink_is_dropped_and_the_run_goes_on(tmp_path):
    bad, good = ExplodingSink(), RecordingSink()
    with MetricsLogger(tmp_path, LoggingConfig(), extra_sinks=[bad, good]) as logger:
        with pytest.warns(UserWarning, match="ExplodingSink failed at step 0"):
            logger.log(0, {"a/b": torch.tensor(1.0)})
        logger.log(1, {"a/b": 2.0})
    assert bad.closed and good.closed
    assert good.calls == [(0, {"a/b": 1.0}), (1, {"a/b": 2.0})]
    assert [r["step"] for r in lines(tmp_path)] == [0, 1]


def test_missing_optional_packages_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"logging\.tensorboard=false"):
        MetricsLogger(tmp_path, LoggingConfig(tensorboard=True))
    with pytest.raises(ImportError, match=r"logging\.wandb=disabled"):
        MetricsLogger(tmp_path, LoggingConfig(wandb="offline"))
