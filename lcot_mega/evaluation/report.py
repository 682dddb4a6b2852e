"""`lcot-mega eval --out DIR`: per-problem and per-sample JSONL, summary.json and a markdown table.

summary.json holds `{"model", "settings", "benchmarks": {name: {"avg@k", "pass@1", "pass@k": {k': value}, ...}}}`
(keys described in docs/EVAL.md). It is written last and atomically, so its presence means the rest is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lcot_mega.checkpoint.store import atomic_write_text
from lcot_mega.data.files import write_jsonl
from lcot_mega.evaluation.suite import BenchmarkRun, problem_rows, sample_rows

SUMMARY, SUMMARY_MD, PROBLEMS, SAMPLES = "summary.json", "summary.md", "problems.jsonl", "samples.jsonl"


def write_report(
    out_dir: str | Path, runs: list[BenchmarkRun], summaries: Mapping[str, dict[str, Any]], meta: dict[str, Any]
) -> Path:
    """Write every output file of an evaluation into `out_dir`; returns the summary.json path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / PROBLEMS, (row for run in runs for row in problem_rows(run)))
    write_jsonl(out / SAMPLES, (row for run in runs for row in sample_rows(run)))
    atomic_write_text(out / SUMMARY_MD, markdown_table(summaries, meta))
    body = {**meta, "benchmarks": dict(summaries)}
    atomic_write_text(out / SUMMARY, json.dumps(body, indent=1))
    return out / SUMMARY


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci: list[float]) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def markdown_table(summaries: Mapping[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """One row per benchmark, percentages; columns for the greedy and probe passes only when they ran."""
    settings = meta.get("settings", {})
    lines = [
        f"# Evaluation of `{meta.get('model', '?')}`",
        "",
        f"temperature {settings.get('temperature')}, top_p {settings.get('top_p')}, max_new_tokens"
        f" {settings.get('max_new_tokens')}, k = {settings.get('k')} samples per seed, seeds {settings.get('seeds')};"
        " intervals are 95% percentile bootstraps over problems.",
        "",
    ]
    greedy = any("greedy" in s for s in summaries.values())
    probe = any("robustness" in s for s in summaries.values())
    head = ["benchmark", "problems", "samples / problem", "avg@k % [95% CI]", "pass@k %", "uncertain"]
    head += ["runs for ±2 pts"]
    head += ["greedy % (flip rate)"] * greedy + ["probe avg@k % (drop [95% CI])"] * probe
    head += ["mean length", "truncated %"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, s in summaries.items():
        top_k = max(s["pass@k"], key=int)
        u = s["uncertain"]
        row = [
            name,
            str(s["n_problems"]),
            str(s["samples_per_problem"]),
            f"{_pct(s['avg@k'])} {_ci(s['ci95'])}",
            f"{_pct(s['pass@k'][top_k])} (k={top_k})",
            f"{u['count']} ({_pct(u['frac'])}%)",
            str(u["runs_needed"]["0.02"]),
        ]
        if greedy:
            g = s.get("greedy")
            row.append(f"{_pct(g['accuracy'])} ({_pct(g['flip_rate'])}%)" if g else "-")
        if probe:
            r = s.get("robustness")
            row.append(f"{_pct(r['avg@k'])} ({_pct(r['drop'])} {_ci(r['drop_ci95'])})" if r else "-")
        row += [f"{s['response_len_mean']:.0f}", _pct(s["truncated_frac"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
