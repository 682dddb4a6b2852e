"""Word n-gram repetition penalty for incorrect responses, and the loop detector behind `rollout/repetition_frac`.

The penalty follows the reference code of Mu et al. (2025, arXiv 2506.04913); the formula is the n-gram
penalty of Yeo et al. (2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs", arXiv 2502.03373,
App. C.2). It pushes the policy away from the degenerate loops that long-CoT RL otherwise rewards no worse
than other wrong answers.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ends_in_loop", "repetition_penalties", "repetition_penalty"]


def repetition_penalty(text: str, ngram: int = 40, max_penalty: float = -2.0) -> float:
    """`(1 - unique / total) * max_penalty` over the lower-cased whitespace-split word n-grams of `text`.

    0.0 for a text without repeated n-grams or with fewer than `ngram` words; `max_penalty` is approached
    as the text becomes one n-gram repeated.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    words = text.lower().split()
    total = len(words) - ngram + 1
    if total < 1:
        return 0.0
    unique = len({tuple(words[i : i + ngram]) for i in range(total)})
    if unique == total:
        return 0.0  # not (1 - 1) * max_penalty, which is -0.0
    return (1.0 - unique / total) * max_penalty


def repetition_penalties(
    texts: Sequence[str], correct: Sequence[bool], ngram: int = 40, max_penalty: float = -2.0
) -> list[float]:
    """Per-response penalties: `repetition_penalty` for incorrect responses, 0.0 for correct ones."""
    if len(texts) != len(correct):
        raise ValueError(f"got {len(texts)} texts and {len(correct)} correctness flags")
    return [0.0 if ok else repetition_penalty(t, ngram, max_penalty) for t, ok in zip(texts, correct, strict=True)]


def ends_in_loop(token_ids: Sequence[int], max_period: int = 128, min_repeats: int = 4, min_tokens: int = 32) -> bool:
    """True when the response ends inside a loop: one block of p <= `max_period` tokens repeated over its last
    `max(min_repeats * p, min_tokens)` tokens.

    Why: a long-CoT policy can fall into a loop ("Wait, let me check again. Wait, ...") that runs until the
    length limit; Mu et al. (2025) single out these truncated-and-repetitive samples. To the reward a loop is
    just another wrong answer, so their share is watched on its own (guards.repetition). The test is
    periodicity of the tail (`t[i] == t[i - p]`), so a response truncated in the middle of a block counts
    too. A response that stopped on EOS or a stop id ends with that token, which breaks the period: it got
    out of the loop and is not counted. `min_tokens` keeps short runs (a long number, a line of '=') from counting.
    """
    if max_period < 1 or min_repeats < 2 or min_tokens < 1:
        raise ValueError(
            f"need max_period >= 1, min_repeats >= 2, min_tokens >= 1; got {max_period}, {min_repeats}, {min_tokens}"
        )
    ids = list(token_ids)
    for period in range(1, max_period + 1):
        span = max(min_repeats * period, min_tokens)
        if span > len(ids):
            return False  # the span only grows with the period
        if ids[-1] != ids[-1 - period]:
            continue  # cheap rejection before comparing the whole tail
        tail = ids[-span:]
        if tail[period:] == tail[:-period]:
            return True
    return False
