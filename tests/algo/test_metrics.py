"""Batch metrics of the advantage / selection stage, values worked by hand."""

from __future__ import annotations

import pytest
from helpers.tensor_helpers import b, ids, t

from lcot_mega.algo.metrics import KEEP_METRIC_KEYS, METRIC_KEYS, batch_metrics

# group 0 = [.5, -.5], group 1 = [0, 0] (no signal), group 2 = [1, -.25]
ADV = t(0.5, -0.5, 0, 0, 1.0, -0.25)
GIDS = ids(0, 0, 1, 1, 2, 2)
CORRECT = b(1, 0, 1, 1, 1, 0)


def test_batch_metrics_hand_worked():
    m = batch_metrics(ADV, CORRECT, GIDS)
    assert tuple(m) == METRIC_KEYS
    assert all(type(v) is float for v in m.values())
    expected = {
        "reward/accuracy": 4 / 6,
        "adv/zero_frac_samples": 2 / 6,
        "adv/zero_frac_groups": 1 / 3,  # only group 1 is all zero
        "adv/mean": 0.75 / 6,  # .5 - .5 + 0 + 0 + 1 - .25 = .75
        "adv/abs_mean": 2.25 / 6,  # .5 + .5 + 1 + .25 = 2.25
        "polarity/pos_count": 2.0,
        "polarity/neg_count": 2.0,
        "polarity/zero_count": 2.0,
        "polarity/pos_share": 1.5 / 2.25,  # positive mass .5 + 1
        "polarity/neg_share": 0.75 / 2.25,  # negative mass .5 + .25
    }
    assert m == pytest.approx(expected, abs=1e-7)


def test_batch_metrics_with_keep():
    keep = b(1, 1, 1, 0, 1, 0)  # kept advantages [.5, -.5, 0, 1]
    m = batch_metrics(ADV, CORRECT, GIDS, keep=keep)
    assert tuple(m) == METRIC_KEYS + KEEP_METRIC_KEYS
    assert m["polarity/kept_pos_count"] == 2.0
    assert m["polarity/kept_neg_count"] == 1.0
    assert m["polarity/kept_zero_count"] == 1.0
    assert m["polarity/kept_pos_share"] == pytest.approx(1.5 / 2.0)
    assert m["polarity/kept_neg_share"] == pytest.approx(0.5 / 2.0)
    assert m["select/kept_frac"] == pytest.approx(4 / 6)
    assert m["polarity/pos_count"] == 2.0  # unkept metrics unchanged


def test_no_signal_gives_zero_shares_not_nan():
    m = batch_metrics(t(0, 1e-9, 0), b(1, 1, 0), ids(0, 0, 1), keep=b(0, 0, 0))
    assert m["polarity/pos_share"] == 0.0 and m["polarity/neg_share"] == 0.0
    assert m["polarity/zero_count"] == 3.0  # 1e-9 is within tol
    assert m["adv/zero_frac_groups"] == 1.0
    assert m["polarity/kept_pos_share"] == 0.0 and m["select/kept_frac"] == 0.0
    assert m["polarity/kept_zero_count"] == 0.0


def test_tolerance_changes_polarity():
    m = batch_metrics(t(0.05, -0.05), b(1, 0), ids(0, 0), tol=0.1)
    assert (m["polarity/pos_count"], m["polarity/neg_count"], m["polarity/zero_count"]) == (0.0, 0.0, 2.0)
    assert m["adv/zero_frac_groups"] == 1.0


def test_empty_batch_all_zero():
    m = batch_metrics(t(), b(), ids(), keep=b())
    assert tuple(m) == METRIC_KEYS + KEEP_METRIC_KEYS
    assert set(m.values()) == {0.0}


def test_rejections():
    with pytest.raises(ValueError, match=r"advantages contains 1 NaN/Inf"):
        batch_metrics(t(float("nan"), 0), b(1, 0), ids(0, 0))
    with pytest.raises(ValueError, match="shape mismatch"):
        batch_metrics(ADV, CORRECT, GIDS, keep=b(1, 0))
    with pytest.raises(ValueError, match="shape mismatch"):
        batch_metrics(ADV, CORRECT[:3], GIDS)
    with pytest.raises(ValueError, match="tol"):
        batch_metrics(ADV, CORRECT, GIDS, tol=-1.0)


def test_kept_polarity_is_read_from_the_advantages_the_update_uses():
    # group-normalized +1 / -1 (shares 0.5 / 0.5); the update scales the positive by 0.25 -> 0.25 / 1.25 = 0.2
    m = batch_metrics(t(1, -1), b(1, 0), ids(0, 0), keep=b(1, 1), update_advantages=t(0.25, -1))
    assert m["polarity/pos_share"] == 0.5 and m["polarity/kept_pos_share"] == pytest.approx(0.2)
    # a weight of 0 leaves the update no positive sample: it counts as zero, not positive
    m = batch_metrics(t(1, -1), b(1, 0), ids(0, 0), keep=b(1, 1), update_advantages=t(0, -1))
    assert (m["polarity/kept_pos_count"], m["polarity/kept_zero_count"], m["polarity/kept_neg_share"]) == (0, 1, 1)
