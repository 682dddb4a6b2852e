"""Held-out evaluation: sample k responses per problem, grade them, report avg@k and keep per-problem counts.

The study warns that small benchmarks are noisy (Mu et al. 2025): accuracy is the mean over all k samples
of all problems (avg@k), and each problem's correct count is kept so later analysis (pass@k, uncertain
problems) needs no re-generation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcot_mega.checkpoint.store import atomic_write_text
from lcot_mega.config import Config
from lcot_mega.reward.grader import Grader
from lcot_mega.rollout.protocol import RolloutEngine, SamplingParams
from lcot_mega.types import Prompt, SampleStatus


@dataclass(frozen=True)
class GradedSample:
    """One evaluation response and its grade, as `lcot-mega eval` writes it to samples.jsonl."""

    text: str
    tokens: int
    finish: str
    """How it ended: "stop" (EOS or a stop string) or "truncated" (it reached max_new_tokens)."""
    correct: bool
    extracted: str | None
    """The answer the grader read from the response (None when it found none)."""
    timed_out: bool


@dataclass
class EvalResult:
    """One source's evaluation: per-problem correct counts out of `k` samples."""

    source: str
    k: int
    uids: list[str]
    correct: list[int]
    response_len_mean: float
    truncated_frac: float

    @property
    def accuracy(self) -> float:
        """avg@k: the mean correctness over every sample of every problem."""
        return sum(self.correct) / (self.k * len(self.correct)) if self.correct else 0.0

    @property
    def stderr(self) -> float:
        """Standard error of `accuracy` over problems (the noise the study warns about)."""
        n = len(self.correct)
        if n < 2:
            return 0.0
        per = [c / self.k for c in self.correct]
        mean = sum(per) / n
        return math.sqrt(sum((p - mean) ** 2 for p in per) / (n - 1) / n)

    def pass_at(self, k: int) -> float:
        """pass@k over the problems: the unbiased estimate from each problem's `self.k` samples (`pass_at_k`)."""
        if not self.correct:
            return 0.0
        return sum(pass_at_k(self.k, c, k) for c in self.correct) / len(self.correct)

    def metrics(self) -> dict[str, float]:
        prefix = f"eval/{self.source}"
        out = {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/accuracy_stderr": self.stderr,
            f"{prefix}/response_len_mean": self.response_len_mean,
            f"{prefix}/truncated_frac": self.truncated_frac,
        }
        for k in pass_ks(self.k):
            out[f"{prefix}/pass@{k}"] = self.pass_at(k)
        return out

    def save(self, path: str | Path) -> None:
        """Per-problem results as JSON (atomically: a crash leaves the previous file or none)."""
        body = {"source": self.source, "k": self.k, "accuracy": self.accuracy, "stderr": self.stderr}
        body["problems"] = [{"uid": u, "correct": c} for u, c in zip(self.uids, self.correct, strict=True)]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), json.dumps(body, indent=1))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k).

    Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1), in the product form
    1 - prod_{i=n-c+1}^{n} (1 - k / i), which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n: int) -> list[int]:
    """The k reported as pass@k for `n` samples per problem: 1, 2, 4, ... up to n, and n itself (none for n = 1)."""
    if n < 2:
        return []
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def eval_params(cfg: Config, seed: int) -> SamplingParams:
    e = cfg.eval
    return SamplingParams(
        max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
        temperature=e.temperature,
        top_p=e.top_p,
        n=e.n_samples,
        stop=tuple(cfg.rollout.stop),
        seed=seed,
    )


def sample_and_grade(
    engine: RolloutEngine, grader: Grader, source: str, prompts: Sequence[Prompt], params: SamplingParams
) -> list[list[GradedSample]]:
    """`params.n` responses per prompt from `engine`, each graded against its prompt's answer (prompt order)."""
    completions = engine.generate([p.token_ids for p in prompts], params)
    flat = [(p, c) for p, cs in zip(prompts, completions, strict=True) for c in cs]
    if any(c.finish is SampleStatus.ABORTED for _, c in flat):
        raise RuntimeError(f"evaluation of {source!r} was aborted; its accuracy would be wrong")
    grades = grader.grade_batch([c.text for _, c in flat], [p.answer for p, _ in flat])
    graded = [
        GradedSample(
            text=c.text,
            tokens=len(c.token_ids),
            finish="truncated" if c.finish is SampleStatus.TRUNCATED else "stop",
            correct=bool(g.correct),
            extracted=g.extracted,
            timed_out=g.timed_out,
        )
        for (_, c), g in zip(flat, grades, strict=True)
    ]
    k = params.n
    return [graded[i * k : (i + 1) * k] for i in range(len(prompts))]


def evaluate(
    engine: RolloutEngine, grader: Grader, source: str, prompts: Sequence[Prompt], params: SamplingParams
) -> EvalResult:
    """Sample `params.n` responses per prompt on `engine`, grade them against the prompts' answers."""
    return eval_result(source, [p.uid for p in prompts], sample_and_grade(engine, grader, source, prompts, params))


def eval_result(source: str, uids: Sequence[str], graded: Sequence[Sequence[GradedSample]]) -> EvalResult:
    """Per-problem correct counts and length statistics of graded responses (the same number per problem)."""
    flat = [s for per in graded for s in per]
    n = max(len(flat), 1)
    return EvalResult(
        source=source,
        k=len(graded[0]) if graded else 0,
        uids=list(uids),
        correct=[sum(s.correct for s in per) for per in graded],
        response_len_mean=sum(s.tokens for s in flat) / n,
        truncated_frac=sum(s.finish == "truncated" for s in flat) / n,
    )


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem `values` (problems resampled with replacement).

    Efron & Tibshirani 1993, ch. 13. Resampling problems, not samples, is what makes it honest for a benchmark:
    the problems are the population a score generalizes over; k samples per problem only shrink each value's
    noise. Deterministic for a given `seed`.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(values, dtype=np.float64)  # [N]
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # [n_boot]
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)
