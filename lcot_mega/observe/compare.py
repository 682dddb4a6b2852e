"""Plots that put several runs side by side: one PNG per metric, one colour per variant (an ablation's arm).

Runs named `<variant>-seed<N>` (what examples/study/ writes) are grouped by variant: each seed is drawn faint and
the mean over the variant's seeds bold, so an effect can be read against the seed-to-seed spread. Other run
directories are each their own variant. `lcot-mega plot --compare RUN ... --out DIR` writes them.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcot_mega.observe.plots import Series, _save, load_metrics
from lcot_mega.observe.sinks import METRICS_FILE

__all__ = ["COMPARED_METRICS", "Variant", "group_runs", "mean_series", "plot_compare"]

_SEEDED = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")

COMPARED_METRICS: tuple[tuple[str, str], ...] = (
    ("reward/accuracy", "train accuracy (sampled)"),
    ("reward/mean", "reward mean"),
    ("actor/entropy", "policy entropy (nats / token)"),
    ("rollout/response_len_mean", "mean response length (tokens)"),
    ("adv/zero_frac_samples", "zero-advantage fraction of trained samples"),
    ("rollout/zero_adv_frac", "zero-advantage fraction of generated groups"),
    ("polarity/kept_pos_share", "positive share of the kept |A| mass"),
    ("actor/grad_norm", "gradient norm (before clipping)"),
    ("perf/step_s", "seconds per step"),
)
"""(metrics.jsonl key, axis label) drawn when at least one run logged the key; eval accuracy keys are added."""


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison: its name and its runs' directories (one per seed)."""

    name: str
    runs: tuple[Path, ...]


def group_runs(run_dirs: Sequence[str | Path]) -> list[Variant]:
    """Variants in order of first appearance; `<v>-seed<N>` directories join variant `v`, sorted by seed."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for d in map(Path, run_dirs):
        if not (d / METRICS_FILE).is_file():
            raise FileNotFoundError(f"no metrics file at {d / METRICS_FILE} (a run directory holds {METRICS_FILE})")
        m = _SEEDED.match(d.resolve().name if d.name in ("", ".") else d.name)
        name, seed = (m["variant"], int(m["seed"])) if m else (d.name, 0)
        found.setdefault(name, []).append((seed, d))
    return [Variant(name, tuple(d for _, d in sorted(runs, key=lambda r: r[0]))) for name, runs in found.items()]


def mean_series(series: Sequence[Series]) -> Series:
    """The per-step mean over runs, at the steps every run logged (a run that stopped early shortens the mean
    rather than letting the survivors alone stand for the variant); NaN values are left out of a step's mean."""
    if not series:
        return []
    common = set.intersection(*({s for s, _ in points} for points in series))
    values = [dict(points) for points in series]
    out = []
    for step in sorted(common):
        finite = [v[step] for v in values if not math.isnan(v[step])]
        out.append((step, statistics.fmean(finite) if finite else math.nan))
    return out


def _metric_keys(loaded: dict[Path, dict[str, Series]]) -> list[tuple[str, str]]:
    present = {k for series in loaded.values() for k in series}
    evals = sorted(k for k in present if re.match(r"^eval/[^/]+/accuracy$", k))
    return [(k, label) for k, label in COMPARED_METRICS if k in present] + [
        (k, f"held-out accuracy: {k.split('/')[1]}") for k in evals
    ]


def _draw_metric(ax: Any, key: str, variants: Sequence[Variant], loaded: dict[Path, dict[str, Series]]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    colors = iter(f"C{i % 10}" for i in range(len(variants)))
    for variant in variants:
        color = next(colors)
        runs = [loaded[d][key] for d in variant.runs if key in loaded[d]]
        if not runs:
            continue
        for points in runs if len(runs) > 1 else ():
            ax.plot([s for s, _ in points], [v for _, v in points], color=color, alpha=0.25, linewidth=0.8)
        mean = mean_series(runs)
        label = f"{variant.name} (mean of {len(runs)})" if len(runs) > 1 else variant.name
        marker = "o" if len(mean) < 8 else None
        ax.plot([s for s, _ in mean], [v for _, v in mean], color=color, linewidth=2, marker=marker, label=label)


def plot_compare(run_dirs: Sequence[str | Path], out_dir: str | Path, title: str = "") -> list[Path]:
    """compare_overview.png plus compare_<metric>.png per metric, into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = group_runs(run_dirs)
    loaded = {d: load_metrics(d / METRICS_FILE) for v in variants for d in v.runs}
    keys = _metric_keys(loaded)
    if not keys:
        raise ValueError("none of the runs logged a metric that can be compared: " + ", ".join(map(str, run_dirs)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label in keys:
        fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
        _draw_metric(ax, key, variants, loaded)
        ax.set(xlabel="step", ylabel=label, title=f"{title}: {label}" if title else label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"compare_{key.replace('/', '_')}.png"))
    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.8 * rows), layout="constrained", squeeze=False)
    for ax, (key, label) in zip(axes.flat, keys, strict=False):
        _draw_metric(ax, key, variants, loaded)
        ax.set(xlabel="step", title=label)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_axis_off()
    axes[0, 0].legend(fontsize=8)
    names = ", ".join(f"{v.name} ({len(v.runs)} run{'s' if len(v.runs) > 1 else ''})" for v in variants)
    fig.suptitle(f"{title + ': ' if title else ''}{names}", fontsize=13, fontweight="bold")
    written.insert(0, _save(fig, out / "compare_overview.png"))
    return written
