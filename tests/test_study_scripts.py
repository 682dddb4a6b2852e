"""examples/study/common.sh: a study run is marked done (and then evaluated) only when it trained to its last step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_model_dir

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[1]
QUIET = "trainer.eval_every=0 eval.at_start=false trainer.save_every=0 trainer.steps=2"


def _train_run(run: Path, model: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`train_run` as the study scripts call it, then a line the script prints only if it went on."""
    script = (
        "set -euo pipefail; source examples/study/common.sh; "
        f"train_run {run} model.path={model} {QUIET} {' '.join(overrides)}; echo went-on"
    )
    env = {
        **os.environ,
        "CONFIG": "configs/tiny_cpu.yaml",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_run_stopped_by_sigterm_is_not_marked_done_and_the_script_stops(tmp_path):
    model, run = make_tiny_model_dir(tmp_path / "tiny"), tmp_path / "run"
    stopped = _train_run(run, model, "debug.inject.sigterm_at_step=[1]")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 1" in stopped.stdout and "went-on" not in stopped.stdout
    assert "stopped before its last step" in stopped.stderr and not (run / "done").exists()
    resumed = _train_run(run, model)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "went-on" in resumed.stdout and (run / "done").exists()


def test_a_failed_run_fails_the_script_and_is_not_marked_done(tmp_path):
    failed = _train_run(tmp_path / "run", tmp_path / "no-model")
    assert failed.returncode != 0 and "went-on" not in failed.stdout
    assert not (tmp_path / "run" / "done").exists()
