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


def _disaggregated(model_dir: Path, run_dir: Path, *extra: str) -> list[dict]:
    """A 4-step disaggregated run of the smoke config with one served engine; its per-step training metrics."""
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model_dir}"]
    args += ["cluster.mode=disaggregated", "cluster.actor_ranks=1", "cluster.num_engines=1", "trainer.steps=4"]
    args += ["trainer.save_every=0", "trainer.eval_every=0", "eval.at_start=false", "rollout.max_new_tokens=32"]
    args += ["rollout.request_timeout_s=10", *extra, "--run-dir", str(run_dir)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "rollout/logp_gap_max" in r]
    for r in steps:
        r["stdout"] = proc.stdout
    return steps


@pytest.mark.slow
def test_disaggregated_train_survives_a_killed_and_a_hung_server_unchanged(model_dir, tmp_path):
    """The one server SIGKILLed in step 2's rollout and SIGSTOPped in step 3's (found by the request timeout): each
    time it is restarted in its bundle, joins a re-formed weight group at the run's version, and the re-sent
    requests keep their seeds, so the run equals an undisturbed one metric for metric."""
    calm = _disaggregated(model_dir, tmp_path / "calm")
    faults = ("debug.inject.kill_engine_at_step=[2]", "debug.inject.hang_engine_at_step=[3]")
    struck = _disaggregated(model_dir, tmp_path / "struck", *faults)
    out = struck[0]["stdout"]
    assert "debug.inject: kill rollout server 0" in out and "debug.inject: hang rollout server 0" in out
    assert [r["step"] for r in struck] == [r["step"] for r in calm] == [1, 2, 3, 4]
    skip = ("perf/", "sync/seconds", "sync/gb_per_s", "time", "rollout/engine", "stdout")
    for a, b in zip(struck, calm, strict=True):
        numbers = {k: v for k, v in b.items() if not k.startswith(skip) and not isinstance(v, str)}
        assert {k: a[k] for k in numbers} == pytest.approx(numbers, rel=1e-6, abs=1e-9), a["step"]
        hit = float(a["step"] in (2, 3))
        assert a["rollout/engine_failures"] == a["rollout/engine_restarts"] == hit, (a["step"], out)
        assert a["rollout/logp_gap_max"] < 1e-4 and a["sync/servers"] == 1.0
