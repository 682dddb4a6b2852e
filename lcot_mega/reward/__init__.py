"""Rewards: answer extraction, isolated math-verify grading, reward functions by name, repetition penalty."""

from lcot_mega.reward.extract import extract_answer
from lcot_mega.reward.grader import Grader, GradeResult, grade
from lcot_mega.reward.registry import register_reward, resolve_reward
from lcot_mega.reward.repetition import repetition_penalties, repetition_penalty
from lcot_mega.reward.score import score_batch, shaped_rewards

__all__ = [
    "GradeResult",
    "Grader",
    "extract_answer",
    "grade",
    "register_reward",
    "repetition_penalties",
    "repetition_penalty",
    "resolve_reward",
    "score_batch",
    "shaped_rewards",
]
