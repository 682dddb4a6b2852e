"""Weights & Biases in offline mode: files under the run directory, and the same run id after a resume."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest

from lcot_mega.config import LoggingConfig
from lcot_mega.observe import WANDB_ID_FILE, MetricsLogger

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Keep wandb off the network and out of ~/.cache, ~/.config and the test's output."""
    home = tmp_path / "wandb_home"
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_DIR": str(home),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_ARTIFACT_DIR": str(home / "artifacts"),
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    wandb.teardown()  # stop wandb's service process


def written_run_file(path: Path) -> bytes:
    """The run's transaction log once wandb's service has written it (it closes the file after `finish`)."""
    wandb.teardown()
    deadline = time.monotonic() + 20
    while len(data := path.read_bytes()) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    return data


def offline_runs(run_dir) -> list:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_offline_run_writes_under_run_dir_and_resume_continues_the_same_run(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(wandb="offline", wandb_project="lcot-test")
    with MetricsLogger(run_dir, cfg, run_name="t", config_dict={"algo": {"clip_high": 0.28}}) as logger:
        logger.log(1, {"reward/accuracy": 0.25})
        logger.log(2, {"reward/accuracy": 0.5})
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    [first] = offline_runs(run_dir)
    data = written_run_file(first / f"run-{run_id}.wandb")
    assert b"reward/accuracy" in data and b"clip_high" in data

    with MetricsLogger(run_dir, cfg, resume_step=1) as logger:
        logger.log(2, {"reward/accuracy": 0.75})
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    runs = offline_runs(run_dir)
    # the resumed run's directory holds the same id (its name gets a "-1" suffix within the same second)
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").is_file() for r in runs)


def test_a_new_run_gets_a_new_wandb_id(tmp_path, offline_wandb):
    cfg = LoggingConfig(wandb="offline")
    with MetricsLogger(tmp_path, cfg) as logger:
        logger.log(0, {"a/b": 1.0})
    first = (tmp_path / WANDB_ID_FILE).read_text()
    with pytest.warns(UserWarning, match="not a resume"), MetricsLogger(tmp_path, cfg) as logger:
        logger.log(0, {"a/b": 1.0})
    assert (tmp_path / WANDB_ID_FILE).read_text() != first


def test_labels_are_logged_as_they_are(tmp_path, offline_wandb):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing sink would be dropped with a warning
        with MetricsLogger(tmp_path, LoggingConfig(wandb="offline")) as logger:
            logger.log(1, {"guard/action": "rollback", "guard/reason": "entropy 0.01 < 0.25 x median 0.8"})
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    [run] = offline_runs(tmp_path)
    data = written_run_file(run / f"run-{run_id}.wandb")
    assert b"rollback" in data and b"entropy 0.01 < 0.25 x median 0.8" in data
