"""Uncertain problems: how much of a benchmark score is sampling noise, and how many runs a comparison needs.

The study (Mu et al. 2025, "Dissecting Long-CoT Reasoning Models", on instability) traces score swings on small
benchmarks to problems whose answers are neither clearly right nor clearly wrong: their correctness flips from
run to run and between greedy and sampled decoding. Given each problem's correct count out of its samples
(pooled over runs and seeds), this module flags those problems and states what they cost, in closed forms:

- one sampled run scores S = (1/N) sum_i X_i with X_i ~ Bernoulli(p_i) independent, so
  Var(S) = sum_i p_i (1 - p_i) / N^2, and problem i contributes p_i (1 - p_i) / sum_j p_j (1 - p_j) of it;
- the mean of R runs has standard error sqrt(Var(S) / R): R >= z^2 Var(S) / delta^2 runs bring the half-width
  of a z-level interval under delta;
- greedy decoding answers problem i as g_i in {0, 1}; a sampled answer differs from it with probability
  g_i (1 - p_i) + (1 - g_i) p_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

UNCERTAIN_BAND = (0.2, 0.8)
"""A problem is uncertain when its sampled accuracy lies strictly inside this band (neither side dominates)."""


@dataclass(frozen=True)
class UncertaintyReport:
    accuracy: list[float]
    """Per-problem sampled accuracy p_i."""
    uncertain: list[int]
    """Indices of the problems with lo < p_i < hi."""
    score_stderr: float
    """Standard error of one run's score (avg over problems of one sample each): sqrt(Var(S))."""
    uncertain_variance_share: float
    """Share of Var(S) that the uncertain problems carry (0 when the score cannot vary)."""

    def runs_needed(self, half_width: float, z: float = 1.96) -> int:
        """Runs whose mean score has a z-level interval of at most +- `half_width` (1.96: 95%)."""
        if half_width <= 0:
            raise ValueError(f"half_width must be > 0, got {half_width}")
        return max(1, math.ceil((z * self.score_stderr / half_width) ** 2))


def analyze(
    correct: Sequence[int], samples: int | Sequence[int], band: tuple[float, float] = UNCERTAIN_BAND
) -> UncertaintyReport:
    """Report on problems with `correct[i]` right answers out of `samples` (one count for all, or one each)."""
    counts = [samples] * len(correct) if isinstance(samples, int) else list(samples)
    if len(counts) != len(correct) or not correct:
        raise ValueError("need one sample count per problem, and at least one problem")
    if any(not 0 <= c <= n or n < 1 for c, n in zip(correct, counts, strict=True)):
        raise ValueError("every problem needs 0 <= correct <= samples and samples >= 1")
    lo, hi = band
    p = [c / n for c, n in zip(correct, counts, strict=True)]
    var = [q * (1 - q) for q in p]
    total = sum(var)
    uncertain = [i for i, q in enumerate(p) if lo < q < hi]
    return UncertaintyReport(
        accuracy=p,
        uncertain=uncertain,
        score_stderr=math.sqrt(total) / len(p),
        uncertain_variance_share=sum(var[i] for i in uncertain) / total if total > 0 else 0.0,
    )


def greedy_flip_rate(greedy_correct: Sequence[bool], sampled_accuracy: Sequence[float]) -> float:
    """Mean over problems of the chance that one sampled answer's correctness differs from the greedy answer's."""
    if len(greedy_correct) != len(sampled_accuracy) or not greedy_correct:
        raise ValueError("need one greedy result per problem, and at least one problem")
    flips = [(1 - p) if g else p for g, p in zip(greedy_correct, sampled_accuracy, strict=True)]
    return sum(flips) / len(flips)
