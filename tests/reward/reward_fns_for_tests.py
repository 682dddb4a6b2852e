"""Reward functions for the reward tests; the grader's workers import this module by name.

Not collected by pytest (no `test_` prefix). pytest's default "prepend" import mode puts this folder on
sys.path, and the grader hands its sys.path to each worker, so `reward_fns_for_tests:<name>` resolves in both.
"""

from __future__ import annotations

import os
import signal

from lcot_mega.reward import register_reward


@register_reward("contains_gold")
def contains_gold(response: str, answer: str) -> bool:
    """Gold appears anywhere; accepts no extraction options (passing them would raise TypeError)."""
    return answer in response


def think_flag(response: str, answer: str, *, require_think_close: bool = False) -> float:
    """1.0 when told `require_think_close`, else 0.25: shows which options reached the function."""
    return 1.0 if require_think_close else 0.25


def all_options(response: str, answer: str, **options: object) -> float:
    """Half credit: 0.5 is not correct (`correct` is `reward > 0.5`). Takes every option."""
    assert set(options) == {"require_think_close", "fallbacks"}, options
    return 0.5


def crashy(response: str, answer: str) -> bool:
    """Raises on "raise", kills its own process on "segfault", else checks containment."""
    if response == "raise":
        raise RuntimeError("boom")
    if response == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    return answer in response


def slow_contains(response: str, answer: str) -> bool:
    """Containment after a 1 s pause: long enough to kill the worker from outside mid-grade."""
    import time

    time.sleep(1.0)
    return answer in response
