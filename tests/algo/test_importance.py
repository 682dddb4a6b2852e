"""Truncated importance sampling weights (TIS) for the rollout/trainer log-prob mismatch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcot_mega.algo.importance import importance_correction
from lcot_mega.algo.losses import policy_loss

D = torch.float64


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=0, atol=tol)


def test_token_weights_and_cap():
    # old - rollout = [0, 0.5, 2] -> w = [1, e^0.5, min(e^2, 2)] = [1, 1.6487213, 2]
    # mean (1 + 1.6487213 + 2)/3 = 1.5495738; capped 1/3; |gap| mean 2.5/3 = 0.8333333, max 2
    w, m = importance_correction(
        torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.0, -1.5, -3.0]]), torch.ones(1, 3)
    )
    _close(w, [[1.0, 1.6487213, 2.0]])
    _close(m["rollout/is_weight_mean"], 1.5495738)
    _close(m["rollout/is_capped_frac"], 1 / 3)
    _close(m["rollout/logp_gap_mean"], 2.5 / 3)
    _close(m["rollout/logp_gap_max"], 2.0)


def test_weights_below_one_are_not_floored():
    # old - rollout = -0.5 -> e^-0.5 = 0.6065307
    w, m = importance_correction(torch.tensor([[-1.5]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    _close(w, [[0.6065307]])
    assert m["rollout/is_capped_frac"] == 0.0


def test_sequence_mode_multiplies_token_ratios():
    # row 0: gaps [0.2, -0.1], pad -> sum 0.1 -> e^0.1 = 1.1051709 on both tokens, 0 at padding
    # row 1: gaps [1, 1, 1] -> e^3 = 20.1 -> capped at 2 on all three tokens
    # 5 masked tokens: mean (2 * 1.1051709 + 3 * 2)/5 = 1.6420684; capped 3/5; |gap| mean 3.3/5 = 0.66, max 1
    old = torch.tensor([[-1.0, -1.0, math.nan], [-1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-1.2, -0.9, 0.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w, m = importance_correction(old, rollout, mask, cap=2.0, mode="sequence")
    _close(w, [[1.1051709, 1.1051709, 0.0], [2.0, 2.0, 2.0]])
    _close(m["rollout/is_weight_mean"], 1.6420684)
    _close(m["rollout/is_capped_frac"], 0.6)
    _close(m["rollout/logp_gap_mean"], 0.66)
    _close(m["rollout/logp_gap_max"], 1.0)


def test_padding_gets_zero_weight_and_garbage_there_is_ignored():
    old = torch.tensor([[-1.0, math.nan], [-2.0, -math.inf]])
    rollout = torch.tensor([[-1.0, 0.0], [-2.5, math.nan]])
    w, m = importance_correction(old, rollout, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    _close(w, [[1.0, 0.0], [1.6487213, 0.0]])  # e^0.5
    _close(m["rollout/logp_gap_max"], 0.5)


def test_weights_are_detached():
    old = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    w, _ = importance_correction(old, torch.tensor([[-1.1, -1.9]]), torch.ones(1, 2))
    assert not w.requires_grad


def test_huge_gap_is_capped_without_overflow():
    w, m = importance_correction(torch.tensor([[0.0]]), torch.tensor([[-1000.0]]), torch.ones(1, 1), cap=5.0)
    _close(w, [[5.0]])
    assert m["rollout/is_capped_frac"] == 1.0


def test_empty_mask_gives_zero_weights_and_metrics():
    w, m = importance_correction(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2))
    assert torch.equal(w, torch.zeros(2, 2))
    assert all(v == 0.0 for v in m.values())


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        importance_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mode="seq")
    with pytest.raises(ValueError, match="cap"):
        importance_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), cap=0.5)
    with pytest.raises(ValueError, match="rollout_logp"):
        importance_correction(torch.zeros(1, 2), torch.tensor([[0.0, math.nan]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="shape"):
        importance_correction(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


def test_weights_feed_policy_loss():
    # on-policy (r = 1), A = 1: loss_t = -w_t; w = [1, e^0.5] -> mean -(1 + 1.6487213)/2 = -1.3243607
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    w, _ = importance_correction(logp, torch.tensor([[-1.0, -1.5]]), torch.ones(1, 2))
    loss, _ = policy_loss(logp, logp.detach(), torch.ones(1), torch.ones(1, 2), is_weights=w)
    _close(loss.item(), -1.3243607)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=6, max_size=6),
    st.floats(1.0, 10.0),
    st.sampled_from(["token", "sequence"]),
)
def test_weights_lie_in_zero_to_cap(gaps, cap, mode):
    rollout = torch.tensor(gaps, dtype=D).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w, m = importance_correction(torch.zeros(2, 3, dtype=D), -rollout, mask, cap=cap, mode=mode)
    assert (w[mask] > 0).all()
    assert (w <= cap * (1 + 1e-12)).all()
    assert w[0, 2] == 0.0
    assert 0.0 <= m["rollout/is_capped_frac"] <= 1.0
