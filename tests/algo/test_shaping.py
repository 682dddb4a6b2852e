"""Relative length reward (study / DeepScaleR) and DAPO's soft overlong punishment, values worked by hand."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.tensor_helpers import b, ids, t
from hypothesis import given, settings
from hypothesis import strategies as st

from lcot_mega.algo.shaping import overlong_penalty, relative_length_reward


def lens(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, abs=tol)


# ---- relative length reward ----


def test_rlr_study_example():
    # accuracy 3/4 = .75 >= .75; mean correct length (100 + 300 + 200) / 3 = 200
    # bonuses (200-100)/500 = +.2, (200-300)/500 = -.2, (200-200)/500 = 0; incorrect sample untouched
    out = relative_length_reward(t(1, 1, 1, 0), b(1, 1, 1, 0), lens(100, 300, 200, 50), ids(0, 0, 0, 0))
    close(out, [1.2, 0.8, 1.0, 0.0])


def test_rlr_clips_to_bounds():
    # all correct, mean length (0 + 1000 + 2000 + 3000) / 4 = 1500
    # (1500-0)/500 = 3 -> 1; (1500-1000)/500 = 1; (1500-2000)/500 = -1 -> -.5; (1500-3000)/500 = -3 -> -.5
    out = relative_length_reward(t(1, 1, 1, 1), b(1, 1, 1, 1), lens(0, 1000, 2000, 3000), ids(3, 3, 3, 3))
    close(out, [2.0, 2.0, 0.5, 0.5])
    # custom bounds [-.1, .1]
    out = relative_length_reward(
        t(1, 1, 1, 1), b(1, 1, 1, 1), lens(0, 1000, 2000, 3000), ids(3, 3, 3, 3), lower=-0.1, upper=0.1
    )
    close(out, [1.1, 1.1, 0.9, 0.9])


def test_rlr_low_accuracy_group_unchanged_and_interleaved_groups():
    # group 5 (even positions) is the study example; group 2 (odd positions) has accuracy 2/4 = .5 < .75
    r = t(1, 1, 1, 1, 1, 0, 0, 0)
    c = b(1, 1, 1, 1, 1, 0, 0, 0)
    ln = lens(100, 10, 300, 1000, 200, 5, 50, 5)
    g = ids(5, 2, 5, 2, 5, 2, 5, 2)
    close(relative_length_reward(r, c, ln, g), [1.2, 1, 0.8, 1, 1.0, 0, 0, 0])


def test_rlr_corr_ratio_is_inclusive_and_configurable():
    # accuracy .5 qualifies at corr_ratio .5: correct lengths [100, 300], mean 200 -> +.2, -.2
    out = relative_length_reward(t(1, 1, 0, 0), b(1, 1, 0, 0), lens(100, 300, 7, 9), ids(0, 0, 0, 0), corr_ratio=0.5)
    close(out, [1.2, 0.8, 0, 0])


def test_rlr_singleton_and_all_wrong_groups():
    # singleton correct group: mean correct length = its own length -> bonus 0
    # all-wrong group with corr_ratio 0 qualifies but has no correct sample: unchanged, no 0/0
    out = relative_length_reward(t(1, 0, 0), b(1, 0, 0), lens(400, 10, 20), ids(0, 1, 1), corr_ratio=0.0)
    close(out, [1, 0, 0])
    assert torch.isfinite(out).all()


def test_rlr_float_lengths_and_int_correct_accepted_inputs_untouched():
    r, c, ln, g = t(1, 1, 1, 0), torch.tensor([1, 1, 1, 0]), t(100, 300, 200, 50), ids(0, 0, 0, 0)
    out = relative_length_reward(r, c, ln, g)
    close(out, [1.2, 0.8, 1.0, 0.0])
    assert r.tolist() == [1, 1, 1, 0] and ln.tolist() == [100, 300, 200, 50]


def test_rlr_empty():
    out = relative_length_reward(t(), b(), lens(), ids())
    assert out.shape == (0,) and out.dtype == torch.float32


def test_rlr_rejects_bad_inputs():
    r, c, ln, g = t(1, 0), b(1, 0), lens(10, 20), ids(0, 0)
    with pytest.raises(ValueError, match=r"rewards contains 1 NaN/Inf"):
        relative_length_reward(t(1, float("nan")), c, ln, g)
    with pytest.raises(ValueError, match=r"lengths contains 1 NaN/Inf"):
        relative_length_reward(r, c, t(10, float("inf")), g)
    with pytest.raises(ValueError, match="shape mismatch"):
        relative_length_reward(r, c, lens(10, 20, 30), g)
    with pytest.raises(ValueError, match="non-negative"):
        relative_length_reward(r, c, lens(10, -1), g)
    with pytest.raises(ValueError, match="0/1"):
        relative_length_reward(r, torch.tensor([1, 2]), ln, g)
    with pytest.raises(ValueError, match="length_base"):
        relative_length_reward(r, c, ln, g, length_base=0.0)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        relative_length_reward(r, c, ln, g, lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="corr_ratio"):
        relative_length_reward(r, c, ln, g, corr_ratio=1.5)


# ---- overlong penalty ----


def test_overlong_penalty_dapo_eq13():
    # L_max 100, L_cache 20: no penalty up to 80; ramp -(len-80)/20 in (80, 100]; -1 beyond 100
    out = overlong_penalty(lens(0, 80, 81, 90, 100, 101, 500), max_len=100, buffer_len=20)
    close(out, [0, 0, -0.05, -0.5, -1, -1, -1])
    half = overlong_penalty(lens(0, 80, 81, 90, 100, 101, 500), max_len=100, buffer_len=20, penalty_factor=0.5)
    close(half, [0, 0, -0.025, -0.25, -0.5, -0.5, -0.5])


def test_overlong_penalty_buffer_equal_to_max_len_and_float_lengths():
    # L_cache = L_max = 10: the ramp starts at 0 -> len 5 gives -.5
    close(overlong_penalty(t(0, 5.0, 10, 11), max_len=10, buffer_len=10), [0, -0.5, -1, -1])


def test_overlong_penalty_empty_and_input_untouched():
    out = overlong_penalty(lens(), max_len=10, buffer_len=2)
    assert out.shape == (0,) and out.dtype == torch.float32
    ln = lens(9, 12)
    overlong_penalty(ln, 10, 2)
    assert ln.tolist() == [9, 12]


def test_overlong_penalty_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"lengths contains 1 NaN/Inf"):
        overlong_penalty(t(1, float("nan")), 10, 2)
    with pytest.raises(ValueError, match="flat per-sample"):
        overlong_penalty(torch.zeros(2, 2), 10, 2)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lens(1), 10, 0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lens(1), 10, 11)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty(lens(1), 0, 0)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(lens(1), 10, 2, penalty_factor=-1.0)
    with pytest.raises(ValueError, match="non-negative"):
        overlong_penalty(lens(-3), 10, 2)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=30),
    st.integers(1, 200),
    st.data(),
    st.floats(0, 5),
)
def test_overlong_penalty_is_bounded_and_non_increasing_in_length(xs, max_len, data, factor):
    buffer_len = data.draw(st.integers(1, max_len))
    xs = sorted(xs)
    out = overlong_penalty(torch.tensor(xs), max_len, buffer_len, factor).tolist()
    assert all(-factor - 1e-6 <= v <= 0 for v in out)
    assert all(x >= y - 1e-6 for x, y in itertools.pairwise(out))
    assert all(v == 0 for x, v in zip(xs, out, strict=True) if x <= max_len - buffer_len)
    assert all(v == pytest.approx(-factor) for x, v in zip(xs, out, strict=True) if x >= max_len)
