"""Word n-gram repetition penalty for incorrect responses.

Follows the reference code of Mu et al. (2025, arXiv 2506.04913); the formula is the n-gram penalty of
Yeo et al. (2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs", arXiv 2502.03373, App. C.2).
It pushes the policy away from the degenerate loops that long-CoT RL otherwise rewards no worse than
other wrong answers.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["repetition_penalties", "repetition_penalty"]


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
