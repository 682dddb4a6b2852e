"""The reward stage: grading sets correctness, then each enabled shaping term adds what it should."""

from __future__ import annotations

import pytest

from lcot_mega.config import RewardConfig
from lcot_mega.reward import Grader
from lcot_mega.reward.score import score_batch, shaped_rewards
from lcot_mega.types import Batch, Group, Prompt, Sample, SampleStatus


def _batch(responses: list[tuple[str, int]], answer: str = "7") -> Batch:
    prompt = Prompt(uid="p0", text="3 + 4 = ?", answer=answer)
    samples = [
        Sample(prompt, response_ids=[0] * n, response_text=t, status=SampleStatus.COMPLETED) for t, n in responses
    ]
    return Batch([Group(prompt, samples)])


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=1, timeout_s=5.0) as g:
        yield g


def test_grading_sets_correctness_and_binary_reward(grader):
    batch = _batch([("\\boxed{7}", 10), ("\\boxed{8}", 10), ("no answer", 10)])
    score_batch(batch, grader, RewardConfig(), max_new_tokens=100)
    assert [s.correct for s in batch] == [True, False, False]
    assert [s.reward for s in batch] == [1.0, 0.0, 0.0]


def test_relative_length_reward_rewards_shorter_correct_answers(grader):
    # 3 of 4 correct (acc .75 >= corr_ratio .75); correct lengths 100, 300, 200 -> mean 200;
    # bonus (200 - len) / 500 = +0.2, -0.2, 0; the incorrect sample is unchanged.
    cfg = RewardConfig()
    cfg.relative_length.enabled = True
    batch = _batch([("\\boxed{7}", 100), ("\\boxed{7}", 300), ("\\boxed{7}", 200), ("\\boxed{1}", 50)])
    score_batch(batch, grader, cfg, max_new_tokens=1000)
    assert [s.reward for s in batch] == pytest.approx([1.2, 0.8, 1.0, 0.0])


def test_overlong_and_repetition_penalties_add_up():
    cfg = RewardConfig()
    cfg.overlong.enabled, cfg.overlong.buffer_len = True, 10
    cfg.repetition.enabled, cfg.repetition.ngram = True, 2
    batch = _batch([("a b a b a b", 95), ("x y z w", 85)])
    for s in batch:
        s.correct, s.reward = False, 0.0
    # lengths vs max 100, buffer 10: 95 is 5 tokens into the buffer -> -0.5; 85 -> 0.
    # repetition (incorrect): "a b a b a b" has 5 bigrams, 2 unique -> (1 - 2/5) * -2 = -1.2;
    # "x y z w" has 3 bigrams, all unique -> 0.
    assert shaped_rewards(batch, cfg, max_new_tokens=100).tolist() == pytest.approx([-1.7, 0.0])


def test_all_shaping_is_off_by_default():
    batch = _batch([("a a a a a a", 99)])
    batch.samples[0].reward = 0.0
    assert shaped_rewards(batch, RewardConfig(), max_new_tokens=100).tolist() == [0.0]
