"""examples/study/cold_start_data.py: seeded long chains of thought whose boxed answers the product's own grader
(math-verify, `require_think_close` as the study) scores correct, with corrected slips where asked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.scripts import load_script

pytest.importorskip("reasoning_gym")


def _module():
    return load_script("examples/study/cold_start_data.py")


def _run(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "d.jsonl"
    assert _module().main(["--out", str(out), *args]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_traces_think_then_box_the_right_answer_and_grade_correct(tmp_path):
    from lcot_mega.reward import Grader

    rows = _run(tmp_path, "--n", "15", "--seed", "4")
    assert len(rows) == 30 and {r["task"] for r in rows} == {"chain_sum", "products"}
    for r in rows:
        assert r["response"].startswith("<think>\n") and "\n</think>\n" in r["response"]
        assert re.search(r"\\boxed\{(-?\d+)\}", r["response"]).group(1) == r["answer"]
        assert r["prompt"].endswith("Let's think step by step and output the final answer within \\boxed{}.")
    with Grader(num_workers=1, require_think_close=True) as grader:
        graded = grader.grade_batch([r["response"] for r in rows], [r["answer"] for r in rows])
        assert all(g.correct for g in graded)
        # a wrong box is graded wrong, and so is a right one with no closed </think> (the study's verifier)
        wrong = rows[0]["response"].replace(f"\\boxed{{{rows[0]['answer']}}}", "\\boxed{123456789}")
        unclosed = rows[0]["response"].replace("</think>", "")
        assert [g.correct for g in grader.grade_batch([wrong, unclosed], [rows[0]["answer"]] * 2)] == [False, False]


def test_every_trace_can_carry_one_caught_and_redone_slip(tmp_path):
    rows = _run(tmp_path, "--n", "10", "--error-rate", "1.0")
    slipped = [r for r in rows if "That is wrong" in r["response"] or "I slipped" in r["response"]]
    assert len(slipped) >= len(rows) // 3  # each step offers the slip at even odds, until one is made
    assert not [r for r in _run(tmp_path, "--n", "10", "--error-rate", "0.0") if "Redoing" in r["response"]]


def test_the_same_seed_writes_the_same_file(tmp_path):
    assert _run(tmp_path, "--n", "5", "--seed", "2") == _run(tmp_path, "--n", "5", "--seed", "2")
    assert _run(tmp_path, "--n", "5", "--seed", "2") != _run(tmp_path, "--n", "5", "--seed", "3")


@pytest.mark.parametrize(
    "task, args",
    [("chain_sum", "min_terms=2&max_terms=3&min_digits=1&max_digits=2"), ("products", "min_digits=1&max_digits=2")],
)
def test_a_runs_own_training_problems_carry_traces_and_keep_their_uids_and_order(tmp_path, task, args):
    """--run-config: the file, put in place of the gym source, gives load_problems the same problems in the same
    order with the same uids (so the run sees the same prompt stream), each with a solution graded correct."""
    from lcot_mega.config import load_config
    from lcot_mega.data import load_problems
    from lcot_mega.reward import Grader

    spec = f"reasoning_gym:{task}?{args}"
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  train: ['{spec}']\n  eval: ['{spec}']\n  gym_train_size: 40\n  gym_eval_size: 30\n")
    out = tmp_path / f"{task}.jsonl"
    args = ["--out", str(out), "--for", "rl", "--run-config", str(config), "--run-seed", "2"]
    assert _module().main([*args, "--set", "data.gym_eval_size=20"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and all(r["solution"].startswith("<think>\n") for r in rows)

    overrides = ["data.gym_eval_size=20"]
    gym = load_problems(load_config(config, overrides).data, 2)[0]
    from_file = load_problems(load_config(config, [*overrides, f"data.train=[{out}]"]).data, 2)[0]
    assert len(gym) == 40
    assert [(p.uid, p.problem, p.answer, p.source) for p in from_file] == [
        (p.uid, p.problem, p.answer, p.source) for p in gym
    ]
    assert gym[0].uid.startswith(f"{task}/seed2/") and gym != load_problems(load_config(config, overrides).data, 3)[0]
    with Grader(num_workers=1, require_think_close=True) as grader:
        graded = grader.grade_batch([p.solution for p in from_file], [p.answer for p in from_file])
    assert all(g.correct for g in graded)

    with pytest.raises(SystemExit):  # another name would give the file's problems other uids than the run's
        _module().main(["--out", str(tmp_path / "other.jsonl"), *args[2:]])
