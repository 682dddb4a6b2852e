"""Uncertain-problem analysis on constructed per-problem accuracies, each number worked by hand."""

from __future__ import annotations

import random

import pytest

from lcot_mega.evaluation.uncertain import analyze, greedy_flip_rate


def test_flags_the_middle_band_and_states_its_share_of_the_score_variance():
    # p = 1, 0, 0.5, 0.25, 0.9 out of 4 / 4 / 4 / 4 / 10 samples
    r = analyze([4, 0, 2, 1, 9], [4, 4, 4, 4, 10])
    assert r.accuracy == [1.0, 0.0, 0.5, 0.25, 0.9]
    assert r.uncertain == [2, 3]  # 0.9 is outside (0.2, 0.8): the right answer dominates
    var = [0, 0, 0.25, 0.1875, 0.09]  # p (1 - p)
    assert r.score_stderr == pytest.approx(sum(var) ** 0.5 / 5)
    assert r.uncertain_variance_share == pytest.approx((0.25 + 0.1875) / sum(var))


def test_runs_needed_for_a_stable_comparison_on_a_30_problem_benchmark():
    r = analyze([8] * 30, 16)  # thirty coin flips: Var(S) = 30 * 0.25 / 900, stderr = 0.0913
    assert r.score_stderr == pytest.approx((30 * 0.25) ** 0.5 / 30)
    # +-5 points at 95%: (1.96 * 0.0913 / 0.05)^2 = 12.8 -> 13 runs
    assert r.runs_needed(0.05) == 13
    assert r.runs_needed(1.0) == 1
    with pytest.raises(ValueError):
        r.runs_needed(0.0)


def test_a_certain_benchmark_has_no_noise_to_explain():
    r = analyze([0, 5, 5], 5)
    assert r.uncertain == [] and r.score_stderr == 0.0 and r.uncertain_variance_share == 0.0
    assert r.runs_needed(0.01) == 1


def test_stderr_matches_the_spread_of_simulated_runs():
    """The closed form against simulation: 2000 runs of one sample per problem."""
    p = [0.1, 0.5, 0.5, 0.7, 0.95, 0.3]
    r = analyze([round(q * 20) for q in p], 20)
    rng = random.Random(0)
    scores = [sum(rng.random() < q for q in p) / len(p) for _ in range(2000)]
    mean = sum(scores) / len(scores)
    sd = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
    assert sd == pytest.approx(r.score_stderr, rel=0.08)


def test_greedy_flip_rate_by_hand():
    # greedy right on a problem solved 0.75 of the time: flips 0.25; greedy wrong on one solved 0.4: flips 0.4
    assert greedy_flip_rate([True, False], [0.75, 0.4]) == pytest.approx((0.25 + 0.4) / 2)
    assert greedy_flip_rate([True, False], [1.0, 0.0]) == 0.0


@pytest.mark.parametrize(("correct", "samples"), [([], 4), ([5], 4), ([1, 2], [4]), ([-1], 4), ([0], 0)])
def test_bad_counts_are_refused(correct, samples):
    with pytest.raises(ValueError):
        analyze(correct, samples)
