"""Each polarity mode hands the actor exactly the samples it should (Mu et al. 2025's positive/negative study)."""

from __future__ import annotations

import pytest
import torch

from lcot_mega.algo.advantages import group_advantages
from lcot_mega.config import AlgoConfig
from lcot_mega.trainer.update import select_for_update, to_train_batch
from lcot_mega.types import Batch, Group, Prompt, Sample

# two groups of four: correctness 1100 and 1000; responses name their sample so the TrainBatch is readable
CORRECT = [[True, True, False, False], [True, False, False, False]]


def _batch() -> Batch:
    groups = []
    for gi, pattern in enumerate(CORRECT):
        prompt = Prompt(f"p{gi}", "q", "1", token_ids=(1, 2, 3))
        samples = [
            Sample(prompt, [10 * gi + si, 99], rollout_logprobs=[-0.1, -0.2], correct=c, reward=float(c))
            for si, c in enumerate(pattern)
        ]
        groups.append(Group(prompt, samples))
    batch = Batch(groups)
    t = batch.tensors()
    batch.set_advantages(group_advantages(t.rewards, t.group_ids))
    return batch


def _ids(batch: Batch) -> list[int]:
    return [s.response_ids[0] for s in batch]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("both", [0, 1, 2, 3, 10, 11, 12, 13]), ("positive", [0, 1, 10]), ("negative", [2, 3, 11, 12, 13])],
)
def test_polarity_keeps_exactly_its_samples(mode, expected):
    selected, metrics = select_for_update(_batch(), AlgoConfig(polarity=mode), seed=0)
    assert _ids(selected) == expected
    assert metrics["select/kept_frac"] == pytest.approx(len(expected) / 8)
    train = to_train_batch(selected, temperature=1.0)
    assert [r[0] for r in train.response_ids] == expected
    signs = {"both": {-1, 1}, "positive": {1}, "negative": {-1}}[mode]
    assert {1 if a > 0 else -1 for a in train.advantages} == signs
    assert metrics["polarity/kept_pos_count"] == sum(i in (0, 1, 10) for i in expected)


def test_weighted_mode_scales_only_positive_advantages():
    plain, both = select_for_update(_batch(), AlgoConfig(polarity="both"), seed=0)
    weighted, metrics = select_for_update(_batch(), AlgoConfig(polarity="weighted", positive_weight=0.25), seed=0)
    for a, b in zip(plain, weighted, strict=True):
        assert b.advantage == pytest.approx(a.advantage * (0.25 if a.correct else 1.0))
    # GRPO centres each group, so positive and negative |A| mass are equal (share 0.5); the update's positive share
    # is 0.25 / (0.25 + 1) = 0.2. The batch's own shares and the kept counts stay those of the data.
    assert both["polarity/kept_pos_share"] == pytest.approx(0.5) and both["polarity/pos_share"] == pytest.approx(0.5)
    assert metrics["polarity/kept_pos_share"] == pytest.approx(0.2)
    assert metrics["polarity/kept_neg_share"] == pytest.approx(0.8)
    assert metrics["polarity/pos_share"] == pytest.approx(0.5) and metrics["polarity/kept_pos_count"] == 3


def test_reserve_keeps_a_seeded_share_of_the_dropped_polarity():
    algo = AlgoConfig(polarity="positive", reserve_ratio=0.4)  # floor(0.4 * 5 negatives) = 2 kept
    first, _ = select_for_update(_batch(), algo, seed=3)
    again, _ = select_for_update(_batch(), algo, seed=3)
    assert _ids(first) == _ids(again)  # a resumed run keeps the same samples
    negatives = [i for i in _ids(first) if i not in (0, 1, 10)]
    assert len(negatives) == 2


def test_train_batch_carries_the_engine_logprobs_for_the_gap_metric():
    train = to_train_batch(_batch(), temperature=0.7)
    assert train.temperature == 0.7 and len(train.rollout_logprobs) == 8
    assert torch.equal(train.rollout_logprobs[0], torch.tensor([-0.1, -0.2]))
    assert train.prompt_ids[0] == [1, 2, 3]
