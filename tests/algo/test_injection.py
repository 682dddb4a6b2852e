"""The study's offline injection: which wrong answers get replaced, and the rewards afterwards."""

from __future__ import annotations

import pytest
import torch
from helpers.tensor_helpers import b, bits, ids, t

from lcot_mega.algo.groups import group_rank
from lcot_mega.algo.injection import offline_injection_mask

# interleaved groups: group 5 = even positions, correct [0,1,0,0] (accuracy .25);
# group 2 = odd positions, correct [0,1,1,0] (accuracy .5)
CORRECT = b(0, 0, 1, 1, 0, 1, 0, 0)
GIDS = ids(5, 2, 5, 2, 5, 2, 5, 2)
AVAIL = ids(0, 0, 9, 0, 0, 2)  # indexed by group id: 9 solutions for group 2, 2 for group 5


def test_marks_earliest_incorrect_of_hard_groups_up_to_available():
    # alpha .25: only group 5 is hard; its incorrect samples are positions 0, 4, 6; 2 available -> 0, 4
    assert bits(offline_injection_mask(CORRECT, GIDS, 0.25, AVAIL)) == [1, 0, 0, 0, 1, 0, 0, 0]


def test_truncated_samples_are_skipped_not_replaced():
    trunc = b(1, 0, 0, 0, 0, 0, 0, 0)
    # position 0 is truncated: the next incorrect ones of group 5, positions 4 and 6, are marked
    assert bits(offline_injection_mask(CORRECT, GIDS, 0.25, AVAIL, truncated=trunc)) == [0, 0, 0, 0, 1, 0, 1, 0]


def test_alpha_threshold_and_budget():
    # alpha .5 makes group 2 hard too: its incorrect positions 1 and 7, 9 available -> both
    assert bits(offline_injection_mask(CORRECT, GIDS, 0.5, AVAIL)) == [1, 1, 0, 0, 1, 0, 0, 1]
    # alpha 0: neither group has accuracy 0
    assert bits(offline_injection_mask(CORRECT, GIDS, 0.0, AVAIL)) == [0] * 8
    # no offline solutions anywhere
    assert bits(offline_injection_mask(CORRECT, GIDS, 0.5, torch.zeros(6, dtype=torch.long))) == [0] * 8


def test_all_wrong_group_and_exact_accuracy_boundary():
    # group 0: 10 samples, 1 correct -> accuracy 1/10 <= alpha .1 (the threshold is inclusive)
    c = torch.tensor([1] + [0] * 9, dtype=torch.bool)
    out = offline_injection_mask(c, torch.zeros(10, dtype=torch.long), 0.1, ids(3))
    assert bits(out) == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    # an all-wrong singleton group (accuracy 0) with one solution
    assert bits(offline_injection_mask(b(0), ids(0), 0.125, ids(1))) == [1]


def test_int_correct_accepted_and_inputs_untouched():
    c = CORRECT.long()
    out = offline_injection_mask(c, GIDS, 0.25, AVAIL)
    assert bits(out) == [1, 0, 0, 0, 1, 0, 0, 0]
    assert c.tolist() == CORRECT.long().tolist() and AVAIL.tolist() == [0, 0, 9, 0, 0, 2]


def test_mask_empty_and_rejections():
    assert offline_injection_mask(b(), ids(), 0.1, ids()).shape == (0,)
    with pytest.raises(ValueError, match="indexed by group id"):
        offline_injection_mask(CORRECT, GIDS, 0.25, ids(1, 1, 1))  # group id 5 needs 6 entries
    with pytest.raises(ValueError, match="integer tensor"):
        offline_injection_mask(CORRECT, GIDS, 0.25, AVAIL.float())
    with pytest.raises(ValueError, match="non-negative"):
        offline_injection_mask(CORRECT, GIDS, 0.25, -AVAIL)
    with pytest.raises(ValueError, match="alpha"):
        offline_injection_mask(CORRECT, GIDS, 1.5, AVAIL)
    with pytest.raises(ValueError, match="shape mismatch"):
        offline_injection_mask(CORRECT, GIDS, 0.25, AVAIL, truncated=b(0, 0))
    with pytest.raises(ValueError, match=r"correct contains 1 NaN/Inf"):
        offline_injection_mask(t(0, float("nan")), ids(0, 0), 0.25, ids(1))


def test_group_rank_counts_earlier_true_samples_per_group():
    # group 3 = positions 0,2,3 with mask [1,0,1] -> ranks 0, -1, 1; group 1 = positions 1,4 -> 0, 1; group 7 -> 0
    out = group_rank(b(1, 1, 0, 1, 1, 1), ids(3, 1, 3, 3, 1, 7))
    assert out.tolist() == [0, 0, -1, 1, 1, 0]
    assert group_rank(b(), ids()).tolist() == []
