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

from lcot_mega.checkpoint.store import atomic_write_text
from lcot_mega.config import Config
from lcot_mega.reward.grader import Grader
from lcot_mega.rollout.protocol import RolloutEngine, SamplingParams
from lcot_mega.types import Prompt, SampleStatus


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
        n=e.n_samples,
        stop=tuple(cfg.rollout.stop),
        seed=seed,
    )


def evaluate(
    engine: RolloutEngine, grader: Grader, source: str, prompts: Sequence[Prompt], params: SamplingParams
) -> EvalResult:
    """Sample `params.n` responses per prompt on `engine`, grade them against the prompts' answers."""
    completions = engine.generate([p.token_ids for p in prompts], params)
    flat = [(p, c) for p, cs in zip(prompts, completions, strict=True) for c in cs]
    if any(c.finish is SampleStatus.ABORTED for _, c in flat):
        raise RuntimeError(f"evaluation of {source!r} was aborted; its accuracy would be wrong")
    grades = grader.grade_batch([c.text for _, c in flat], [p.answer for p, _ in flat])
    k = params.n
    correct = [sum(g.correct for g in grades[i * k : (i + 1) * k]) for i in range(len(prompts))]
    n = max(len(flat), 1)
    return EvalResult(
        source=source,
        k=k,
        uids=[p.uid for p in prompts],
        correct=correct,
        response_len_mean=sum(len(c.token_ids) for _, c in flat) / n,
        truncated_frac=sum(c.finish is SampleStatus.TRUNCATED for _, c in flat) / n,
    )
