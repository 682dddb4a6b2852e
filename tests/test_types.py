"""The stage contract: batches flatten to tensors in sample order and take results back."""

from __future__ import annotations

import pytest
import torch

from lcot_mega.types import Batch, Group, Prompt, Sample, SampleStatus


def _group(uid: str, correct: list[bool], lengths: list[int]) -> Group:
    prompt = Prompt(uid=uid, text=f"problem {uid}", answer="4", token_ids=(1, 2, 3))
    samples = [
        Sample(prompt, response_ids=list(range(n)), correct=c, reward=float(c), status=SampleStatus.COMPLETED)
        for c, n in zip(correct, lengths, strict=True)
    ]
    return Group(prompt, samples)


def test_tensors_follow_sample_order_with_group_index():
    batch = Batch([_group("a", [True, False], [3, 5]), _group("b", [False, False, True], [1, 2, 4])])
    t = batch.tensors()
    assert t.group_ids.tolist() == [0, 0, 1, 1, 1]
    assert t.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert t.correct.tolist() == [True, False, False, False, True]
    assert t.lengths.tolist() == [3, 5, 1, 2, 4]
    assert t.rewards.dtype == torch.float32 and t.group_ids.dtype == torch.long


def test_results_written_back_land_on_the_right_samples():
    batch = Batch([_group("a", [True, False], [3, 5]), _group("b", [True], [1])])
    batch.set_advantages(torch.tensor([0.5, -0.5, 0.0]))
    assert [s.advantage for s in batch] == [0.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="got 2 values for a batch of 3"):
        batch.set_rewards([1.0, 2.0])


def test_filter_keeps_marked_samples_and_drops_emptied_groups():
    batch = Batch([_group("a", [True, False], [3, 5]), _group("b", [True], [1])])
    kept = batch.filter(torch.tensor([False, True, False]))
    assert len(kept.groups) == 1 and kept.groups[0].prompt.uid == "a"
    assert [s.response_len for s in kept] == [5]


def test_group_accuracy_and_truncation_flags():
    g = _group("a", [True, False, True, True], [1, 1, 1, 1])
    g.samples[1].status = SampleStatus.TRUNCATED
    assert g.accuracy == 0.75
    assert Batch([g]).tensors().truncated.tolist() == [False, True, False, False]


def test_rollout_logprobs_must_match_response_length():
    prompt = Prompt(uid="p", text="t", answer="1")
    with pytest.raises(ValueError, match="2 entries for 3 response tokens"):
        Sample(prompt, response_ids=[1, 2, 3], rollout_logprobs=[-0.1, -0.2])


def test_group_rejects_samples_of_another_prompt():
    a, b = Prompt(uid="a", text="x", answer="1"), Prompt(uid="b", text="y", answer="2")
    with pytest.raises(ValueError, match="placed in group"):
        Group(a, [Sample(b, response_ids=[1])])
