"""`lcot-mega sft` end to end on the tiny model: it learns the data, its exported model is the trained one and
scores the logged held-out loss, a resumed run equals an uninterrupted one, and bad configs or data are refused
before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import make_tiny_model_dir

from lcot_mega.observe import read_metrics

pytest.importorskip("megatron.core")

_TIMING = ("sft/step_s", "sft/tokens_per_s")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 sums written out as prompt and response: a pattern a tiny model picks up in a few steps."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "response": f"{a + b}"} for a in range(4) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "sft.yaml"
    path.write_text(
        "sft:\n  chat_template: false\n  batch_size: 4\n  eval_fraction: 0.25\n"
        "actor:\n  lr: 3.0e-3\n  micro_batch_tokens: 64\n"
        "trainer:\n  save_every: 3\n  eval_every: 3\n"
    )
    return path


def _sft(config: Path, run_dir: Path, model: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lcot_mega.cli", "sft", str(config), f"model.path={model}", f"sft.train=[{data}]"]
    return subprocess.run([*args, *overrides, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time" and k not in _TIMING}


def _hand_eval_loss(hf_dir: Path, rows: list[tuple[list[int], list[int]]]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in rows:
            z = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
            total += float((z.logsumexp(-1) - z.gather(-1, torch.tensor(response)[:, None])[:, 0]).sum())
            count += len(response)
    return total / count


def test_sft_learns_exports_the_trained_model_and_scores_the_logged_eval_loss(tmp_path, model, data, config):
    from transformers import AutoTokenizer

    from lcot_mega.config import load_config
    from lcot_mega.sft.data import load_sft_data

    run = tmp_path / "run"
    proc = _sft(config, run, model, data, "sft.epochs=3")  # 12 training examples, 4 a step: 9 steps
    _ok(proc)
    assert "at step 9 of 9" in proc.stdout and "held-out loss step 0" in proc.stdout
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(10))
    evals = {r["step"]: r["sft/eval_loss"] for r in records if "sft/eval_loss" in r}
    assert sorted(evals) == [0, 3, 6, 9]
    assert evals[9] < 0.8 * evals[0]  # it learned the held-out sums' format
    assert records[9]["sft/epoch"] == pytest.approx(3.0) and records[1]["sft/tokens"] > 0
    # the exported directory is the trained model: transformers scores the held-out examples at the logged loss
    cfg = load_config(config, [f"model.path={model}", f"sft.train=[{data}]"])
    held = load_sft_data(cfg.sft, AutoTokenizer.from_pretrained(model), cfg.trainer.seed).eval
    assert len(held) == 4
    hf = run / "hf"
    assert AutoTokenizer.from_pretrained(hf).eos_token == "</s>"
    assert _hand_eval_loss(hf, [(e.prompt_ids, e.response_ids) for e in held]) == pytest.approx(evals[9], rel=1e-4)
    assert _hand_eval_loss(model, [(e.prompt_ids, e.response_ids) for e in held]) == pytest.approx(evals[0], rel=1e-4)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, model, data, config):
    _ok(_sft(config, tmp_path / "straight", model, data, "sft.epochs=2"))  # 6 steps
    _ok(_sft(config, tmp_path / "resumed", model, data, "sft.epochs=1"))  # 3 steps, checkpoint at 3
    second = _sft(config, tmp_path / "resumed", model, data, "sft.epochs=2")
    _ok(second)
    assert "resumed" in second.stdout and "at step 6 of 6" in second.stdout
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == list(range(7))
    for a, b in zip(straight, resumed, strict=True):
        assert _comparable(a) == _comparable(b), a["step"]
    assert straight[4]["sft/loss"] > 0 and straight[4]["actor/grad_norm"] > 0  # the steps after the resume trained
    from safetensors.torch import load_file

    a = load_file(next((tmp_path / "straight" / "hf").glob("*.safetensors")))
    b = load_file(next((tmp_path / "resumed" / "hf").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("sft.train=[]",), "sft.train is empty"),
        (("sft.train=[/nonexistent.jsonl]",), "does not exist"),
        (("algo.kl_coef=0.1",), "algo.kl_coef: lcot-mega sft does not read the algo section"),
        (("cluster.mode=disaggregated",), "runs in cluster.mode=local (one actor rank) or colocated"),
        (("sft.batch_size=0",), "sft.batch_size"),
        (("actor.updates_per_batch=2",), "actor.updates_per_batch = 2: an SFT step is one optimizer step"),
        (("trainer.max_staleness=1",), "trainer.max_staleness = 1: lcot-mega sft samples nothing"),
        (("trainer.keep_good=2",), "trainer.keep_good = 2: lcot-mega sft has no guards"),
    ],
)
def test_bad_configs_are_refused_before_any_work(tmp_path, model, data, config, overrides, message):
    run = tmp_path / "run"
    proc = _sft(config, run, model, data, *overrides)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not run.exists()


def test_a_bad_row_is_refused_with_its_line_before_the_actor_is_built(tmp_path, model, config):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n')
    proc = _sft(config, tmp_path / "run", model, bad)
    assert proc.returncode == 2 and f"{bad}:2: a row needs string 'prompt' and 'response'" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # about 40 s each; the default tier has the SFT step at TP2/PP2/DP2 (test_sft_loss.py) and RL on Ray
@pytest.mark.parametrize("layout", [("actor.tensor_parallel=2",), ()], ids=["tp2", "dp2"])
def test_sft_on_two_ray_ranks_equals_one_rank(tmp_path, model, data, config, layout):
    """cluster.mode=colocated: the same steps on two Ray ranks (tensor- or data-parallel) as on one local rank."""
    pytest.importorskip("ray")
    _ok(_sft(config, tmp_path / "one", model, data, "sft.epochs=1"))
    ranks = ("cluster.mode=colocated", "cluster.actor_ranks=2", "cluster.cpus_per_rank=1", *layout)
    _ok(_sft(config, tmp_path / "two", model, data, "sft.epochs=1", *ranks))
    one, two = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 4
    for a, b in zip(one, two, strict=True):
        for key in ("sft/loss", "sft/eval_loss", "actor/grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    from safetensors.torch import load_file

    w1 = load_file(next((tmp_path / "one" / "hf").glob("*.safetensors")))
    w2 = load_file(next((tmp_path / "two" / "hf").glob("*.safetensors")))
    assert w1.keys() == w2.keys()
    # a few Adam steps of lr 3e-3 apart: summation order differs across layouts, and Adam turns a tiny gradient
    # difference into up to ~1% of one step (2.5e-5 measured at TP2)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert any((w1[k] - load_file(next(model.glob("*.safetensors")))[k]).abs().max() > 1e-3 for k in w1)  # it trained
