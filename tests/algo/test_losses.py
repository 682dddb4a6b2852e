"""Policy losses and aggregation, against numbers worked by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcot_mega.algo.losses import (
    _AGGREGATIONS,
    _USES_MAX_LEN,
    aggregate,
    aggregation_denominator,
    aggregation_uses_max_len,
    available_aggregations,
    offpolicy_shaped_loss,
    policy_loss,
    register_aggregation,
)

D = torch.float64
ALL3 = torch.ones(1, 3, dtype=torch.bool)


def _logp_from_ratio(old: list[float], ratio: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """old_logp [1, T] and a leaf logp [1, T] with exp(logp - old_logp) == ratio."""
    old_t = torch.tensor([old], dtype=D)
    logp = (old_t + torch.tensor([ratio], dtype=D).log()).detach().requires_grad_()
    return logp, old_t


def _loss_and_grad(logp, old, adv, mask, **kw):
    loss, metrics = policy_loss(logp, old, adv, mask, **kw)
    loss.backward()
    return loss.item(), logp.grad, metrics


def _close(a, b, tol=1e-9):
    return torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=0, atol=tol)


# ------------------------------------------------------------------------- clipping, one sequence


def test_ratio_inside_clip_range_is_plain_surrogate():
    # r = [1.1, 0.9, 1.0], A = 2: loss_t = -A r = [-2.2, -1.8, -2.0]; token mean = -6.0 / 3 = -2.0
    # d loss / d logp_t = -A r_t / 3 (dr/dlogp = r) = [-2.2/3, -1.8/3, -2/3]
    logp, old = _logp_from_ratio([-1.0, -2.0, -0.5], [1.1, 0.9, 1.0])
    loss, grad, m = _loss_and_grad(logp, old, torch.tensor([2.0], dtype=D), ALL3)
    _close(loss, -2.0)
    _close(grad, [[-2.2 / 3, -1.8 / 3, -2.0 / 3]])
    assert m["actor/clipfrac"] == 0.0
    _close(m["actor/ratio_mean"], 1.0, 1e-6)
    _close(m["actor/ratio_max"], 1.1, 1e-6)
    # ppo_kl = mean(-log r) = -(ln 1.1 + ln 0.9 + 0)/3 = -(0.0953102 - 0.1053605)/3 = 0.0033501
    # k3 = mean(r - 1 - ln r) = ((0.1 - 0.0953102) + (-0.1 + 0.1053605) + 0)/3 = 0.0033501
    _close(m["actor/ppo_kl"], 0.0033501, 1e-6)
    _close(m["actor/approx_kl_k3"], 0.0033501, 1e-6)


def test_upper_clip_binds_for_positive_advantage():
    # A = 1, r = [1.5, 1, 1], clip_high 0.2: token 0 max(-1.5, -1.2) = -1.2 (clipped, constant -> grad 0)
    # loss = (-1.2 - 1 - 1)/3 = -1.0666667; grad = [0, -1/3, -1/3]
    logp, old = _logp_from_ratio([-1.0, -2.0, -0.5], [1.5, 1.0, 1.0])
    loss, grad, m = _loss_and_grad(logp, old, torch.tensor([1.0], dtype=D), ALL3)
    _close(loss, -3.2 / 3)
    _close(grad, [[0.0, -1 / 3, -1 / 3]])
    _close(m["actor/clipfrac"], 1 / 3, 1e-6)
    _close(m["actor/clipfrac_upper"], 1 / 3, 1e-6)
    assert m["actor/clipfrac_lower"] == 0.0
    _close(m["actor/ratio_max"], 1.5, 1e-6)


def test_lower_clip_binds_for_negative_advantage():
    # A = -1, r = [0.5, 1, 1], clip_low 0.2: token 0 max(-A r, -A 0.8) = max(0.5, 0.8) = 0.8 (clipped, grad 0)
    # loss = (0.8 + 1 + 1)/3 = 0.9333333; grad of tokens 1, 2: -A r / 3 = +1/3
    logp, old = _logp_from_ratio([-1.0, -2.0, -0.5], [0.5, 1.0, 1.0])
    loss, grad, m = _loss_and_grad(logp, old, torch.tensor([-1.0], dtype=D), ALL3)
    _close(loss, 2.8 / 3)
    _close(grad, [[0.0, 1 / 3, 1 / 3]])
    _close(m["actor/clipfrac_lower"], 1 / 3, 1e-6)
    assert m["actor/clipfrac_upper"] == 0.0


def test_clip_does_not_bind_on_the_pessimistic_side():
    # A = [1, -1] per token, r = [0.5, 1.5]:
    # token 0: max(-0.5, -0.8) = -0.5 (unclipped), grad -A r / 2 = -0.25
    # token 1: max(1.5, 1.2) = 1.5 (unclipped), grad -A r / 2 = +0.75; loss = (-0.5 + 1.5)/2 = 0.5
    logp, old = _logp_from_ratio([-1.0, -2.0], [0.5, 1.5])
    adv = torch.tensor([[1.0, -1.0]], dtype=D)
    loss, grad, m = _loss_and_grad(logp, old, adv, torch.ones(1, 2, dtype=torch.bool))
    _close(loss, 0.5)
    _close(grad, [[-0.25, 0.75]])
    assert m["actor/clipfrac"] == 0.0


def test_asymmetric_clip_higher():
    # clip_low 0.2, clip_high 0.28 (DAPO), A = [1, 1, -1], r = [1.25, 1.3, 0.75]
    # token 0: 1.25 < 1.28 -> -1.25, grad -1.25/3; token 1: 1.3 > 1.28 -> -1.28, grad 0
    # token 2: A < 0, r < 0.8 -> max(0.75, 0.8) = 0.8, grad 0; loss = (-1.25 - 1.28 + 0.8)/3 = -1.73/3
    logp, old = _logp_from_ratio([-1.0, -2.0, -0.5], [1.25, 1.3, 0.75])
    adv = torch.tensor([[1.0, 1.0, -1.0]], dtype=D)
    loss, grad, m = _loss_and_grad(logp, old, adv, ALL3, clip_low=0.2, clip_high=0.28)
    _close(loss, -1.73 / 3)
    _close(grad, [[-1.25 / 3, 0.0, 0.0]])
    _close(m["actor/clipfrac"], 2 / 3, 1e-6)
    _close(m["actor/clipfrac_upper"], 1 / 3, 1e-6)
    _close(m["actor/clipfrac_lower"], 1 / 3, 1e-6)
    # with the symmetric 0.2, token 0 would clip too: (-1.2 - 1.2 + 0.8)/3 = -1.6/3
    logp2, _ = _logp_from_ratio([-1.0, -2.0, -0.5], [1.25, 1.3, 0.75])
    _close(policy_loss(logp2, old, adv, ALL3)[0].item(), -1.6 / 3)


def test_dual_clip_caps_negative_advantage_with_large_ratio():
    # c = 3, A = [-1, -1, 1], r = [5, 2, 5]
    # token 0: max(5, 1.2) = 5 > -A c = 3 -> 3 (dual clipped, grad 0)
    # token 1: max(2, 1.2) = 2 < 3 -> 2, grad -A r / 3 = 2/3
    # token 2: A > 0, dual clip does not apply: max(-5, -1.2) = -1.2 (upper clip, grad 0)
    # loss = (3 + 2 - 1.2)/3 = 3.8/3; without dual clip (5 + 2 - 1.2)/3 = 5.8/3
    logp, old = _logp_from_ratio([-3.0, -2.0, -4.0], [5.0, 2.0, 5.0])
    adv = torch.tensor([[-1.0, -1.0, 1.0]], dtype=D)
    loss, grad, m = _loss_and_grad(logp, old, adv, ALL3, dual_clip=3.0)
    _close(loss, 3.8 / 3)
    _close(grad, [[0.0, 2 / 3, 0.0]])
    _close(m["actor/dual_clipfrac"], 1 / 3, 1e-6)
    _close(m["actor/clipfrac"], 1 / 3, 1e-6)
    _close(m["actor/ratio_max"], 5.0, 1e-5)
    logp2, _ = _logp_from_ratio([-3.0, -2.0, -4.0], [5.0, 2.0, 5.0])
    _close(policy_loss(logp2, old, adv, ALL3)[0].item(), 5.8 / 3)


def test_unclipped_surrogate_with_clip_low_one_and_clip_high_inf():
    # the study's on-policy tokens in injection runs: -A r with no clip; A = 1, r = [3, 0.1] -> (-3 - 0.1)/2
    logp, old = _logp_from_ratio([-3.0, -1.0], [3.0, 0.1])
    loss, grad, m = _loss_and_grad(
        logp, old, torch.tensor([1.0], dtype=D), torch.ones(1, 2), clip_low=1.0, clip_high=math.inf
    )
    _close(loss, -3.1 / 2)
    _close(grad, [[-1.5, -0.05]])
    assert m["actor/clipfrac"] == 0.0


def test_on_policy_loss_is_minus_mean_advantage():
    # logp == old_logp: r = 1 everywhere; loss = -mean(A) over masked = -(1 - 2 + 0.5 + 3)/4 = -0.625
    old = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -0.1, -5.0]], dtype=D)
    logp = old.clone().requires_grad_()
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 9.0, 9.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    loss, _, m = _loss_and_grad(logp, old, adv, mask)
    _close(loss, -0.625)
    assert m["actor/ratio_mean"] == 1.0
    assert m["actor/ratio_max"] == 1.0
    assert m["actor/clipfrac"] == 0.0
    assert m["actor/ppo_kl"] == 0.0
    assert m["actor/approx_kl_k3"] == 0.0


# ------------------------------------------------------------------------- aggregation


# loss tokens [[1, 2, 3], [4, 5, pad]]: masked sum 15, 5 tokens, row sums 6 and 9, row lengths 3 and 2
RAGGED_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=D)
RAGGED_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
RAGGED_EXPECTED = {
    "token-mean": 15 / 5,  # 3.0
    "seq-mean-token-mean": (6 / 3 + 9 / 2) / 2,  # (2 + 4.5)/2 = 3.25
    "seq-mean-token-sum": (6 + 9) / 2,  # 7.5
    "seq-mean-token-sum-norm": 15 / (2 * 4),  # max_len 4: 1.875
}


@pytest.mark.parametrize("agg", sorted(RAGGED_EXPECTED))
def test_aggregate_ragged_batch(agg):
    _close(aggregate(RAGGED_LOSS, RAGGED_MASK, agg, max_len=4), RAGGED_EXPECTED[agg])


@pytest.mark.parametrize("agg", sorted(RAGGED_EXPECTED))
def test_policy_loss_aggregation_on_policy(agg):
    # on-policy r = 1 so loss_t = -A_t: A = -RAGGED_LOSS reproduces the aggregates above
    old = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -0.1, -5.0]], dtype=D)
    logp = old.clone().requires_grad_()
    loss, _ = policy_loss(logp, old, -RAGGED_LOSS, RAGGED_MASK, agg=agg, max_len=4)
    _close(loss, RAGGED_EXPECTED[agg])


def test_token_mean_gradient_on_ragged_batch():
    # d/dlogp_t (-A_t r_t / 5) at r = 1 is loss_t / 5; padding gets 0
    old = torch.zeros(2, 3, dtype=D)
    logp = old.clone().requires_grad_()
    policy_loss(logp, old, -RAGGED_LOSS, RAGGED_MASK)[0].backward()
    _close(logp.grad, [[0.2, 0.4, 0.6], [0.8, 1.0, 0.0]])


def test_empty_sequence_contributes_nothing():
    # row 1 empty; masked rows as in RAGGED_LOSS: sum 15, 5 tokens, 2 non-empty sequences, B = 3
    loss = torch.tensor([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [4.0, 5.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    _close(aggregate(loss, mask, "token-mean"), 3.0)
    _close(aggregate(loss, mask, "seq-mean-token-mean"), 3.25)
    _close(aggregate(loss, mask, "seq-mean-token-sum"), 7.5)
    _close(aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=4), 15 / 12)  # constant B * max_len


@pytest.mark.parametrize("agg", sorted(RAGGED_EXPECTED))
def test_all_empty_mask_gives_zero_loss_that_backpropagates(agg):
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    loss, m = policy_loss(
        logp, torch.zeros(2, 3, dtype=D), torch.ones(2, dtype=D), torch.zeros(2, 3), agg=agg, max_len=4
    )
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3, dtype=D))
    assert all(v == 0.0 for v in m.values())


def test_dr_grpo_without_max_len_is_an_error():
    with pytest.raises(ValueError, match="max_len"):
        aggregate(RAGGED_LOSS, RAGGED_MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), RAGGED_MASK, agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_len"):  # row 0 has 3 tokens
        aggregate(RAGGED_LOSS, RAGGED_MASK, "seq-mean-token-sum-norm", max_len=2)


def test_unknown_aggregation_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'token-mean'") as e:
        aggregate(RAGGED_LOSS, RAGGED_MASK, "token_mean")
    assert "seq-mean-token-sum-norm" in str(e.value)


def test_registered_aggregation_is_usable_by_name():
    @register_aggregation("test-token-sum")
    def _token_sum(loss_tokens, mask, max_len):
        return loss_tokens.sum(), torch.tensor(1.0)

    try:
        _close(aggregate(RAGGED_LOSS, RAGGED_MASK, "test-token-sum"), 15.0)
        with pytest.raises(ValueError, match="already registered"):
            register_aggregation("test-token-sum")(_token_sum)
    finally:
        _AGGREGATIONS.pop("test-token-sum")


def test_only_aggregations_registered_with_uses_max_len_read_it():
    assert [a for a in available_aggregations() if aggregation_uses_max_len(a)] == ["seq-mean-token-sum-norm"]

    @register_aggregation("test-token-sum-over-max-len", uses_max_len=True)
    def _over_max_len(loss_tokens, mask, max_len):
        return loss_tokens.sum(), torch.tensor(float(max_len))

    try:
        assert aggregation_uses_max_len("test-token-sum-over-max-len")
        _close(aggregate(RAGGED_LOSS, RAGGED_MASK, "test-token-sum-over-max-len", max_len=5), 3.0)
    finally:
        _AGGREGATIONS.pop("test-token-sum-over-max-len")
        _USES_MAX_LEN.discard("test-token-sum-over-max-len")
    with pytest.raises(ValueError, match="did you mean 'token-mean'"):
        aggregation_uses_max_len("token_mean")


@pytest.mark.parametrize("agg", sorted(RAGGED_EXPECTED))
def test_micro_batches_with_summed_denominator_rebuild_the_batch_loss(agg):
    rows = [(RAGGED_LOSS[i : i + 1], RAGGED_MASK[i : i + 1]) for i in range(2)]
    den = sum(aggregation_denominator(m, agg, max_len=4) for _, m in rows)
    total = sum(aggregate(lo, m, agg, max_len=4, denominator=den) for lo, m in rows)
    _close(total, RAGGED_EXPECTED[agg])


# ------------------------------------------------------------------------- inputs


def test_nan_at_masked_position_is_rejected():
    logp = torch.tensor([[-1.0, float("nan"), -1.0]])
    with pytest.raises(ValueError, match="logp"):
        policy_loss(logp, torch.zeros(1, 3), torch.ones(1), ALL3)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(torch.zeros(1, 3), torch.tensor([[0.0, math.inf, 0.0]]), torch.ones(1), ALL3)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([math.nan]), ALL3)


def test_garbage_in_padding_is_ignored():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    clean_logp = torch.tensor([[-1.0, -2.0, 0.0]], dtype=D, requires_grad=True)
    dirty_logp = torch.tensor([[-1.0, -2.0, math.nan]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, 0.0]], dtype=D)
    dirty_old = torch.tensor([[-1.5, -1.0, -math.inf]], dtype=D)
    adv = torch.tensor([[1.0, -0.5, 0.0]], dtype=D)
    dirty_adv = torch.tensor([[1.0, -0.5, math.inf]], dtype=D)
    clean, m_clean = policy_loss(clean_logp, old, adv, mask, is_weights=torch.tensor([[1.0, 2.0, 0.0]], dtype=D))
    dirty, m_dirty = policy_loss(
        dirty_logp, dirty_old, dirty_adv, mask, is_weights=torch.tensor([[1.0, 2.0, math.nan]])
    )
    (clean + dirty).backward()
    _close(dirty, clean.detach())
    assert m_dirty == m_clean
    _close(dirty_logp.grad, clean_logp.grad)
    assert dirty_logp.grad[0, 2] == 0.0


def test_per_sequence_advantages_broadcast_like_per_token():
    old = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -0.1, -5.0]], dtype=D)
    logp = old + torch.tensor([[0.3, -0.4, 0.1], [0.05, -0.3, 0.2]], dtype=D)
    adv_seq = torch.tensor([0.7, -1.3], dtype=D)
    a, ma = policy_loss(logp, old, adv_seq, RAGGED_MASK)
    b, mb = policy_loss(logp, old, adv_seq[:, None].expand(2, 3), RAGGED_MASK)
    _close(a, b)
    assert ma == mb


def test_float_mask_equals_bool_mask_and_bad_masks_are_rejected():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-1.2, -2.0, -2.5]])
    a = policy_loss(logp, old, torch.ones(1), torch.tensor([[1.0, 1.0, 0.0]]))[0]
    b = policy_loss(logp, old, torch.ones(1), torch.tensor([[True, True, False]]))[0]
    _close(a, b)
    with pytest.raises(ValueError, match="0/1"):
        policy_loss(logp, old, torch.ones(1), torch.tensor([[1.0, 0.5, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(logp, old, torch.ones(1), torch.ones(1, 2))


def test_shape_mismatches_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3), is_weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.ones(3))


@pytest.mark.parametrize(
    "kw", [{"clip_low": -0.1}, {"clip_low": 1.5}, {"clip_high": -0.1}, {"dual_clip": 1.0}, {"agg": "nope"}]
)
def test_bad_options_are_rejected(kw):
    with pytest.raises(ValueError):
        policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1), ALL3, **kw)


def test_inputs_are_not_modified():
    logp = torch.tensor([[-1.0, -2.0, math.nan]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, math.inf]])
    adv = torch.tensor([0.5])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = torch.tensor([[1.0, 2.0, 3.0]])
    before = [t.detach().clone() for t in (logp, old, adv, mask, w)]
    policy_loss(logp, old, adv, mask, is_weights=w)[0].backward()
    offpolicy_shaped_loss(logp, adv, mask)
    for b, t in zip(before, (logp, old, adv, mask, w), strict=True):
        torch.testing.assert_close(t.detach(), b, equal_nan=True)


def test_is_weights_scale_loss_and_gradient():
    # on-policy, A = 1: loss_t = -w_t = [-2, -0.5, -1]; mean -3.5/3; grad -A r w / 3 = [-2/3, -0.5/3, -1/3]
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=D, requires_grad=True)
    w = torch.tensor([[2.0, 0.5, 1.0]], dtype=D, requires_grad=True)
    loss, grad, _ = _loss_and_grad(logp, logp.detach(), torch.tensor([1.0], dtype=D), ALL3, is_weights=w)
    _close(loss, -3.5 / 3)
    _close(grad, [[-2 / 3, -0.5 / 3, -1 / 3]])
    assert w.grad is None  # weights are constants


def test_huge_log_ratio_keeps_gradient_finite():
    # log r = 200 would overflow exp; the token is upper-clipped (A > 0) so its loss is -1.2, grad 0
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-200.0, -1.0]])
    loss, grad, _ = _loss_and_grad(logp, old, torch.ones(1), torch.ones(1, 2))
    _close(loss, (-1.2 - 1.0) / 2, 1e-6)
    assert torch.isfinite(grad).all()
    assert grad[0, 0] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    st.lists(st.floats(-2, 2).map(lambda x: round(x, 3)), min_size=4, max_size=4),
    st.floats(0.0, 1.0),
    st.floats(0.0, 5.0),
)
def test_clipped_loss_is_pessimistic_bound_of_unclipped(log_ratio, adv, clip_low, clip_high):
    # max(-A r, -A clip(r)) >= -A r token by token, so every aggregate is >= the unclipped one
    old = torch.zeros(2, 2, dtype=D)
    logp = torch.tensor(log_ratio, dtype=D).view(2, 2)
    a = torch.tensor(adv, dtype=D).view(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    clipped, m = policy_loss(logp, old, a, mask, clip_low=clip_low, clip_high=clip_high)
    free, _ = policy_loss(logp, old, a, mask, clip_low=1.0, clip_high=math.inf)
    assert clipped.item() >= free.item() - 1e-12
    assert 0.0 <= m["actor/clipfrac"] <= 1.0
    assert m["actor/clipfrac"] == pytest.approx(m["actor/clipfrac_upper"] + m["actor/clipfrac_lower"], abs=1e-6)


# ------------------------------------------------------------------------- off-policy shaping


def test_offpolicy_shaped_loss_value_and_gradient():
    # p = [0.5, 0.1], gamma 0.1, A = 2: p/(p+g) = [0.5/0.6, 0.1/0.2] = [0.8333333, 0.5]
    # loss_t = -A p/(p+g) = [-1.6666667, -1.0]; token mean -1.3333333
    # d/dlogp p/(p+g) = g p/(p+g)^2 = [0.05/0.36, 0.01/0.04] = [0.1388889, 0.25]; grad = -A * that / 2
    logp = torch.tensor([[math.log(0.5), math.log(0.1)]], dtype=D, requires_grad=True)
    loss = offpolicy_shaped_loss(logp, torch.tensor([2.0], dtype=D), torch.ones(1, 2), gamma=0.1)
    loss.backward()
    _close(loss, -4 / 3)
    _close(logp.grad, [[-0.05 / 0.36, -0.25]])


def test_offpolicy_shaped_loss_padding_extremes_and_aggregation():
    # row 0: p = 1 -> 1/1.1; row 1: logp = -1000, p ~ 0 -> ~0; padding NaN ignored. A = [1, 1]
    # seq-mean-token-sum-norm, max_len 3: (-1/1.1 - 0)/(2 * 3)
    logp = torch.tensor([[0.0, math.nan], [-1000.0, math.nan]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    loss = offpolicy_shaped_loss(logp, torch.ones(2, dtype=D), mask, agg="seq-mean-token-sum-norm", max_len=3)
    loss.backward()
    _close(loss, -1 / 1.1 / 6)
    assert torch.isfinite(logp.grad).all()
    with pytest.raises(ValueError, match="gamma"):
        offpolicy_shaped_loss(logp, torch.ones(2), mask, gamma=0.0)
    with pytest.raises(ValueError, match="logp"):
        offpolicy_shaped_loss(logp, torch.ones(2), torch.ones(2, 2))
