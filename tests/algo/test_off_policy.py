"""Off-policy corrections by name (`lcot_mega.algo.off_policy`), against weights worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcot_mega.algo.losses import policy_loss
from lcot_mega.algo.off_policy import correction_bounds, off_policy_weights

D = torch.float64


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=0, atol=tol)


def test_token_weights_and_cap():
    # old - rollout = [0, 0.5, 2] -> w = [1, e^0.5, min(e^2, 2)] = [1, 1.6487213, 2]
    # mean (1 + 1.6487213 + 2)/3 = 1.5495738; capped 1/3; |gap| mean 2.5/3 = 0.8333333, max 2
    w, m = off_policy_weights(
        torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.0, -1.5, -3.0]]), torch.ones(1, 3), "tis"
    )
    _close(w, [[1.0, 1.6487213, 2.0]])
    _close(m["rollout/is_weight_mean"], 1.5495738)
    _close(m["rollout/is_capped_frac"], 1 / 3)
    _close(m["rollout/logp_gap_mean"], 2.5 / 3)
    _close(m["rollout/logp_gap_max"], 2.0)


def test_weights_below_one_are_not_floored():
    # old - rollout = -0.5 -> e^-0.5 = 0.6065307
    w, m = off_policy_weights(torch.tensor([[-1.5]]), torch.tensor([[-1.0]]), torch.ones(1, 1), "tis")
    _close(w, [[0.6065307]])
    assert m["rollout/is_capped_frac"] == 0.0


def test_sequence_mode_multiplies_token_ratios():
    # row 0: gaps [0.2, -0.1], pad -> sum 0.1 -> e^0.1 = 1.1051709 on both tokens, 0 at padding
    # row 1: gaps [1, 1, 1] -> e^3 = 20.1 -> capped at 2 on all three tokens
    # 5 masked tokens: mean (2 * 1.1051709 + 3 * 2)/5 = 1.6420684; capped 3/5; |gap| mean 3.3/5 = 0.66, max 1
    old = torch.tensor([[-1.0, -1.0, math.nan], [-1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-1.2, -0.9, 0.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w, m = off_policy_weights(old, rollout, mask, "seq_tis", high=2.0)
    _close(w, [[1.1051709, 1.1051709, 0.0], [2.0, 2.0, 2.0]])
    _close(m["rollout/is_weight_mean"], 1.6420684)
    _close(m["rollout/is_capped_frac"], 0.6)
    _close(m["rollout/logp_gap_mean"], 0.66)
    _close(m["rollout/logp_gap_max"], 1.0)


def test_padding_gets_zero_weight_and_garbage_there_is_ignored():
    old = torch.tensor([[-1.0, math.nan], [-2.0, -math.inf]])
    rollout = torch.tensor([[-1.0, 0.0], [-2.5, math.nan]])
    w, m = off_policy_weights(old, rollout, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "tis")
    _close(w, [[1.0, 0.0], [1.6487213, 0.0]])  # e^0.5
    _close(m["rollout/logp_gap_max"], 0.5)


def test_weights_are_detached():
    old = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    w, _ = off_policy_weights(old, torch.tensor([[-1.1, -1.9]]), torch.ones(1, 2), "tis")
    assert not w.requires_grad


def test_huge_gap_is_capped_without_overflow():
    w, m = off_policy_weights(torch.tensor([[0.0]]), torch.tensor([[-1000.0]]), torch.ones(1, 1), "tis", high=5.0)
    _close(w, [[5.0]])
    assert m["rollout/is_capped_frac"] == 1.0


def test_empty_mask_gives_zero_weights_and_metrics():
    w, m = off_policy_weights(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2), "tis")
    assert torch.equal(w, torch.zeros(2, 2))
    assert all(v == 0.0 for v in m.values())


def test_bad_inputs_are_rejected():
    ones = torch.ones(1, 2)
    with pytest.raises(ValueError, match="unknown off-policy correction 'seq'"):
        off_policy_weights(torch.zeros(1, 2), torch.zeros(1, 2), ones, "seq")
    with pytest.raises(ValueError, match="cap below 1"):
        off_policy_weights(torch.zeros(1, 2), torch.zeros(1, 2), ones, "tis", high=0.5)
    with pytest.raises(ValueError, match="rollout_logp"):
        off_policy_weights(torch.zeros(1, 2), torch.tensor([[0.0, math.nan]]), ones, "tis")
    with pytest.raises(ValueError, match="shape"):
        off_policy_weights(torch.zeros(1, 2), torch.zeros(1, 3), ones, "tis")


def test_weights_feed_policy_loss():
    # on-policy (r = 1), A = 1: loss_t = -w_t; w = [1, e^0.5] -> mean -(1 + 1.6487213)/2 = -1.3243607
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    w, _ = off_policy_weights(logp, torch.tensor([[-1.0, -1.5]]), torch.ones(1, 2), "tis")
    loss, _ = policy_loss(logp, logp.detach(), torch.ones(1), torch.ones(1, 2), is_weights=w)
    _close(loss.item(), -1.3243607)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=6, max_size=6),
    st.floats(1.0, 10.0),
    st.sampled_from(["tis", "seq_tis"]),
)
def test_weights_lie_in_zero_to_cap(gaps, cap, mode):
    rollout = torch.tensor(gaps, dtype=D).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w, m = off_policy_weights(torch.zeros(2, 3, dtype=D), -rollout, mask, mode, high=cap)
    assert (w[mask] > 0).all()
    assert (w <= cap * (1 + 1e-12)).all()
    assert w[0, 2] == 0.0
    assert 0.0 <= m["rollout/is_capped_frac"] <= 1.0


# Four tokens of one sequence and two of another; log rho = prox - rollout per token:
#   row 0: [0.5, -1.0, 2.0, 0.0] -> rho = [1.6487213, 0.3678794, 7.3890561, 1]
#   row 1: [0.1, 0.2, pad, pad]  -> rho = [1.1051709, 1.2214028]
PROX = torch.tensor([[-1.0, -2.0, -1.0, -1.0], [-1.0, -1.0, 0.0, 0.0]])
ROLL = torch.tensor([[-1.5, -1.0, -3.0, -1.0], [-1.1, -1.2, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
RHO0 = [1.6487213, 0.3678794, 7.3890561, 1.0]
RHO1 = [1.1051709, 1.2214028]


def test_none_gives_no_weights_but_measures_the_gap():
    w, m = off_policy_weights(PROX, ROLL, MASK, "none")
    assert w is None
    _close(m["rollout/logp_gap_mean"], (0.5 + 1 + 2 + 0 + 0.1 + 0.2) / 6)
    _close(m["rollout/logp_gap_max"], 2.0)
    _close(m["rollout/is_weight_mean"], 1.0)
    assert m["rollout/is_masked_frac"] == 0.0


def test_mis_masks_tokens_above_the_cap_and_keeps_the_ratio_below():
    # high 2: token 2 of row 0 (7.39) is masked; the others keep rho, including 0.37 (one-sided)
    w, m = off_policy_weights(PROX, ROLL, MASK, "mis", high=2.0)
    _close(w, [[RHO0[0], RHO0[1], 0.0, 1.0], [RHO1[0], RHO1[1], 0.0, 0.0]])
    _close(m["rollout/is_masked_frac"], 1 / 6)
    assert m["rollout/is_capped_frac"] == 0.0
    _close(m["rollout/is_weight_mean"], (RHO0[0] + RHO0[1] + 1 + RHO1[0] + RHO1[1]) / 6)


def test_seq_mis_masks_whole_sequences_by_their_product():
    # row 0: sum 1.5 -> rho_seq e^1.5 = 4.4816891 > 2 -> all four masked; row 1: e^0.3 = 1.3498588 kept on both
    w, m = off_policy_weights(PROX, ROLL, MASK, "seq_mis", high=2.0)
    _close(w, [[0.0] * 4, [1.3498588, 1.3498588, 0.0, 0.0]])
    _close(m["rollout/is_masked_frac"], 4 / 6)


def test_seq_tis_truncates_whole_sequences():
    # row 0: e^1.5 = 4.48 -> capped at 3; row 1: e^0.3 under the cap
    w, m = off_policy_weights(PROX, ROLL, MASK, "seq_tis", high=3.0)
    _close(w, [[3.0] * 4, [1.3498588, 1.3498588, 0.0, 0.0]])
    _close(m["rollout/is_capped_frac"], 4 / 6)


def test_icepop_masks_on_both_sides():
    # [0.5, 5]: 0.37 (below) and 7.39 (above) are masked, the rest keep rho
    w, m = off_policy_weights(PROX, ROLL, MASK, "icepop")
    _close(w, [[RHO0[0], 0.0, 0.0, 1.0], [RHO1[0], RHO1[1], 0.0, 0.0]])
    _close(m["rollout/is_masked_frac"], 2 / 6)
    assert correction_bounds("icepop") == correction_bounds("icepop", 0.5, 5.0)


def test_geo_mask_rejects_by_the_geometric_mean_without_reweighting():
    # row 0: mean log rho 1.5/4 = 0.375 -> 1.4549914; row 1: 0.3/2 = 0.15 -> 1.1618342
    # [0.5, 1.3]: row 0 rejected, row 1 kept with weight 1 (not its ratio)
    w, m = off_policy_weights(PROX, ROLL, MASK, "geo_mask", low=0.5, high=1.3)
    _close(w, [[0.0] * 4, [1.0, 1.0, 0.0, 0.0]])
    _close(m["rollout/is_masked_frac"], 4 / 6)
    # [0.5, 2]: both geometric means inside, every token weight 1
    w, _ = off_policy_weights(PROX, ROLL, MASK, "geo_mask")
    _close(w, MASK.double())


def test_decoupled_weights_by_the_full_ratio_and_masks_above_its_cap():
    w, m = off_policy_weights(PROX, ROLL, MASK, "decoupled")
    _close(w, [RHO0, [RHO1[0], RHO1[1], 0.0, 0.0]])  # no cap: 7.39 stays
    assert m["rollout/is_masked_frac"] == 0.0
    w, m = off_policy_weights(PROX, ROLL, MASK, "decoupled", high=5.0)
    _close(w, [[RHO0[0], RHO0[1], 0.0, 1.0], [RHO1[0], RHO1[1], 0.0, 0.0]])
    _close(m["rollout/is_masked_frac"], 1 / 6)


def test_decoupled_loss_is_the_clip_against_the_proximal_policy_times_the_behaviour_weight():
    # one token, A = 1, pi_theta = pi_prox * e^0.3 (r = 1.3499 > 1.2: clipped, no gradient), mu = pi_prox * e^-0.5
    # loss = -w * min(r A, clip(r) A) = -e^0.5 * 1.2 = -1.9784655; a token with r inside the clip
    # (pi_theta = pi_prox) has gradient -w * d r / d logp = -e^0.5 = -1.6487213.
    prox = torch.tensor([[-1.0, -1.0]])
    logp = torch.tensor([[-0.7, -1.0]], requires_grad=True)
    w, _ = off_policy_weights(prox, torch.tensor([[-1.5, -1.5]]), torch.ones(1, 2), "decoupled")
    loss, _ = policy_loss(logp, prox, torch.ones(1), torch.ones(1, 2), is_weights=w, agg="seq-mean-token-sum")
    _close(loss.item(), -1.9784655 - 1.6487213)
    loss.backward()
    _close(logp.grad, [[0.0, -1.6487213]])


def test_bounds_a_correction_does_not_read_are_refused():
    with pytest.raises(ValueError, match="no lower bound"):
        correction_bounds("tis", low=0.5)
    with pytest.raises(ValueError, match="no upper bound"):
        correction_bounds("none", high=2.0)
    with pytest.raises(ValueError, match="must be below"):
        correction_bounds("icepop", 3.0, 2.0)
    assert correction_bounds("decoupled").high is None
    assert correction_bounds("mis", high=4.0).high == 4.0
