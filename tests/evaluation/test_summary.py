"""The eval summary on fixed graded responses: avg@k, pass@k, per-seed scores, uncertain problems, greedy flips and
the robustness drop, each worked by hand; and the rows and table written from them."""

from __future__ import annotations

import pytest

from lcot_mega.data.problems import Problem
from lcot_mega.evaluation.core import GradedSample
from lcot_mega.evaluation.report import markdown_table
from lcot_mega.evaluation.robustness import Probe
from lcot_mega.evaluation.suite import BenchmarkRun, EvalSettings, problem_rows, sample_rows, summarize


def _g(correct: int, tokens: int = 10, truncated: bool = False) -> GradedSample:
    return GradedSample("x", tokens, "truncated" if truncated else "stop", bool(correct), None, False)


def _per(bits: str, tokens: int = 10) -> list[GradedSample]:
    return [_g(int(b), tokens) for b in bits]


def _run() -> tuple[BenchmarkRun, EvalSettings]:
    """3 problems, k = 4, seeds 0 and 1. Pooled correct (of 8): 8, 4, 0 -> accuracies 1, 0.5, 0."""
    problems = [Problem(f"b/{i}", f"q{i}", "1", "b") for i in range(3)]
    run = BenchmarkRun("b", problems, skipped=1)
    run.sampled[0] = [_per("1111"), _per("1100"), _per("0000", tokens=20)]
    run.sampled[1] = [_per("1111"), _per("1010"), [_g(0, 20, truncated=True)] * 4]
    run.greedy = [_g(1), _g(0), _g(1)]
    run.probed = [_per("1100"), _per("0000"), _per("0001")]
    settings = EvalSettings(k=4, seeds=(0, 1), greedy=True, probe=Probe(repeats=3), n_boot=500)
    return run, settings


def test_avg_and_pass_at_k_from_pooled_counts():
    run, settings = _run()
    s = summarize(run, settings)
    assert s["n_problems"] == 3 and s["skipped_too_long"] == 1 and s["samples_per_problem"] == 8
    assert s["avg@k"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["pass@1"] == pytest.approx(s["avg@k"])
    # problem 2 (4 of 8 correct): pass@2 = 1 - C(4,2)/C(8,2) = 1 - 6/28
    assert s["pass@k"]["2"] == pytest.approx((1 + (1 - 6 / 28) + 0) / 3)
    assert s["pass@k"]["4"] == pytest.approx((1 + (1 - 1 / 70) + 0) / 3)  # C(4,4)/C(8,4) = 1/70
    assert sorted(s["pass@k"], key=int) == ["1", "2", "3", "4"]
    assert s["avg@k_per_seed"] == pytest.approx([(4 + 2 + 0) / 12, (4 + 2 + 0) / 12])
    assert s["response_len_mean"] == pytest.approx((16 * 10 + 8 * 20) / 24)
    assert s["truncated_frac"] == pytest.approx(4 / 24)
    lo, hi = s["ci95"]
    assert 0 <= lo <= s["avg@k"] <= hi <= 1


def test_uncertain_problems_and_runs_needed():
    run, settings = _run()
    u = summarize(run, settings)["uncertain"]
    assert u["count"] == 1 and u["frac"] == pytest.approx(1 / 3)  # only p = 0.5 lies inside (0.2, 0.8)
    assert u["variance_share"] == pytest.approx(1.0)  # the certain problems have p (1 - p) = 0
    assert u["one_sample_stderr"] == pytest.approx(0.5 / 3)  # sqrt(0.25) / 3
    # single-sample runs for +-2 points at 95%: (1.96 * (0.5/3) / 0.02)^2 = 266.8 -> 267; runs of k = 4: 67
    assert u["runs_needed"]["0.02"] == 67
    assert u["runs_needed"]["0.05"] == 11  # (1.96 * 0.5/3 / 0.05)^2 = 42.7 -> 43 -> ceil(43 / 4)


def test_greedy_flip_rate_and_robustness_drop():
    run, settings = _run()
    s = summarize(run, settings)
    assert s["greedy"]["accuracy"] == pytest.approx(2 / 3)
    # greedy right on p=1 (flip 0), wrong on p=0.5 (flip 0.5), right on p=0 (flip 1)
    assert s["greedy"]["flip_rate"] == pytest.approx((0 + 0.5 + 1) / 3)
    r = s["robustness"]
    # clean is seed 0 only: 1, 0.5, 0; probed: 0.5, 0, 0.25
    assert r["clean_avg@k"] == pytest.approx(0.5) and r["avg@k"] == pytest.approx(0.75 / 3)
    assert r["drop"] == pytest.approx((0.5 + 0.5 - 0.25) / 3) and r["repeats"] == 3
    assert r["drop_ci95"][0] <= r["drop"] <= r["drop_ci95"][1]


def test_problem_and_sample_rows():
    run, _ = _run()
    rows = problem_rows(run)
    assert [r["correct"] for r in rows] == [[4, 4], [2, 2], [0, 0]]
    assert [r["accuracy"] for r in rows] == [1.0, 0.5, 0.0] and [r["uncertain"] for r in rows] == [0, 1, 0]
    assert [r["greedy_correct"] for r in rows] == [True, False, True]
    assert [r["probe_correct"] for r in rows] == [2, 0, 1]
    samples = sample_rows(run)
    assert len(samples) == 3 * 4 * 2 + 3 + 3 * 4
    assert {s["mode"] for s in samples} == {"sampled", "greedy", "probe"}
    seed1 = [s for s in samples if s["mode"] == "sampled" and s["seed"] == 1 and s["uid"] == "b/1"]
    assert [s["correct"] for s in seed1] == [True, False, True, False]


def test_markdown_table_shows_the_numbers():
    run, settings = _run()
    text = markdown_table({"b": summarize(run, settings)}, {"model": "m", "settings": {"k": 4}})
    row = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert "| 3 | 8 | 50.0 [" in row and "(k=4)" in row and "| 1 (33.3%) | 67 |" in row
    assert "66.7 (50.0%)" in row  # greedy accuracy and flip rate


def test_settings_refuse_repeated_seeds_and_zero_k():
    with pytest.raises(ValueError):
        EvalSettings(k=0)
    with pytest.raises(ValueError):
        EvalSettings(seeds=(1, 1))
