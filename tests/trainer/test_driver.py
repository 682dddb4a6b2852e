"""`lcot-mega train` end to end on the tiny config: run directory contents, resume equivalence, bad configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_model_dir

from lcot_mega.observe import read_metrics

pytest.importorskip("megatron.core")

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
# wall-clock keys differ between any two runs; everything else must not
_TIMING = ("perf/", "sync/seconds", "sync/gb_per_s")


def _train(run_dir: Path, model: Path, *overrides: str, resume: str | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model}", *overrides]
    args += ["--run-dir", str(run_dir)] + ([resume] if resume else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _solutions_file(path: Path) -> Path:
    """Prompt rows with offline solutions (`algo.injection`): sums a tiny random model almost never gets right."""
    rows = [
        {"prompt": f"{a} + {b} =", "answer": str(a + b), "solution": f"\\boxed{{{a + b}}}"}
        for a in range(4)
        for b in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


INJECTION = ("algo.injection.enabled=true", "rollout.max_new_tokens=16")


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time" and not k.startswith(_TIMING)}


def test_resumed_run_reproduces_the_next_step_exactly(tmp_path, model):
    common = ("trainer.save_every=2", "trainer.eval_every=0", "eval.at_start=false")
    _ok(_train(tmp_path / "straight", model, "trainer.steps=3", *common))
    _ok(_train(tmp_path / "resumed", model, "trainer.steps=2", *common))
    second = _train(tmp_path / "resumed", model, "trainer.steps=3", *common)  # resumes by itself
    _ok(second)
    assert "resumed" in second.stdout and "at step 2" in second.stdout
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        assert _comparable(a) == _comparable(b), a["step"]
    # the step after the resume really trained (a vacuous comparison would pass on empty metrics)
    assert straight[2]["actor/response_tokens"] > 0 and "actor/grad_norm" in straight[2]


def test_injection_trains_offline_solutions_of_hard_groups_and_resumes_exactly(tmp_path, model):
    data = f"data.train=[{_solutions_file(tmp_path / 'sums.jsonl')}]"
    common = (data, *INJECTION, "trainer.save_every=1", "trainer.eval_every=0", "eval.at_start=false")
    _ok(_train(tmp_path / "straight", model, "trainer.steps=2", *common))
    _ok(_train(tmp_path / "resumed", model, "trainer.steps=1", *common))
    _ok(_train(tmp_path / "resumed", model, "trainer.steps=2", *common))
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    for a, b in zip(straight, resumed, strict=True):
        assert _comparable(a) == _comparable(b), a["step"]
    for record in straight:
        # every group the random model got all wrong gets one solution, and it trains (polarity both)
        assert record["injection/replaced"] >= 1 and record["injection/rejected"] == 0
        assert record["injection/trained"] == record["injection/replaced"] == record["injection/groups"]
        assert 0 < record["injection/token_share"] < 1 and 0 < record["injection/adv_share"] < 1
        # the tally is what the policy sampled: an all-wrong group has zero advantage before injection
        assert record["rollout/zero_adv_frac"] >= record["injection/groups"] / record["rollout/groups_generated"]


def test_injection_without_a_prompt_file_is_refused(tmp_path, model):
    refused = _train(tmp_path / "run", model, *INJECTION)
    assert refused.returncode == 2 and "no data.train entry is a prompt file" in refused.stderr
    empty = tmp_path / "plain.jsonl"
    empty.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    refused = _train(tmp_path / "run", model, *INJECTION, f"data.train=[{empty}]")
    assert refused.returncode == 2 and "no training prompt has an offline solution" in refused.stderr


def test_run_directory_holds_config_metrics_checkpoints_and_evals(tmp_path, model):
    run = tmp_path / "run"
    _ok(_train(run, model))
    assert (run / "config.yaml").is_file()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]  # step 0: the evaluation before training
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000000002", "step_000000003"]
    assert {p.name for p in (run / "eval" / "chain_sum").iterdir()} == {"step_0.json", "step_3.json"}
    again = _train(run, model, resume="--no-resume")  # refuses to touch a run with checkpoints
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_bad_config_stops_before_any_work(tmp_path, model):
    run = tmp_path / "run"
    typo = _train(run, model, "algo.polarty=negative")
    assert typo.returncode == 2 and "algo.polarty" in typo.stderr and "polarity" in typo.stderr
    missing = _train(run, tmp_path / "no-model")
    assert missing.returncode == 2 and "not a Hugging Face model directory" in missing.stderr
    greedy = _train(run, model, "rollout.temperature=0")
    assert greedy.returncode == 2 and "rollout.temperature" in greedy.stderr
    fresh = _train(run, model, resume="--resume")
    assert fresh.returncode == 2 and "no checkpoint to resume" in fresh.stderr
    assert not run.exists() or not any(run.iterdir())


# colocated is the slow tier's (about 90 s): colocated training through Ray runs by default in
# tests/cluster/test_two_node_ray.py and partial rollout in-process in tests/trainer/test_ahead.py
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(["cluster.mode=colocated"], marks=pytest.mark.slow),
        ["cluster.mode=disaggregated", "cluster.num_engines=2"],
    ],
    ids=lambda m: m[0],
)
def test_one_step_through_ray(tmp_path, model, mode):
    pytest.importorskip("ray")
    run = tmp_path / "run"
    disaggregated = "disagg" in mode[0]
    common = ("trainer.eval_every=0", "eval.at_start=false", "trainer.save_every=0")
    # disaggregated: with injected offline solutions, which travel to the Ray actor ranks flagged as such, and a
    # second step trained on samples the engines drew during the first (trainer.max_staleness); colocated: a partial
    # rollout (k = 1 samples no step ahead), whose 2 surplus groups of step 1 are trained by step 2
    inject = (f"data.train=[{_solutions_file(tmp_path / 'sums.jsonl')}]", *INJECTION) if disaggregated else ()
    ahead = ("trainer.steps=2", "trainer.max_staleness=1", *(() if disaggregated else ("rollout.partial=true",)))
    _ok(_train(run, model, *common, *mode, *inject, *ahead))
    record, *rest = read_metrics(run / "metrics.jsonl")
    # a partial rollout starts 6 groups (rollout.partial_oversubscribe 1.5): finished, or carried to step 2
    drawn = record["rollout/groups_generated"] + record.get("rollout/open_groups", 0)
    assert record["step"] == 1 and drawn == (4 if disaggregated else 6)
    assert record["actor/response_tokens"] > 0 and record["sync/gb"] > 0
    # fp32 on both sides and the engine freshly synced from the same weights: train and rollout agree (an injected
    # solution's placeholder log-probs would show here as a gap of whole nats)
    assert record["rollout/logp_gap_max"] < 1e-4
    assert record["sync/probe_max_diff"] < 1e-4  # rollout.verify_sync, on by default, on the Ray actor ranks
    assert record.get("injection/trained", 1) > 0
    # step 2's samples (some, with partial rollout) came from the weights before step 1's update: the gap shows it
    (second,) = rest
    assert second["rollout/staleness_max"] == 1.0 and second["rollout/logp_gap_max"] > 1e-4
    assert (run / "checkpoints" / "step_000000002").is_dir()
