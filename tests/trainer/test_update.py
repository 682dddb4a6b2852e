"""Each polarity mode hands the actor exactly the samples it should (Mu et al. 2025's positive/negative study), and
`algo.mask_truncated` leaves the truncated ones out of the loss (DAPO's overlong filtering)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lcot_mega.algo import policy_loss
from lcot_mega.algo.advantages import group_advantages
from lcot_mega.config import AlgoConfig
from lcot_mega.trainer.update import select_for_update, to_train_batch
from lcot_mega.types import Batch, Group, Prompt, Sample, SampleStatus

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


# --------------------------------------------------------------------------------- algo.mask_truncated

# (correct, response length, truncated) per sample: group 0 holds the one truncated response (incorrect, the longest)
TRUNC_GROUPS = [
    [(True, 2, False), (False, 3, False), (False, 4, True), (True, 2, False)],
    [(True, 1, False), (False, 3, False)],
]
SHIFT = 0.1
"""Current-policy log-probs are the old ones + SHIFT: every ratio is e^0.1, inside the clip range (0.8, 1.2)."""


def _truncation_batch(groups=TRUNC_GROUPS) -> Batch:
    """Response ids are 100 * group + 10 * sample + token, so every token says whose it is."""
    out = []
    for gi, spec in enumerate(groups):
        prompt = Prompt(f"p{gi}", "q", "1", token_ids=(1, 2))
        samples = []
        for si, (correct, n, truncated) in enumerate(spec):
            ids = [100 * gi + 10 * si + t for t in range(n)]
            status = SampleStatus.TRUNCATED if truncated else SampleStatus.COMPLETED
            logprobs = [-0.5 - 0.1 * t for t in range(n)]
            samples.append(Sample(prompt, ids, rollout_logprobs=logprobs, status=status, correct=correct))
            samples[-1].reward = float(correct)
        out.append(Group(prompt, samples))
    batch = Batch(out)
    t = batch.tensors()
    batch.set_advantages(group_advantages(t.rewards, t.group_ids))  # the full groups, as collect does
    return batch


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] right-padded values and their mask."""
    width = max(len(r) for r in rows)
    values, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)], mask[i, : len(r)] = r, True
    return values, mask


def _pg_loss(rows: list[tuple[torch.Tensor, float]], agg: str) -> torch.Tensor:
    """The clipped policy loss of (old log-probs, advantage) rows with the current policy at old + SHIFT."""
    old, mask = _padded([r for r, _ in rows])
    adv = torch.tensor([a for _, a in rows])
    loss, _ = policy_loss(old + SHIFT, old, adv, mask, agg=agg, max_len=8 if agg.endswith("norm") else None)
    return loss


def _train_rows(train) -> list[tuple[torch.Tensor, float]]:
    return list(zip(train.rollout_logprobs, train.advantages, strict=True))


def test_mask_truncated_hands_the_actor_every_sample_but_the_truncated_one_with_its_full_group_advantages():
    full = _truncation_batch()
    advantages = {s.response_ids[0]: s.advantage for s in full}
    selected, metrics = select_for_update(full, AlgoConfig(mask_truncated=True), seed=0)
    train = to_train_batch(selected, temperature=1.0)
    assert [r[0] for r in train.response_ids] == [0, 10, 30, 100, 110]  # 20..23 (truncated) is gone
    assert sum(len(r) for r in train.response_ids) == 2 + 3 + 2 + 1 + 3  # none of its 4 tokens is left
    # every per-sample list is the same samples' in the same order
    for ids, adv, logprobs in zip(train.response_ids, train.advantages, train.rollout_logprobs, strict=True):
        assert adv == advantages[ids[0]] and len(logprobs) == len(ids)
    # advantages are the full group's: 1100 with GRPO's Bessel std is +-0.866, not those of the 3 left (110)
    assert train.advantages[:3] == pytest.approx([0.8660254, -0.8660254, 0.8660254], abs=1e-5)
    assert metrics["select/masked_truncated"] == 1.0 and metrics["select/kept_frac"] == pytest.approx(5 / 6)
    assert metrics["polarity/kept_neg_count"] == 2.0  # the truncated negative does not train


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_masked_loss_is_the_loss_of_the_batch_without_the_truncated_sample(agg):
    full = _truncation_batch()
    selected, _ = select_for_update(full, AlgoConfig(mask_truncated=True), seed=0)
    loss = _pg_loss(_train_rows(to_train_batch(selected, temperature=1.0)), agg)
    # independent: by hand from the samples, every ratio e^SHIFT (unclipped), so each token's loss is -A e^SHIFT
    kept = [(s.advantage, s.response_len) for s in full if not s.truncated]
    numerator = -math.exp(SHIFT) * sum(a * n for a, n in kept)
    by_hand = {
        "token-mean": numerator / sum(n for _, n in kept),
        "seq-mean-token-mean": -math.exp(SHIFT) * sum(a for a, _ in kept) / len(kept),
        "seq-mean-token-sum-norm": numerator / (len(kept) * 8),
    }[agg]
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    # the same loss as a batch built without it (same advantages), and not the loss with it included
    without = [(torch.tensor(s.rollout_logprobs), s.advantage) for s in full if not s.truncated]
    assert float(loss) == pytest.approx(float(_pg_loss(without, agg)), rel=1e-6)
    assert float(loss) != pytest.approx(float(_pg_loss(_train_rows(to_train_batch(full, 1.0)), agg)), rel=1e-3)


def test_a_zeroed_advantage_would_still_count_in_the_token_mean_denominator():
    """Why the sample is dropped rather than given advantage 0 (the study's code): its 4 tokens would dilute the
    token mean of the 11 that train."""
    full = _truncation_batch()
    selected, _ = select_for_update(_truncation_batch(), AlgoConfig(mask_truncated=True), seed=0)
    masked = float(_pg_loss(_train_rows(to_train_batch(selected, 1.0)), "token-mean"))
    zeroed = [(torch.tensor(s.rollout_logprobs), 0.0 if s.truncated else s.advantage) for s in full]
    assert float(_pg_loss(zeroed, "token-mean")) == pytest.approx(masked * 11 / 15, rel=1e-5)


def test_every_sample_truncated_leaves_nothing_to_train_and_says_so():
    groups = [[(False, 3, True), (False, 2, True)], [(True, 2, True), (False, 4, True)]]
    selected, metrics = select_for_update(_truncation_batch(groups), AlgoConfig(mask_truncated=True), seed=0)
    assert len(selected) == 0 and selected.groups == []  # the driver skips the update (actor/skipped = 1)
    assert metrics["select/masked_truncated"] == 4.0 and metrics["select/kept_frac"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("polarity", ["both", "positive", "negative", "weighted"])
def test_without_mask_truncated_truncated_samples_train(polarity):
    algo = AlgoConfig(polarity=polarity, positive_weight=0.5 if polarity == "weighted" else 1.0)
    plain, plain_metrics = select_for_update(_truncation_batch(), algo, seed=0)
    assert plain_metrics["select/masked_truncated"] == 0.0
    masked, metrics = select_for_update(_truncation_batch(), dataclasses.replace(algo, mask_truncated=True), seed=0)
    # masking removes exactly the truncated samples polarity kept (a negative one: none in positive mode)
    assert [s.response_ids[0] for s in plain if not s.truncated] == [s.response_ids[0] for s in masked]
    assert metrics["select/masked_truncated"] == sum(s.truncated for s in plain)
