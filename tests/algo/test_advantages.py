"""Group-relative advantage estimators (and the group statistics under them), values worked by hand."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from helpers.tensor_helpers import ids, t
from hypothesis import given, settings
from hypothesis import strategies as st

from lcot_mega.algo import advantages as adv_mod
from lcot_mega.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    available_advantages,
    group_advantages,
    register_advantage,
)
from lcot_mega.algo.groups import group_stats

ESTIMATORS = ["grpo", "drgrpo", "rloo", "reinforce_pp"]


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, abs=tol)


# ---- group statistics (groups.py) ----


def test_group_stats_interleaved_groups_broadcast_back_per_sample():
    # group 7 = positions 0,2,4 = [3,0,0]: mean 1, deviations [2,-1,-1], sum sq 6, var 6/2 = 3
    # group 3 = positions 1,3,5 = [0,2,4]: mean 2, deviations [-2,0,2], sum sq 8, var 8/2 = 4
    mean, std, count = group_stats(t(3, 0, 0, 2, 0, 4), ids(7, 3, 7, 3, 7, 3))
    close(mean, [1, 2, 1, 2, 1, 2])
    close(std, [math.sqrt(3), 2, math.sqrt(3), 2, math.sqrt(3), 2])
    assert count.tolist() == [3, 3, 3, 3, 3, 3]


def test_group_stats_singleton_has_zero_std_and_constant_group_exact_mean():
    # 0.1 three times: 0.1+0.1+0.1 = 0.30000000000000004 in float64, /3 is not 0.1; pinned exactly
    mean, std, count = group_stats(torch.tensor([5.0, 0.1, 0.1, 0.1], dtype=torch.float64), ids(0, 1, 1, 1))
    assert std.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert mean.tolist() == [5.0] + [torch.tensor(0.1, dtype=torch.float32).item()] * 3
    assert count.tolist() == [1, 3, 3, 3]


def test_group_stats_empty():
    mean, std, count = group_stats(t(), ids())
    assert mean.shape == std.shape == count.shape == (0,)


# ---- hand-worked estimators ----


def test_grpo_one_group_of_four():
    # [1,0,0,1]: mean .5, deviations +-.5, unbiased var (4 * .25) / 3 = 1/3, std 0.5773502692
    # .5 / (0.5773502692 + 1e-6) = 0.8660239 (0.8660254 without eps)
    close(group_advantages(t(1, 0, 0, 1), ids(0, 0, 0, 0)), [0.8660239, -0.8660239, -0.8660239, 0.8660239], 1e-6)


def test_drgrpo_rloo_reinforce_pp_one_group_of_four():
    r, g = t(1, 0, 0, 1), ids(2, 2, 2, 2)
    close(group_advantages(r, g, "drgrpo"), [0.5, -0.5, -0.5, 0.5])
    # rloo: 1 - mean(0,0,1) = 2/3 ; 0 - mean(1,0,1) = -2/3
    close(group_advantages(r, g, "rloo"), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # reinforce_pp: x = [.5,-.5,-.5,.5], batch mean 0, unbiased batch std sqrt(1/3) -> same as grpo
    close(group_advantages(r, g, "reinforce_pp"), [0.8660239, -0.8660239, -0.8660239, 0.8660239], 1e-6)


def test_two_interleaved_non_contiguous_groups():
    # ids [7,3,7,3,7,3]; group 7 rewards [3,0,0] (mean 1, std sqrt 3); group 3 rewards [0,2,4] (mean 2, std 2)
    r, g = t(3, 0, 0, 2, 0, 4), ids(7, 3, 7, 3, 7, 3)
    s3 = math.sqrt(3)
    close(group_advantages(r, g, "grpo"), [2 / s3, -1, -1 / s3, 0, -1 / s3, 1], 1e-5)
    close(group_advantages(r, g, "drgrpo"), [2, -2, -1, 0, -1, 2])
    # rloo: 3 - mean(0,0) = 3; 0 - mean(3,0) = -1.5; 0 - mean(2,4) = -3; 2 - mean(0,4) = 0; 4 - mean(0,2) = 3
    close(group_advantages(r, g, "rloo"), [3, -3, -1.5, 0, -1.5, 3])
    # reinforce_pp: x = [2,-2,-1,0,-1,2], mean 0, sum sq 14, unbiased var 14/5 = 2.8, std 1.6733200531
    close(
        group_advantages(r, g, "reinforce_pp"),
        [1.1952286, -1.1952286, -0.5976143, 0, -0.5976143, 1.1952286],
        1e-5,
    )


def test_singleton_groups_get_zero_advantage():
    # group 0 is [5] alone; group 1 is [1, 0]: mean .5, deviations +-.5, unbiased var .5, std 0.7071068
    r, g = t(5, 1, 0), ids(0, 1, 1)
    close(group_advantages(r, g, "grpo"), [0, 0.7071058, -0.7071058], 1e-6)
    close(group_advantages(r, g, "drgrpo"), [0, 0.5, -0.5])
    close(group_advantages(r, g, "rloo"), [0, 1, -1])
    # x = [0, .5, -.5], batch mean 0, unbiased var .5/2 = .25, std .5
    close(group_advantages(r, g, "reinforce_pp"), [0, 0.999998, -0.999998], 1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_lone_sample_batch_is_zero(estimator):
    assert group_advantages(t(3.0), ids(4), estimator).tolist() == [0.0]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_all_equal_rewards_give_exact_zero_not_nan(estimator, eps):
    r = t(0.1, 0.1, 0.1, 0.7, 0.7)
    out = group_advantages(r, ids(0, 0, 0, 1, 1), estimator, eps=eps)
    assert out.tolist() == [0.0] * 5


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty_input_returns_empty_float32(estimator):
    out = group_advantages(t(), ids(), estimator)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_rejected(bad):
    with pytest.raises(ValueError, match=r"rewards contains 1 NaN/Inf"):
        group_advantages(t(1, bad, 0), ids(0, 0, 0))


def test_shape_mismatch_and_bad_shapes_rejected():
    with pytest.raises(ValueError, match="shape mismatch"):
        group_advantages(t(1, 0, 0, 1), ids(0, 0, 0))
    with pytest.raises(ValueError, match=r"flat per-sample"):
        group_advantages(torch.zeros(2, 2), ids(0, 0))
    with pytest.raises(ValueError, match="non-negative"):
        group_advantages(t(1, 0), ids(0, -1))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(t(1, 0), torch.tensor([0.0, 0.0]))


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match="eps"):
        group_advantages(t(1, 0), ids(0, 0), eps=-1.0)


def test_inputs_not_modified_and_other_dtypes_accepted():
    r = torch.tensor([1, 0, 0, 1], dtype=torch.int64)
    g = ids(0, 0, 0, 0)
    out = group_advantages(r, g, "drgrpo")
    assert r.tolist() == [1, 0, 0, 1] and g.tolist() == [0, 0, 0, 0]
    close(out, [0.5, -0.5, -0.5, 0.5])
    r64 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert group_advantages(r64, ids(0, 0)).dtype == torch.float32


# ---- registry ----


def test_registry_lists_builtins_and_is_read_only():
    assert set(ESTIMATORS) <= set(available_advantages())
    assert available_advantages() == sorted(available_advantages())
    assert set(ADVANTAGE_ESTIMATORS) == set(available_advantages())
    with pytest.raises(TypeError):
        ADVANTAGE_ESTIMATORS["x"] = ADVANTAGE_ESTIMATORS["grpo"]  # type: ignore[index]


def test_unknown_estimator_lists_names_and_closest():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'gpro'.*'drgrpo'.*closest: 'grpo'"):
        group_advantages(t(1, 0), ids(0, 0), "gpro")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(t(), ids(), "nope")  # checked even for an empty batch


def test_register_custom_estimator_and_duplicates():
    @register_advantage("test_sign")
    def sign(rewards, group_ids, eps):
        return torch.sign(rewards)

    try:
        close(group_advantages(t(2, -3, 0), ids(0, 0, 1), "test_sign"), [1, -1, 0])
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("test_sign")(sign)
        register_advantage("test_sign", override=True)(lambda r, g, e: r[:1])
        with pytest.raises(ValueError, match="returned shape"):
            group_advantages(t(2, -3), ids(0, 0), "test_sign")
    finally:
        adv_mod._REGISTRY.pop("test_sign", None)
    assert "test_sign" not in available_advantages()


# ---- properties against an independent per-group reference (Python's statistics module) ----

samples = st.lists(st.tuples(st.integers(0, 5), st.integers(-3, 3)), min_size=1, max_size=40)


def _groups(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for gid, _ in pairs:
        out.setdefault(gid, [])
    for i, (gid, _) in enumerate(pairs):
        out[gid].append(i)
    return out


@settings(max_examples=60, deadline=None)
@given(samples)
def test_grpo_matches_reference_and_is_standardized_per_group(pairs):
    r = torch.tensor([float(x) for _, x in pairs])
    g = torch.tensor([gid for gid, _ in pairs])
    a = group_advantages(r, g, "grpo").tolist()
    for members in _groups(pairs).values():
        vals = [float(pairs[i][1]) for i in members]
        got = [a[i] for i in members]
        if len(vals) < 2 or len(set(vals)) == 1:
            assert got == [0.0] * len(vals)
            continue
        mu, sd = statistics.mean(vals), statistics.stdev(vals)
        assert got == pytest.approx([(v - mu) / (sd + 1e-6) for v in vals], abs=1e-5)
        assert statistics.mean(got) == pytest.approx(0.0, abs=1e-5)
        assert statistics.stdev(got) == pytest.approx(1.0, abs=1e-4)  # sd >= 0.35 for integer rewards


@settings(max_examples=60, deadline=None)
@given(samples)
def test_rloo_sums_to_zero_and_is_scaled_drgrpo(pairs):
    r = torch.tensor([float(x) for _, x in pairs])
    g = torch.tensor([gid for gid, _ in pairs])
    rloo = group_advantages(r, g, "rloo").tolist()
    dr = group_advantages(r, g, "drgrpo").tolist()
    for members in _groups(pairs).values():
        n = len(members)
        assert sum(rloo[i] for i in members) == pytest.approx(0.0, abs=1e-4)
        scale = n / (n - 1) if n > 1 else 0.0
        assert [rloo[i] for i in members] == pytest.approx([scale * dr[i] for i in members], abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(samples, st.randoms(use_true_random=False), st.sampled_from(ESTIMATORS))
def test_permuting_samples_and_relabeling_groups_permutes_advantages(pairs, rnd, estimator):
    r = torch.tensor([float(x) for _, x in pairs])
    g = torch.tensor([gid for gid, _ in pairs])
    perm = list(range(len(pairs)))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    base = group_advantages(r, g, estimator)
    moved = group_advantages(r[p], g[p] * 10 + 3, estimator)
    assert moved.tolist() == pytest.approx(base[p].tolist(), abs=1e-5)
