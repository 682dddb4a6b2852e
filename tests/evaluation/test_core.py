"""pass@k (the unbiased estimator) against its closed form, EvalResult's avg@k / pass@k on fixed counts, and the
bootstrap interval by hand and against the normal interval."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from lcot_mega.evaluation.core import EvalResult, GradedSample, bootstrap_ci, eval_result, pass_at_k, pass_ks


@pytest.mark.parametrize(("n", "c", "k"), [(5, 2, 2), (10, 3, 4), (16, 1, 8), (16, 15, 1), (64, 7, 16), (8, 0, 3)])
def test_pass_at_k_equals_one_minus_the_binomial_ratio(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12, abs=1e-15)


def test_pass_at_k_by_hand_and_by_enumerating_every_subset():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 is the plain accuracy c/n
    samples = [1, 0, 0, 1, 0, 0]  # n = 6, c = 2: the share of 3-subsets holding a correct sample
    subsets = list(itertools.combinations(samples, 3))
    assert pass_at_k(6, 2, 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_edges_and_bad_arguments():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0 and pass_at_k(8, 5, 4) == 1.0
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_never_falls_as_k_grows():
    values = [pass_at_k(32, 3, k) for k in range(1, 33)]
    assert all(a <= b for a, b in itertools.pairwise(values)) and values[-1] == 1.0


def test_reported_ks_are_powers_of_two_and_n():
    assert pass_ks(1) == [] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(64)[-1] == 64


def test_eval_result_reports_avg_at_k_and_pass_at_k_over_problems():
    r = EvalResult("gsm", k=4, uids=["a", "b", "c"], correct=[4, 1, 0], response_len_mean=10.0, truncated_frac=0.0)
    assert r.accuracy == pytest.approx(5 / 12)
    assert r.pass_at(1) == pytest.approx(r.accuracy)
    assert r.pass_at(2) == pytest.approx((1 + 0.5 + 0) / 3)  # b: 1 - C(3,2)/C(4,2) = 1 - 3/6
    m = r.metrics()
    assert m["eval/gsm/pass@4"] == pytest.approx(2 / 3) and "eval/gsm/pass@8" not in m


def test_bootstrap_interval_of_two_values_by_hand():
    # resampling [0, 1] twice gives means 0, 0.5, 1 with chances 1/4, 1/2, 1/4: the 95% interval is [0, 1]
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=1) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], level=0.4, n_boot=4000, seed=1) == (0.5, 0.5)  # 30%..70% quantiles: 0.5


def test_bootstrap_interval_matches_the_normal_interval_on_many_problems():
    rng = random.Random(0)
    values = [rng.random() for _ in range(400)]
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    lo, hi = bootstrap_ci(values, n_boot=4000)
    assert lo == pytest.approx(mean - half, abs=0.15 * half) and hi == pytest.approx(mean + half, abs=0.15 * half)


def test_bootstrap_interval_is_deterministic_and_degenerate_for_equal_values():
    rng = random.Random(5)
    values = [rng.random() for _ in range(30)]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert bootstrap_ci([0.25] * 10) == pytest.approx((0.25, 0.25))
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], level=1.0)


def test_eval_result_from_graded_samples_counts_correct_and_lengths():
    g = [
        [GradedSample("a", 4, "stop", True, "1", False), GradedSample("b", 8, "truncated", False, None, False)],
        [GradedSample("c", 2, "stop", False, "2", False), GradedSample("d", 6, "stop", True, "3", False)],
    ]
    r = eval_result("src", ["u0", "u1"], g)
    assert r.k == 2 and r.correct == [1, 1] and r.accuracy == 0.5
    assert r.response_len_mean == 5.0 and r.truncated_frac == 0.25
