"""One benchmark through `lcot-mega eval`: k samples per problem for each seed, a greedy pass, the robustness probe.

What the study asks of an evaluation (Mu et al. 2025; ../shared/STUDY.md, "Evaluation in the code"): many samples
per problem at temperature 0.6 / top_p 0.95, accuracy as their mean (avg@k), pass@k from the same samples, and
several runs on small benchmarks because "uncertain problems" flip between them. Everything here is computed
from the graded responses it keeps, so the report can be re-derived from samples.jsonl.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lcot_mega.data.problems import Problem
from lcot_mega.data.templates import render_prompts
from lcot_mega.evaluation.core import GradedSample, bootstrap_ci, pass_at_k, sample_and_grade
from lcot_mega.evaluation.robustness import Probe, accuracy_drop, probed_problems
from lcot_mega.evaluation.uncertain import UNCERTAIN_BAND, analyze, greedy_flip_rate
from lcot_mega.reward.grader import Grader
from lcot_mega.rollout.protocol import RolloutEngine, SamplingParams
from lcot_mega.types import Prompt

RUNS_FOR = (0.02, 0.05)
"""Half-widths (accuracy points / 100) for which the summary states the evaluation runs a 95% interval needs."""


@dataclass(frozen=True)
class EvalSettings:
    """How `lcot-mega eval` samples; the defaults are the study's evaluation settings, except k (CPU-sized)."""

    k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 1024
    seeds: tuple[int, ...] = (0,)
    greedy: bool = False
    """Also decode every problem greedily once (for the greedy-vs-sampled flip rate)."""
    probe: Probe | None = None
    """Also run the robustness probe (k samples, first seed) and report the accuracy drop."""
    max_prompt_len: int = 1 << 30
    """Prompts longer than this many tokens are skipped and counted."""
    stop: tuple[str, ...] = ()
    template: str = "{problem}"
    apply_chat_template: bool = True
    n_boot: int = 2000

    def __post_init__(self) -> None:
        if self.k < 1 or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"need k >= 1 and distinct seeds, got k={self.k}, seeds={self.seeds}")

    def params(self, seed: int, *, greedy: bool = False) -> SamplingParams:
        if greedy:
            return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, n=1, stop=self.stop, seed=seed)
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.k,
            stop=self.stop,
            seed=seed,
        )


@dataclass
class BenchmarkRun:
    """Every graded response of one benchmark: per seed and problem k samples, plus the greedy and probe passes."""

    name: str
    problems: list[Problem]
    """The problems evaluated (in order), after prompts longer than max_prompt_len were dropped."""
    skipped: int
    sampled: dict[int, list[list[GradedSample]]] = field(default_factory=dict)
    greedy: list[GradedSample] | None = None
    probed: list[list[GradedSample]] | None = None
    seconds: float = 0.0

    def correct(self, seed: int) -> list[int]:
        return [sum(s.correct for s in per) for per in self.sampled[seed]]

    def pooled_correct(self) -> list[int]:
        """Per problem: correct responses over every seed's samples."""
        return [sum(counts) for counts in zip(*(self.correct(s) for s in self.sampled), strict=True)]

    @property
    def samples_per_problem(self) -> int:
        return sum(len(per[0]) for per in self.sampled.values())


def run_benchmark(
    engine: RolloutEngine,
    grader: Grader,
    tokenizer: Any,
    name: str,
    problems: Sequence[Problem],
    settings: EvalSettings,
) -> BenchmarkRun:
    """Render, sample and grade one benchmark with every pass `settings` asks for."""
    prompts, skipped = _render(problems, tokenizer, settings)
    if not prompts:
        raise ValueError(f"{name}: no problem left to evaluate: all {skipped} prompts exceed the prompt length limit")
    kept = {p.uid for p in prompts}
    run = BenchmarkRun(name, [p for p in problems if p.uid in kept], skipped)
    start = time.perf_counter()
    for seed in settings.seeds:
        run.sampled[seed] = _pass(engine, grader, name, prompts, settings.params(seed), f"seed {seed}")
    if settings.greedy:
        per = _pass(engine, grader, name, prompts, settings.params(settings.seeds[0], greedy=True), "greedy")
        run.greedy = [s[0] for s in per]
    if settings.probe is not None:
        probe_prompts, _ = _render(probed_problems(run.problems, settings.probe), tokenizer, settings)
        if len(probe_prompts) != len(prompts):
            raise ValueError(
                f"{name}: {len(prompts) - len(probe_prompts)} probed prompts exceed the prompt length limit;"
                " raise --max-prompt-len or lower --probe-repeats"
            )
        run.probed = _pass(engine, grader, name, probe_prompts, settings.params(settings.seeds[0]), "probe")
    run.seconds = time.perf_counter() - start
    return run


def _render(problems: Sequence[Problem], tokenizer: Any, settings: EvalSettings) -> tuple[list[Prompt], int]:
    return render_prompts(
        problems,
        tokenizer,
        template=settings.template,
        apply_chat_template=settings.apply_chat_template,
        max_prompt_len=settings.max_prompt_len,
    )


def _pass(
    engine: RolloutEngine, grader: Grader, name: str, prompts: list[Prompt], params: SamplingParams, label: str
) -> list[list[GradedSample]]:
    start = time.perf_counter()
    graded = sample_and_grade(engine, grader, name, prompts, params)
    flat = [s for per in graded for s in per]
    took = time.perf_counter() - start
    tokens = sum(s.tokens for s in flat)
    print(
        f"lcot-mega eval: {name} {label}: {len(prompts)} problems x {params.n}: accuracy"
        f" {sum(s.correct for s in flat) / len(flat):.1%}, {tokens} tokens in {took:.0f} s"
        f" ({tokens / max(took, 1e-9):.0f} tok/s)",
        file=sys.stderr,
        flush=True,
    )
    return graded


def summarize(run: BenchmarkRun, settings: EvalSettings) -> dict[str, Any]:
    """The benchmark's row of summary.json: avg@k with a bootstrap interval, pass@k' for every k' <= k, lengths,
    uncertain problems, and the greedy and probe results when they ran."""
    n = run.samples_per_problem
    pooled = run.pooled_correct()
    accuracy = [c / n for c in pooled]
    flat = [s for per_seed in run.sampled.values() for per in per_seed for s in per]
    per_seed = [sum(run.correct(s)) / (len(run.problems) * settings.k) for s in settings.seeds]
    out: dict[str, Any] = {
        "n_problems": len(run.problems),
        "skipped_too_long": run.skipped,
        "k": settings.k,
        "seeds": list(settings.seeds),
        "samples_per_problem": n,
        "avg@k": statistics.fmean(accuracy),
        "pass@1": _pass_at(pooled, n, 1),
        "pass@k": {str(j): _pass_at(pooled, n, j) for j in range(1, settings.k + 1)},
        "ci95": list(bootstrap_ci(accuracy, n_boot=settings.n_boot)),
        "avg@k_per_seed": per_seed,
        "response_len_mean": statistics.fmean(s.tokens for s in flat),
        "truncated_frac": statistics.fmean(s.finish == "truncated" for s in flat),
        "seconds": run.seconds,
        "uncertain": _uncertain(pooled, n, settings.k),
    }
    if run.greedy is not None:
        greedy = [float(s.correct) for s in run.greedy]
        out["greedy"] = {
            "accuracy": statistics.fmean(greedy),
            "ci95": list(bootstrap_ci(greedy, n_boot=settings.n_boot)),
            "flip_rate": greedy_flip_rate([s.correct for s in run.greedy], accuracy),
        }
    if run.probed is not None:
        out["robustness"] = _robustness(run, settings)
    return out


def _pass_at(correct: Sequence[int], n: int, k: int) -> float:
    return statistics.fmean(pass_at_k(n, c, k) for c in correct)


def _uncertain(pooled: list[int], n: int, k: int) -> dict[str, Any]:
    """Uncertain problems from the pooled counts; runs needed are runs of this evaluation (k samples each)."""
    report = analyze(pooled, n)
    return {
        "band": list(UNCERTAIN_BAND),
        "count": len(report.uncertain),
        "frac": len(report.uncertain) / len(pooled),
        "variance_share": report.uncertain_variance_share,
        "one_sample_stderr": report.score_stderr,
        "runs_needed": {f"{h:g}": -(-report.runs_needed(h) // k) for h in RUNS_FOR},
    }


def _robustness(run: BenchmarkRun, settings: EvalSettings) -> dict[str, Any]:
    """The probe's avg@k against the first seed's clean avg@k on the same problems, with a paired interval."""
    assert run.probed is not None and settings.probe is not None
    k = settings.k
    clean = [c / k for c in run.correct(settings.seeds[0])]
    probed = [sum(s.correct for s in per) / k for per in run.probed]
    drop = accuracy_drop(clean, probed)
    return {
        "misleading": settings.probe.misleading,
        "repeats": settings.probe.repeats,
        "clean_avg@k": statistics.fmean(clean),
        "avg@k": statistics.fmean(probed),
        "ci95": list(bootstrap_ci(probed, n_boot=settings.n_boot)),
        "drop": statistics.fmean(drop),
        "drop_ci95": list(bootstrap_ci(drop, n_boot=settings.n_boot)),
    }


def problem_rows(run: BenchmarkRun) -> list[dict[str, Any]]:
    """problems.jsonl: one row per problem with its correct count per seed and pooled accuracy."""
    n = run.samples_per_problem
    pooled = run.pooled_correct()
    lo, hi = UNCERTAIN_BAND
    rows = []
    for i, p in enumerate(run.problems):
        samples = [s for per_seed in run.sampled.values() for s in per_seed[i]]
        row: dict[str, Any] = {
            "benchmark": run.name,
            "uid": p.uid,
            "answer": p.answer,
            "k": len(samples) // len(run.sampled),
            "seeds": list(run.sampled),
            "correct": [run.correct(s)[i] for s in run.sampled],
            "accuracy": pooled[i] / n,
            "uncertain": lo < pooled[i] / n < hi,
            "response_len_mean": statistics.fmean(s.tokens for s in samples),
        }
        if run.greedy is not None:
            row["greedy_correct"] = run.greedy[i].correct
        if run.probed is not None:
            row["probe_correct"] = sum(s.correct for s in run.probed[i])
        rows.append(row)
    return rows


def sample_rows(run: BenchmarkRun) -> list[dict[str, Any]]:
    """samples.jsonl: every graded response, tagged with its pass (sampled / greedy / probe) and seed."""
    passes: list[tuple[str, int, list[list[GradedSample]]]] = [("sampled", s, g) for s, g in run.sampled.items()]
    if run.greedy is not None:
        passes.append(("greedy", -1, [[s] for s in run.greedy]))
    if run.probed is not None:
        passes.append(("probe", next(iter(run.sampled)), run.probed))
    rows = []
    for mode, seed, graded in passes:
        for p, per in zip(run.problems, graded, strict=True):
            for j, s in enumerate(per):
                rows.append({"benchmark": run.name, "uid": p.uid, "mode": mode, "seed": seed, "index": j, **vars(s)})
    return rows
