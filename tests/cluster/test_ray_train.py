"""`lcot-mega train` on Ray: the tiny smoke config runs its steps in disaggregated mode (DP=2 actor, two served
engines), with the engines' sampled log-probs equal to the actor's after every sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lcot_mega.observe import read_metrics

pytest.importorskip("ray")
pytest.importorskip("megatron.core")

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


@pytest.mark.slow
def test_train_cli_runs_the_smoke_config_disaggregated(model_dir, tmp_path):
    cluster = ["cluster.mode=disaggregated", "cluster.actor_ranks=2", "cluster.num_engines=2"]
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model_dir}", *cluster]
    proc = subprocess.run([*args, "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rollout/logp_gap_max" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["rollout/logp_gap_max"] < 1e-4 for r in steps)
