"""The reward stage of the step: grade every sample of a batch, then add the configured shaping terms.

Order matters and follows the study's code: correctness first (1/0 from the verifier), then the
relative length reward (it reads correctness and group accuracy), the overlong penalty (DAPO) and
the repetition penalty on incorrect responses. Advantages are computed from the result afterwards.
"""

from __future__ import annotations

import torch

from lcot_mega.algo.shaping import overlong_penalty, relative_length_reward
from lcot_mega.config import RewardConfig
from lcot_mega.reward.grader import Grader, GradeResult
from lcot_mega.reward.repetition import repetition_penalties
from lcot_mega.types import Batch


def score_batch(batch: Batch, grader: Grader, cfg: RewardConfig, max_new_tokens: int) -> list[GradeResult]:
    """Grade `batch` in place (sets `correct` and `reward` on every sample); returns the raw grades.

    `max_new_tokens` is the rollout length limit the overlong penalty ramps towards.
    """
    samples = batch.samples
    grades = grader.grade_batch([s.response_text for s in samples], [s.prompt.answer for s in samples])
    for s, g in zip(samples, grades, strict=True):
        s.correct = g.correct
        s.reward = g.reward
    batch.set_rewards(shaped_rewards(batch, cfg, max_new_tokens))
    return grades


def shaped_rewards(batch: Batch, cfg: RewardConfig, max_new_tokens: int) -> torch.Tensor:
    """Rewards [N] of an already graded batch with the enabled shaping terms added."""
    t = batch.tensors()
    rewards = t.rewards  # [N]
    rl = cfg.relative_length
    if rl.enabled:
        rewards = relative_length_reward(
            rewards, t.correct, t.lengths, t.group_ids, rl.corr_ratio, rl.length_base, rl.lower, rl.upper
        )
    if cfg.overlong.enabled:
        rewards = rewards + overlong_penalty(
            t.lengths, max_new_tokens, cfg.overlong.buffer_len, cfg.overlong.penalty_factor
        )
    if cfg.repetition.enabled:
        texts = [s.response_text for s in batch]
        penalties = repetition_penalties(texts, t.correct.tolist(), cfg.repetition.ngram, cfg.repetition.max_penalty)
        rewards = rewards + torch.tensor(penalties, dtype=rewards.dtype)
    return rewards
