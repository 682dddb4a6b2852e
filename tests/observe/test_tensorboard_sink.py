"""TensorBoard events: readable back with the logged steps and values, and purged past the resume step."""

from __future__ import annotations

import math

import pytest

from lcot_mega.config import LoggingConfig
from lcot_mega.observe import MetricsLogger

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_events_hold_the_logged_steps_and_values(tmp_path):
    cfg = LoggingConfig(tensorboard=True)
    with MetricsLogger(tmp_path, cfg) as logger:
        logger.log(1, {"reward/accuracy": 0.25, "actor/grad_norm": math.nan})
        logger.log(2, {"reward/accuracy": 0.5})
        assert scalars(tmp_path / "tensorboard")["reward/accuracy"] == [(1, 0.25), (2, 0.5)]  # flushed per step
    got = scalars(tmp_path / "tensorboard")
    assert got["reward/accuracy"] == [(1, 0.25), (2, 0.5)]
    [(step, value)] = got["actor/grad_norm"]
    assert step == 1 and math.isnan(value)


def test_resume_purges_events_after_the_checkpoint(tmp_path):
    cfg = LoggingConfig(tensorboard=True)
    with MetricsLogger(tmp_path, cfg) as logger:
        for k in range(8):
            logger.log(k, {"perf/step_s": float(k)})
    with MetricsLogger(tmp_path, cfg, resume_step=4) as logger:
        for k in range(5, 10):
            logger.log(k, {"perf/step_s": 100.0 + k})
    expected = [(k, float(k)) for k in range(5)] + [(k, 100.0 + k) for k in range(5, 10)]
    assert scalars(tmp_path / "tensorboard")["perf/step_s"] == expected


def test_a_new_run_in_the_same_directory_hides_the_old_events(tmp_path):
    cfg = LoggingConfig(tensorboard=True)
    with MetricsLogger(tmp_path, cfg) as logger:
        logger.log(0, {"perf/step_s": 1.0})
        logger.log(1, {"perf/step_s": 1.0})
    with pytest.warns(UserWarning, match="not a resume"), MetricsLogger(tmp_path, cfg) as logger:
        logger.log(0, {"perf/step_s": 2.0})
    assert scalars(tmp_path / "tensorboard")["perf/step_s"] == [(0, 2.0)]
