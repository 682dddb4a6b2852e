"""Dynamic sampling, polarity selection (positive/negative/both/weighted), trimming and reweighting."""

from __future__ import annotations

import pytest
import torch
from helpers.tensor_helpers import b, bits, ids, t
from hypothesis import given, settings
from hypothesis import strategies as st

from lcot_mega.algo.advantages import group_advantages
from lcot_mega.algo.selection import (
    POLARITY_MODES,
    informative_groups,
    positive_weight,
    select_by_polarity,
    trim_to_multiple,
    zero_advantage_groups,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- dynamic sampling ----


def test_zero_advantage_groups_interleaved_and_singleton():
    # group 4 = positions 0,2 -> has .5; group 9 = positions 1,3 -> all 0; group 0 = position 4 alone, 0
    a, g = t(0, 0, 0.5, 0, 0), ids(4, 9, 4, 9, 0)
    assert bits(zero_advantage_groups(a, g)) == [0, 1, 0, 1, 1]


def test_zero_advantage_tolerance():
    a, g = t(1e-9, -1e-9), ids(0, 0)
    assert bits(zero_advantage_groups(a, g)) == [1, 1]
    assert bits(zero_advantage_groups(a, g, tol=0.0)) == [0, 0]
    with pytest.raises(ValueError, match="tol"):
        zero_advantage_groups(a, g, tol=-1.0)


def test_informative_groups_are_those_with_unequal_rewards_interleaved_and_singleton():
    # group 4 = positions 0,2 -> rewards 1, 0; group 9 = positions 1,3 -> 1, 1; group 0 = position 4 alone
    r, g = t(1, 1, 0, 1, 1), ids(4, 9, 4, 9, 0)
    assert informative_groups(r, g).tolist() == [4]


def test_informative_groups_sorted_unique_int64():
    r, g = t(1, 0, 0.5, 0.5, 2, -2), ids(9, 9, 5, 5, 4, 4)
    out = informative_groups(r, g)
    assert out.tolist() == [4, 9] and out.dtype == torch.long


def test_informative_groups_equal_rewards_off_zero_and_a_one_ulp_difference():
    # 0.1 three times is constant (a rule on the float64 std would see rounding noise); 1 vs 1 + 2^-23 (one float32
    # ulp) is not, and GRPO gives that group a nonzero advantage
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0 + 2**-23])
    g = ids(0, 0, 0, 1, 1)
    assert informative_groups(r, g).tolist() == [1]
    assert bits(zero_advantage_groups(group_advantages(r, g, "grpo"), g)) == [1, 1, 1, 0, 0]


def test_informative_groups_empty_nan_shape():
    assert informative_groups(t(), ids()).tolist() == []
    with pytest.raises(ValueError, match=r"rewards contains 1 NaN/Inf"):
        informative_groups(t(0, float("nan")), ids(0, 0))
    with pytest.raises(ValueError, match="shape mismatch"):
        informative_groups(t(0, 1), ids(0, 0, 0))


# The rule each estimator implies, worked by hand on one batch: group 0 = [1, 0, 1, 1] (mean .75, x = r - mean =
# [.25, -.75, .25, .25], sum sq .75, unbiased std .5), group 1 = [.5, .5] (constant), group 2 = [1] (alone),
# group 3 = [.1, .1, .1] (constant). Only group 0 has unequal rewards, and only group 0 gets nonzero advantages.
RULE_R = t(1, 0, 1, 1, 0.5, 0.5, 1, 0.1, 0.1, 0.1)
RULE_G = ids(0, 0, 0, 0, 1, 1, 2, 3, 3, 3)
ZERO6 = [0.0] * 6
RULE_ADV = {
    "grpo": [0.5, -1.5, 0.5, 0.5, *ZERO6],  # x / .5
    "drgrpo": [0.25, -0.75, 0.25, 0.25, *ZERO6],  # x
    "rloo": [1 / 3, -1.0, 1 / 3, 1 / 3, *ZERO6],  # x * 4 / 3
    # x over the batch of 10: mean 0, unbiased std sqrt(.75 / 9) = 1 / sqrt(12); x * sqrt(12)
    "reinforce_pp": [0.8660254, -2.5980762, 0.8660254, 0.8660254, *ZERO6],
}


@pytest.mark.parametrize("estimator", sorted(RULE_ADV))
def test_informative_groups_match_each_estimators_nonzero_advantage_groups(estimator):
    adv = group_advantages(RULE_R, RULE_G, estimator)
    assert adv.tolist() == pytest.approx(RULE_ADV[estimator], abs=1e-5)
    assert informative_groups(RULE_R, RULE_G).tolist() == [0]
    assert bits(zero_advantage_groups(adv, RULE_G)) == [0] * 4 + [1] * 6


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, -0.3]), min_size=1, max_size=5), min_size=1, max_size=6),
    st.sampled_from(["grpo", "drgrpo", "rloo", "reinforce_pp"]),
)
def test_every_estimator_zeroes_exactly_the_groups_with_equal_rewards(groups, estimator):
    # the contract dynamic sampling relies on (advantages.py): zero-advantage groups == equal-reward groups
    r = torch.tensor([x for grp in groups for x in grp], dtype=torch.float32)
    g = torch.tensor([i for i, grp in enumerate(groups) for _ in grp], dtype=torch.long)
    zero = zero_advantage_groups(group_advantages(r, g, estimator), g)
    expected = {i for i, grp in enumerate(groups) if len(set(grp)) > 1}
    assert set(informative_groups(r, g).tolist()) == expected
    assert {int(i) for i in g[~zero].tolist()} == expected


# ---- polarity ----

ADV = t(0.5, -0.5, 0.7, -0.7, 0.0, 0.9)
CORRECT = b(1, 0, 1, 0, 0, 1)
GIDS = ids(3, 3, 1, 1, 8, 1)


def test_polarity_modes_keep_exactly_the_right_samples():
    assert bits(select_by_polarity(ADV, CORRECT, GIDS, "positive")) == [1, 0, 1, 0, 0, 1]
    assert bits(select_by_polarity(ADV, CORRECT, GIDS, "negative")) == [0, 1, 0, 1, 1, 0]
    assert bits(select_by_polarity(ADV, CORRECT, GIDS, "both")) == [1] * 6
    assert bits(select_by_polarity(ADV, CORRECT, GIDS, "weighted")) == [1] * 6
    assert POLARITY_MODES == ("positive", "negative", "both", "weighted")


def test_negative_mode_keeps_all_wrong_groups_with_zero_advantage():
    # group 2 is all wrong (advantage 0 everywhere) and still trains in negative mode (the study's behaviour)
    a, c, g = t(0, 0, 0, 0.5, -0.5), b(0, 0, 0, 1, 0), ids(2, 2, 2, 6, 6)
    assert bits(select_by_polarity(a, c, g, "negative")) == [1, 1, 1, 0, 1]


def test_unknown_mode_lists_modes():
    with pytest.raises(ValueError, match=r"unknown polarity mode 'pos'.*'positive', 'negative', 'both', 'weighted'"):
        select_by_polarity(ADV, CORRECT, GIDS, "pos")


def _ten_correct_two_wrong() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = torch.tensor([1] * 10 + [0] * 2, dtype=torch.bool)
    return torch.zeros(12), c, torch.arange(12) % 3


@pytest.mark.parametrize(
    ("ratio", "minimum", "expected_reserved"),
    [
        (0.0, 0, 0),  # study default
        (0.3, 0, 3),  # floor(.3 * 10) = 3
        (0.35, 0, 3),  # floor(3.5) = 3
        (0.3, 5, 5),  # at least reserve_min
        (0.3, 50, 10),  # reserve_min capped at the 10 available
        (1.0, 0, 10),
    ],
)
def test_negative_mode_reserve_counts(ratio, minimum, expected_reserved):
    a, c, g = _ten_correct_two_wrong()
    keep = select_by_polarity(a, c, g, "negative", reserve_ratio=ratio, reserve_min=minimum, generator=gen(0))
    assert bool(keep[~c].all())  # every incorrect sample stays
    assert int(keep[c].sum()) == expected_reserved


def test_reserve_rounding_is_floor_without_float_slack():
    # .29 * 100 = 28.999999999999996 in floating point; the share is 29 samples
    c = torch.ones(100, dtype=torch.bool)
    keep = select_by_polarity(torch.zeros(100), c, torch.zeros(100, dtype=torch.long), "negative", reserve_ratio=0.29)
    assert int(keep.sum()) == 29


def test_positive_mode_reserve_keeps_some_incorrect():
    # 2 incorrect dropped; reserve_min 1 keeps one of them
    a, c, g = _ten_correct_two_wrong()
    keep = select_by_polarity(a, c, g, "positive", reserve_min=1, generator=gen(1))
    assert bool(keep[c].all()) and int(keep[~c].sum()) == 1


def test_reserve_is_reproducible_with_seeded_generator_and_varies_with_seed():
    a, c, g = _ten_correct_two_wrong()
    masks = [bits(select_by_polarity(a, c, g, "negative", reserve_ratio=0.5, generator=gen(s))) for s in range(6)]
    again = bits(select_by_polarity(a, c, g, "negative", reserve_ratio=0.5, generator=gen(0)))
    assert masks[0] == again
    assert len({tuple(m) for m in masks}) > 1


def test_reserve_is_uniform_over_dropped_samples():
    # keep 1 of 4 correct samples 4000 times: each expected 1000 times (sd ~27)
    c, a, g = b(1, 1, 0, 1, 1), torch.zeros(5), ids(0, 0, 0, 0, 0)
    g0 = gen(123)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts += select_by_polarity(a, c, g, "negative", reserve_min=1, generator=g0).float()
    assert counts[2] == 4000
    for i in (0, 1, 3, 4):
        assert 850 < counts[i] < 1150


def test_polarity_validation_empty_and_input_untouched():
    with pytest.raises(ValueError, match="reserve_ratio"):
        select_by_polarity(ADV, CORRECT, GIDS, "negative", reserve_ratio=1.5)
    with pytest.raises(ValueError, match="reserve_min"):
        select_by_polarity(ADV, CORRECT, GIDS, "negative", reserve_min=-1)
    with pytest.raises(ValueError, match=r"advantages contains 1 NaN/Inf"):
        select_by_polarity(t(float("nan")), b(1), ids(0), "positive")
    with pytest.raises(ValueError, match="shape mismatch"):
        select_by_polarity(ADV, CORRECT[:5], GIDS, "positive")
    for mode in POLARITY_MODES:
        assert select_by_polarity(t(), b(), ids(), mode).shape == (0,)
    c = CORRECT.clone()
    select_by_polarity(ADV, c, GIDS, "negative", reserve_ratio=0.5)
    assert c.tolist() == CORRECT.tolist()


# ---- trimming ----


def test_trim_to_multiple_removes_the_surplus_from_kept_samples():
    keep = b(1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1)  # 10 kept
    out = trim_to_multiple(keep, 4, generator=gen(0))
    assert int(out.sum()) == 8
    assert not bool((out & ~keep).any())  # only un-keeps
    assert keep.sum() == 10  # input untouched
    assert bits(trim_to_multiple(keep, 4, generator=gen(0))) == bits(out)


def test_trim_to_multiple_edge_cases():
    keep = b(1, 0, 1, 1)
    assert bits(trim_to_multiple(keep, 1)) == [1, 0, 1, 1]
    assert bits(trim_to_multiple(keep, 3)) == [1, 0, 1, 1]
    assert bits(trim_to_multiple(keep, 4)) == [0, 0, 0, 0]  # 3 kept, below one full multiple
    assert trim_to_multiple(b(), 8).shape == (0,)
    with pytest.raises(ValueError, match="multiple"):
        trim_to_multiple(keep, 0)
    with pytest.raises(ValueError, match="flat per-sample"):
        trim_to_multiple(torch.ones(2, 2, dtype=torch.bool), 2)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), max_size=50), st.integers(1, 9), st.integers(0, 2**31))
def test_trim_to_multiple_property(keep_list, multiple, seed):
    keep = torch.tensor(keep_list, dtype=torch.bool)
    out = trim_to_multiple(keep, multiple, generator=gen(seed))
    k = sum(keep_list)
    assert int(out.sum()) == k - k % multiple
    assert not bool((out & ~keep).any())


# ---- positive weight ----


def test_positive_weight_scales_correct_samples_only():
    a, c = t(1, -1, 0.5, 0), b(1, 0, 1, 0)
    assert positive_weight(a, c, 0.1).tolist() == pytest.approx([0.1, -1, 0.05, 0])
    assert positive_weight(a, c, 0.0).tolist() == [0, -1, 0, 0]
    assert positive_weight(a, c, 1.0).tolist() == a.tolist()
    assert a.tolist() == [1, -1, 0.5, 0]
    assert positive_weight(t(), b(), 0.5).shape == (0,)


def test_positive_weight_rejects_bad_inputs():
    with pytest.raises(ValueError, match="weight"):
        positive_weight(t(1), b(1), -0.5)
    with pytest.raises(ValueError, match="weight"):
        positive_weight(t(1), b(1), float("nan"))
    with pytest.raises(ValueError, match=r"advantages contains 1 NaN/Inf"):
        positive_weight(t(float("inf")), b(1), 0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        positive_weight(t(1, 2), b(1), 0.5)
