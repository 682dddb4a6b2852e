"""The figure of docs/REPRODUCTION.md section 5 (cold start vs zero-RL), drawn from the same run files as its tables.

python examples/study/figures.py settings [RUNS_ROOT=runs/study] [OUT=RUNS_ROOT/plots/settings.png]

One panel per evaluation set (the first is in domain): for each polarity mode, a bar per setting at the mean gain of
avg@k over that setting's own starting model, in points, a dot per seed, and the 95% t-interval across seeds as a
whisker (none with one seed). The numbers are those of `tables.py settings` (`tables.settings_gains`).
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

MODE_ORDER = ("both", "negative", "positive", "weighted", "inject")
"""Modes left to right; any other mode follows in name order."""


@cache
def _tables() -> ModuleType:
    """tables.py beside this file, loaded by path so the figure works from any working directory; registered in
    sys.modules before it runs, since its dataclasses look their module up while they are built."""
    spec = importlib.util.spec_from_file_location("study_tables", Path(__file__).with_name("tables.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def settings_figure(root: Path, out: Path) -> Path:
    """Write the cold start vs zero-RL gain chart to out (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = _tables()
    gains = tables.settings_gains(root)
    labels = [label for label, modes in gains.items() if modes]
    if not labels:
        raise FileNotFoundError(f"no evaluated cold-start or zero-RL runs under {root}")
    modes = sorted({m for label in labels for m in gains[label]}, key=lambda m: (_rank(m), m))
    benches = list(next(b for label in labels for b in gains[label].values()))
    fig, axes = plt.subplots(1, len(benches), figsize=(5.2 * len(benches), 3.8), sharey=True, squeeze=False)
    width = 0.8 / len(labels)
    for ax, bench in zip(axes[0], benches, strict=True):
        for j, label in enumerate(labels):
            for i, mode in enumerate(modes):
                vals = [100 * v for v in gains[label].get(mode, {}).get(bench, []) if not math.isnan(v)]
                if not vals:
                    continue
                x = i + (j - (len(labels) - 1) / 2) * width
                ax.bar(x, statistics.fmean(vals), width * 0.9, color=f"C{j}", alpha=0.55)
                if len(vals) > 1:
                    ax.errorbar(x, statistics.fmean(vals), yerr=tables.half_width(vals), color="black", capsize=3, lw=1)
                ax.scatter([x] * len(vals), vals, color=f"C{j}", s=14, zorder=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(bench + (" (in domain)" if bench == benches[0] else " (out of domain)"))
    axes[0][0].set_ylabel("avg@k gain over the starting model (points)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{j}", alpha=0.55) for j in range(len(labels))]
    seeds = {label: max((len(s) for m in gains[label].values() for s in m.values()), default=0) for label in labels}
    names = [f"{label} (up to {seeds[label]} seed{'s' * (seeds[label] != 1)})" for label in labels]
    fig.legend(handles, names, loc="upper center", ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _rank(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "settings" or len(argv) > 3:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[1]) if len(argv) > 1 else Path("runs/study")
    out = Path(argv[2]) if len(argv) > 2 else root / "plots" / "settings.png"
    print(settings_figure(root, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
