"""Rewards: answer extraction, isolated math-verify grading, reward functions by name, repetition penalty.

The batch reward stage is `lcot_mega.reward.score` (not imported here: grader workers import this
package, and must not pay for torch).
"""

from lcot_mega.reward.extract import extract_answer
from lcot_mega.reward.grader import Grader, GradeResult, grade
from lcot_mega.reward.registry import register_reward, resolve_reward
from lcot_mega.reward.repetition import repetition_penalties, repetition_penalty

__all__ = [
    "GradeResult",
    "Grader",
    "extract_answer",
    "grade",
    "register_reward",
    "repetition_penalties",
    "repetition_penalty",
    "resolve_reward",
]
