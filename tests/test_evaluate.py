"""pass@k (the unbiased estimator) against its closed form, and EvalResult's avg@k / pass@k on fixed counts."""

from __future__ import annotations

import itertools
import math

import pytest

from lcot_mega.evaluate import EvalResult, pass_at_k, pass_ks


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
