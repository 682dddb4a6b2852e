"""PNG plots of a training run (metrics.jsonl) and of an evaluation (problems.jsonl), to see a run at a glance.

`lcot-mega plot DIR [DIR ...] [--out OUT]` writes them. matplotlib (Agg backend) is imported inside the
functions, so the package imports and trains without it; the key names are those of docs/METRICS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcot_mega.observe.records import read_metrics
from lcot_mega.observe.sinks import METRICS_FILE

__all__ = ["add_plot_parser", "load_metrics", "plot_dir", "plot_eval", "plot_run"]

Series = list[tuple[int, float]]
PROBLEMS_FILE = "problems.jsonl"
SUMMARY_FILE = "summary.json"
# Per-problem accuracy strictly inside this band: "uncertain", still carrying learning signal. The same band as
# lcot_mega.evaluation.uncertain.UNCERTAIN_BAND (problems.jsonl's "uncertain"), repeated: observe imports nothing else.
UNCERTAIN_BAND = (0.2, 0.8)
_EVAL_ACCURACY = re.compile(r"^eval/(?P<source>[^/]+)/accuracy$")
_GUARD_COLORS = {"log": "0.6", "warn": "tab:olive", "skip": "tab:purple", "rollback": "tab:red", "halt": "black"}


def load_metrics(path: str | os.PathLike) -> dict[str, Series]:
    """Every numeric key of a metrics.jsonl as (step, value) sorted by step; a later line wins for a repeated step.

    Labels (strings) are skipped, null is NaN. A line that is not a JSON object with an integer step raises
    ValueError naming the file and line, except a torn last line (a live run is writing it), which is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (a run directory holds {METRICS_FILE})")
    return _numeric_series(read_metrics(path))


def _numeric_series(records: list[dict[str, Any]]) -> dict[str, Series]:
    by_key: dict[str, dict[int, float]] = defaultdict(dict)
    for record in records:
        for key, value in record.items():
            # bool is an int to Python but never a metric value; the step is the x axis, not a series.
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                by_key[key][record["step"]] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def _guard_events(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, action) of the steps whose `guard/action` label is not "ok", last line per step winning."""
    actions = {r["step"]: r["guard/action"] for r in records if isinstance(r.get("guard/action"), str)}
    return sorted((step, action) for step, action in actions.items() if action != "ok")


# ---------------------------------------------------------------------------------------------- run panels


@dataclass(frozen=True)
class _Panel:
    """One panel of the run overview: lines on the left axis, optional lines on a twin right axis."""

    name: str  # the PNG's stem
    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]  # (metric key, legend label)
    twin: tuple[tuple[str, str], ...] = ()
    twin_ylabel: str = ""
    fraction: bool = False  # a [0, 1] quantity: fix the axis so panels compare across runs


_PANELS = (
    _Panel(
        "reward",
        "Reward and accuracy",
        "reward / accuracy",
        (("reward/mean", "reward mean"), ("reward/accuracy", "train accuracy")),
    ),
    _Panel("entropy", "Policy entropy", "entropy (nats / token)", (("actor/entropy", "entropy"),)),
    _Panel(
        "kl",
        "KL and train/rollout mismatch",
        "nats / token",
        (
            ("actor/kl_loss", "KL(π‖π_ref) loss"),
            ("actor/ppo_kl", "PPO KL (k1)"),
            ("actor/approx_kl_k3", "approx KL (k3)"),
            ("rollout/logp_gap_mean", "|logp train − rollout|"),
        ),
    ),
    _Panel(
        "length",
        "Response length",
        "mean response length (tokens)",
        (("rollout/response_len_mean", "response length"),),
        twin=(("rollout/truncated_frac", "truncated fraction"),),
        twin_ylabel="truncated fraction",
    ),
    _Panel(
        "zero_adv",
        "Zero-advantage fraction (no learning signal)",
        "fraction",
        (
            ("adv/zero_frac_samples", "samples, final batch"),
            ("adv/zero_frac_groups", "groups, final batch"),
            ("rollout/zero_adv_frac", "groups, all generated"),
        ),
        fraction=True,
    ),
    _Panel(
        "polarity",
        "Advantage polarity (share of |A| mass)",
        "share",
        (
            ("polarity/pos_share", "positive"),
            ("polarity/neg_share", "negative"),
            ("polarity/kept_pos_share", "positive, kept"),
            ("polarity/kept_neg_share", "negative, kept"),
        ),
        fraction=True,
    ),
)


def _eval_keys(series: dict[str, Series]) -> list[str]:
    return sorted(k for k in series if _EVAL_ACCURACY.match(k))


def _has_panel(panel: _Panel, series: dict[str, Series]) -> bool:
    keys = [k for k, _ in panel.lines + panel.twin]
    return any(k in series for k in keys) or (panel.name == "reward" and bool(_eval_keys(series)))


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Centered moving average ignoring NaN (a window of only NaN stays NaN); edges use the points they have.

    Prefix sums keep it O(n) for long runs.
    """
    sums, counts = [0.0], [0]
    for v in values:
        finite = not math.isnan(v)
        sums.append(sums[-1] + (v if finite else 0.0))
        counts.append(counts[-1] + finite)
    half, n, out = window // 2, len(values), []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        count = counts[hi] - counts[lo]
        out.append((sums[hi] - sums[lo]) / count if count else math.nan)
    return out


def _draw_series(ax: Any, points: Series, label: str, color: str) -> None:
    """Raw points faint plus a moving average once there are enough points for noise to hide the trend."""
    steps, values = [s for s, _ in points], [v for _, v in points]
    if len(points) < 8:
        ax.plot(steps, values, color=color, marker="o", markersize=3, label=label)
        return
    window = min(101, max(3, len(points) // 20) | 1)  # odd, ~5% of the run: trend without hiding a collapse
    faint = 0.25 if len(points) <= 300 else 0.12  # thousands of raw points would paint a solid band
    ax.plot(steps, values, color=color, alpha=faint, linewidth=0.8)
    ax.plot(steps, _smooth(values, window), color=color, linewidth=1.8, label=f"{label} (avg {window})")


def _same(a: Series, b: Series) -> bool:
    return len(a) == len(b) and all(
        sa == sb and (va == vb or (math.isnan(va) and math.isnan(vb))) for (sa, va), (sb, vb) in zip(a, b, strict=True)
    )


def _draw_lines(ax: Any, lines: Sequence[tuple[str, str]], series: dict[str, Series], colors: Any) -> None:
    """One curve per key; keys with identical values share one curve and one legend entry (`a = b`), since a
    second line drawn exactly over the first would hide it (e.g. reward mean = accuracy without shaping)."""
    groups: list[tuple[str, list[str]]] = []  # (first key, labels)
    for key, label in lines:
        if key not in series:
            continue
        twin = next((g for g in groups if _same(series[g[0]], series[key])), None)
        if twin:
            twin[1].append(label)
        else:
            groups.append((key, [label]))
    for key, labels in groups:
        _draw_series(ax, series[key], " = ".join(labels), next(colors))


def _draw_polarity(ax: Any, series: dict[str, Series]) -> None:
    """Positive and negative shares stacked per step (they sum to 1, or 0 without signal: a white gap), and the
    kept batch's positive share as a dashed boundary; raw, since a smoothed share hides the no-signal steps."""
    pos, neg = dict(series.get("polarity/pos_share", [])), dict(series.get("polarity/neg_share", []))
    steps = sorted(pos.keys() | neg.keys())
    if steps:
        low = [_finite(pos.get(s)) for s in steps]
        high = [lo + _finite(neg.get(s)) for lo, s in zip(low, steps, strict=True)]
        ax.fill_between(steps, 0, low, step="mid", color="tab:green", alpha=0.45, label="positive share", lw=0)
        ax.fill_between(steps, low, high, step="mid", color="tab:red", alpha=0.35, label="negative share", lw=0)
    kept = series.get("polarity/kept_pos_share")
    if kept:
        same = _same(kept, series.get("polarity/pos_share", []))
        label = "kept batch: positive share" + (" (= all)" if same else "")
        ax.step(*zip(*kept, strict=True), where="mid", color="black", linestyle="--", linewidth=1.2, label=label)


def _finite(value: float | None) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def _draw_evals(ax: Any, series: dict[str, Series]) -> None:
    """Held-out accuracy per source as points with ±1 stderr bars (their own markers, on top of the train curves)."""
    markers = iter("sD^vP*Xph")
    for key in _eval_keys(series):
        source = _EVAL_ACCURACY.match(key)["source"]
        steps, values = zip(*series[key], strict=True)
        stderr = dict(series.get(f"eval/{source}/accuracy_stderr", []))
        err = [stderr.get(s, 0.0) for s in steps]
        ax.errorbar(
            steps,
            values,
            yerr=err,
            fmt=next(markers, "o") + "-",
            linewidth=1,
            markersize=5,
            capsize=3,
            color="black",
            alpha=0.8,
            label=f"eval {source} accuracy ±1 s.e.",
            zorder=5,
        )


def _draw_guards(ax: Any, events: Sequence[tuple[int, str]]) -> None:
    """A vertical line per step a guard acted on; rollbacks red, one legend entry per action."""
    seen = set()
    for step, action in events:
        label = None if action in seen else f"guard: {action}"
        seen.add(action)
        strong = action in ("rollback", "halt")
        ax.axvline(
            step,
            color=_GUARD_COLORS.get(action, "tab:brown"),
            linestyle="-" if strong else ":",
            linewidth=1.6 if strong else 1.0,
            alpha=0.8,
            label=label,
            zorder=1,
        )


def _draw_panel(ax: Any, panel: _Panel, series: dict[str, Series], events: Sequence[tuple[int, str]]) -> None:
    import matplotlib.pyplot as plt

    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    if panel.name == "polarity":
        _draw_polarity(ax, series)
    else:
        _draw_lines(ax, panel.lines, series, colors)
    if panel.name == "reward":
        _draw_evals(ax, series)
        _draw_guards(ax, events)
    handles, labels = ax.get_legend_handles_labels()
    if panel.twin and any(k in series for k, _ in panel.twin):
        twin = ax.twinx()
        _draw_lines(twin, panel.twin, series, colors)
        twin.set_ylabel(panel.twin_ylabel)
        twin.set_ylim(0, 1.05)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if panel.fraction:
        ax.set_ylim(-0.03, 1.03)
    ax.set_title(panel.title)
    ax.set_xlabel("RL step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best", framealpha=0.8)


def _step_range(series: dict[str, Series]) -> str:
    steps = [s for points in series.values() for s, _ in points]
    return f"steps {min(steps)}–{max(steps)}" if steps else "no steps"


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """overview.png plus one PNG per panel whose keys the run logged, into `<run_dir>/plots` (or out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (a run directory holds {METRICS_FILE})")
    records = read_metrics(path)
    series, events = _numeric_series(records), _guard_events(records)
    panels = [p for p in _PANELS if _has_panel(p, series)]
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    name = run_dir.resolve().name
    written = []
    for panel in panels:
        fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
        _draw_panel(ax, panel, series, events)
        ax.set_title(f"{name}: {panel.title}")
        written.append(_save(fig, out / f"{panel.name}.png"))
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.2 * rows), layout="constrained", squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw_panel(ax, panel, series, events)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no plottable metrics in this run", ha="center", va="center")
    fig.suptitle(f"{name} — {_step_range(series)}", fontsize=14, fontweight="bold")
    written.insert(0, _save(fig, out / "overview.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- evaluation


def _load_problems(path: Path) -> dict[str, list[dict[str, Any]]]:
    """problems.jsonl rows grouped by benchmark; a row that is not a JSON object raises naming its line."""
    by_bench: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("accuracy"), int | float):
            raise ValueError(f"{path}: line {i + 1} is not a problem row with an accuracy: {line[:200]!r}")
        by_bench[str(row.get("benchmark", "?"))].append(row)
    return dict(by_bench)


def _samples_per_problem(rows: Sequence[dict[str, Any]]) -> int | None:
    """k x seeds when every row agrees and it is small enough for one bar per achievable accuracy, else None."""
    sizes = {int(r.get("k", 0)) * len(r.get("correct") or []) for r in rows}
    size = sizes.pop() if len(sizes) == 1 else 0
    return size if 0 < size <= 64 else None


def _draw_hist(ax: Any, bench: str, rows: Sequence[dict[str, Any]]) -> None:
    acc = [float(r["accuracy"]) for r in rows]
    n = _samples_per_problem(rows)
    lo, hi = UNCERTAIN_BAND
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.15, lw=0)
    if n:
        # One bar per achievable accuracy i/n (bin width 1/n), so 0 and 1 (never / always solved) stand alone;
        # capped at 0.1 wide so that k'=1 or 2 still reads as accuracies on [0, 1], not as wide blocks.
        counts = Counter(round(a * n) for a in acc)
        width = min(1 / n, 0.1) * 0.9
        ax.bar([i / n for i in sorted(counts)], [counts[i] for i in sorted(counts)], width=width, color="tab:blue")
    else:
        ax.hist(acc, bins=[i / 20 for i in range(21)], color="tab:blue", edgecolor="white")
    uncertain = sum(lo < a < hi for a in acc)
    never, always = sum(a == 0 for a in acc), sum(a == 1 for a in acc)
    samples = f", {n} sample{'s' if n > 1 else ''} each" if n else ""
    ax.set_title(
        f"{bench}: {len(acc)} problems{samples}\n{uncertain} uncertain (in ({lo}, {hi}), shaded); "
        f"{never} never, {always} always solved",
        fontsize=10,
    )
    ax.set_xlabel("per-problem accuracy (pooled over seeds)")
    ax.set_ylabel("problems")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlim(-0.07, 1.07)
    ax.grid(True, axis="y", alpha=0.3)


def _pass_at_k(summary: Any) -> dict[str, dict[int, float]]:
    """{benchmark: {k: pass@k}} from summary.json, whether benchmarks sit at the top or under "benchmarks"."""
    table = summary.get("benchmarks", summary) if isinstance(summary, dict) else {}
    curves = {}
    for bench, entry in table.items() if isinstance(table, dict) else ():
        values = entry.get("pass@k") if isinstance(entry, dict) else None
        if isinstance(values, dict):
            curve = {int(k): float(v) for k, v in values.items() if str(k).isdigit() and isinstance(v, int | float)}
            if len(curve) > 1:  # a single k (k=1) is no curve
                curves[bench] = dict(sorted(curve.items()))
    return curves


def _plot_pass_at_k(curves: dict[str, dict[int, float]], title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for bench, curve in sorted(curves.items()):
        ax.plot(list(curve), list(curve.values()), "o-", markersize=5 if len(curve) <= 8 else 3, label=bench)
    ax.set_xscale("log", base=2)
    # Summaries hold every k' <= k: label powers of two (and the largest k) only, or 64 labels overlap.
    top = max(k for curve in curves.values() for k in curve)
    ticks = sorted({2**i for i in range(top.bit_length()) if 2**i <= top} | {top})
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (samples per problem, log2 scale)")
    ax.set_ylabel("pass@k")
    ax.set_title(f"{title}: pass@k")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_eval(eval_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """accuracy_hist.png (per benchmark: how many problems are solved never, sometimes, always) and, when
    summary.json has pass@k per benchmark, pass_at_k.png; into `<eval_dir>/plots` (or out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_dir = Path(eval_dir)
    path = eval_dir / PROBLEMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PROBLEMS_FILE} at {path} (written by `lcot-mega eval --out DIR`)")
    by_bench = _load_problems(path)
    if not by_bench:
        raise ValueError(f"{path} has no problem rows")
    out = Path(out_dir) if out_dir is not None else eval_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    cols = min(3, len(by_bench))
    rows = math.ceil(len(by_bench) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), layout="constrained", squeeze=False)
    for ax, (bench, bench_rows) in zip(axes.flat, sorted(by_bench.items()), strict=False):
        _draw_hist(ax, bench, bench_rows)
    for ax in list(axes.flat)[len(by_bench) :]:
        ax.set_axis_off()
    name = eval_dir.resolve().name
    fig.suptitle(f"{name}: per-problem accuracy", fontsize=13, fontweight="bold")
    written = [_save(fig, out / "accuracy_hist.png")]
    summary_path = eval_dir / SUMMARY_FILE
    if summary_path.is_file():
        curves = _pass_at_k(json.loads(summary_path.read_text()))
        if curves:
            written.append(_plot_pass_at_k(curves, name, out / "pass_at_k.png"))
    return written


# ---------------------------------------------------------------------------------------------- dispatch, CLI


def plot_dir(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Plot whatever `path` holds: a run (metrics.jsonl), an evaluation (problems.jsonl), or both."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory: expected a run directory or an eval output directory")
    plotters: list[Callable[..., list[Path]]] = []
    if (path / METRICS_FILE).is_file():
        plotters.append(plot_run)
    if (path / PROBLEMS_FILE).is_file():
        plotters.append(plot_eval)
    if not plotters:
        raise ValueError(
            f"{path} has neither {METRICS_FILE} (a training run directory) nor {PROBLEMS_FILE}"
            " (an `lcot-mega eval --out` directory): nothing to plot"
        )
    return [png for plot in plotters for png in plot(path, out_dir)]


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("lcot-mega plot: needs matplotlib: pip install 'lcot-mega[eval]' (or matplotlib)", file=sys.stderr)
        return 2
    if args.compare:
        if not args.out:
            print("lcot-mega plot --compare: give --out DIR for the comparison's PNGs", file=sys.stderr)
            return 2
        from lcot_mega.observe.compare import plot_compare

        return _print_pngs(lambda: plot_compare(args.dirs, args.out, title=args.title))
    for directory in args.dirs:
        # Several directories into one --out would overwrite each other's overview.png: one folder each.
        out = Path(args.out) / Path(directory).resolve().name if args.out and len(args.dirs) > 1 else args.out
        status = _print_pngs(lambda d=directory, o=out: plot_dir(d, o))
        if status:
            return status
    return 0


def _print_pngs(plot: Callable[[], list[Path]]) -> int:
    """Run `plot`, print the files it wrote; 2 with the reason when there was nothing (or nothing sound) to plot."""
    try:
        written = plot()
    except (ValueError, FileNotFoundError) as e:
        print(f"lcot-mega plot: {e}", file=sys.stderr)
        return 2
    for png in written:
        print(png)
    return 0


def add_plot_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `lcot-mega plot DIR [DIR ...] [--out OUT] [--compare --title T]` (needs matplotlib)."""
    p = subparsers.add_parser(
        "plot",
        help="PNG plots of run directories (metrics.jsonl) and eval directories (problems.jsonl)",
        epilog="exit status: 0 plotted; 2 a directory holds nothing to plot or a file is damaged",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directory or `lcot-mega eval --out` directory")
    p.add_argument(
        "--out", default=None, help="write the PNGs here (one sub-folder per DIR when several); default DIR/plots"
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="overlay the run directories, one colour per variant (`<variant>-seed<N>` runs averaged); needs --out",
    )
    p.add_argument("--title", default="", help="title of the --compare plots")
    p.set_defaults(func=_cmd_plot)
    return p
