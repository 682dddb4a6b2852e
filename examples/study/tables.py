"""Turn the study runs' own metrics.jsonl and `lcot-mega eval` outputs into the tables of docs/REPRODUCTION.md.

python examples/study/tables.py EXPERIMENT|all [RUNS_ROOT=runs/study]   (EXPERIMENT: polarity zero_adv length uncertain
    cold_start zero_rl_long settings injection robustness evidence)
python examples/study/tables.py export [RUNS_ROOT=runs/study] DEST

`export` copies what the tables read (config.yaml, metrics.jsonl, each evaluation's summary.json and problems.jsonl;
no checkpoints, no samples) into DEST with the same layout, so `tables.py all DEST` rebuilds every table from a copy
small enough to keep beside the document (docs/study/runs).

Runs are found as RUNS_ROOT/<experiment>/<variant>-seed<N>/ (what the scripts beside this one write). Every number
is a mean over seeds with a 95% t-interval across seeds (none with one seed); eval numbers come from
`eval-final/summary.json`, training numbers from `metrics.jsonl`. Tables are printed and written to
RUNS_ROOT/tables/<experiment>.md.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% Student-t quantiles by degrees of freedom (more seeds than 11 use 1.96)."""
RUN_NAME = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")
Row = dict[str, float]


def mean_ci(values: Sequence[float], fmt: str = ".3g") -> str:
    """'m ± h' with h the 95% t half-width across seeds ('m' alone for one seed; '-' for none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} ± {half_width(vals):{fmt}}"


def half_width(values: Sequence[float]) -> float:
    """The 95% t-interval's half width of the mean across seeds (0 with fewer than two values)."""
    if len(values) < 2:
        return 0.0
    return T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def pct_ci(values: Sequence[float]) -> str:
    """Percentages with one decimal: the tables' accuracies line up."""
    return mean_ci([100 * v for v in values], ".1f")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            continue
    return rows


def series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in metrics if isinstance(r.get(key), int | float)]


def runs_of(root: Path, experiment: str) -> dict[str, list[Path]]:
    """variant -> its seeds' run directories (sorted by seed)."""
    found: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for d in sorted((root / experiment).glob("*-seed*")):
        m = RUN_NAME.match(d.name)
        if m and (d / "metrics.jsonl").is_file():
            found[m["variant"]].append((int(m["seed"]), d))
    return {v: [d for _, d in sorted(runs)] for v, runs in found.items()}


def _seed(run: Path) -> str:
    """The seed in a run directory's name (`<variant>-seed<N>`)."""
    return run.name.rsplit("seed", 1)[1]


def _by_seed(runs: list[Path]) -> dict[str, Path]:
    return {_seed(r): r for r in runs}


def evaluated(groups: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """The runs of each variant that have their final evaluation; variants with none are dropped."""
    done = {v: [r for r in runs if eval_summary(r)] for v, runs in groups.items()}
    return {v: runs for v, runs in done.items() if runs}


def eval_summary(run: Path, name: str = "eval-final") -> dict:
    path = run / name / "summary.json"
    return json.loads(path.read_text())["benchmarks"] if path.is_file() else {}


def training_row(run: Path) -> Row:
    """What one run's metrics.jsonl says about training: entropy, zero advantage, cost, length."""
    m = read_metrics(run / "metrics.jsonl")
    ent = [v for _, v in series(m, "actor/entropy")]
    length = [v for _, v in series(m, "rollout/response_len_mean")]
    steps = [v for _, v in series(m, "perf/step_s")]
    generated = sum(v for _, v in series(m, "rollout/groups_generated"))
    kept = sum(v for _, v in series(m, "polarity/kept_pos_count")) + sum(
        v for _, v in series(m, "polarity/kept_neg_count")
    )
    return {
        "entropy_first5": statistics.fmean(ent[:5]) if ent else math.nan,
        "entropy_last5": statistics.fmean(ent[-5:]) if ent else math.nan,
        "zero_samples": _mean(m, "adv/zero_frac_samples"),
        "zero_groups_generated": _mean(m, "rollout/zero_adv_frac"),
        "groups_per_kept": _mean(m, "rollout/groups_per_kept_group"),
        "groups_generated": generated,
        "informative_samples": kept,
        "train_minutes": sum(steps) / 60,
        "len_first10": statistics.fmean(length[:10]) if length else math.nan,
        "len_last10": statistics.fmean(length[-10:]) if length else math.nan,
        "shaped": _mean(m, "reward/shaped_frac"),
    }


def _mean(metrics: list[dict], key: str) -> float:
    vals = [v for _, v in series(metrics, key)]
    return statistics.fmean(vals) if vals else math.nan


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _collect(runs: list[Path], fn: Callable[[Path], float]) -> list[float]:
    return [fn(r) for r in runs]


def _value(bench: dict, key: str, sub: str | None = None) -> float:
    """bench[key] (or bench[key][sub]) of one benchmark's summary; NaN where it is missing."""
    v = bench.get(key, math.nan)
    return float(v.get(sub, math.nan) if isinstance(v, dict) and sub is not None else v)


def _bench(run: Path, idx: int, key: str, sub: str | None = None) -> float:
    b = list(eval_summary(run).values())
    return _value(b[idx], key, sub) if len(b) > idx else math.nan


def _bench_names(groups: dict[str, list[Path]]) -> list[str]:
    for runs in groups.values():
        for r in runs:
            names = list(eval_summary(r))
            if names:
                return names
    return []


def polarity(root: Path, experiment: str = "polarity", base_eval: str = "base-eval") -> str:
    """The polarity modes of `experiment` (one directory of runs) against the untrained model of `base_eval`; runs
    still training (no evaluation yet) are left out of every column."""
    groups = evaluated(runs_of(root, experiment))
    names = _bench_names(groups)
    if not names:
        return f"no finished runs under {root / experiment}"
    passes = [eval_summary(r).get(names[0], {}).get("pass@k", {}) for runs in groups.values() for r in runs]
    k = max((int(j) for p in passes for j in p), default=1)
    head = ["mode", "seeds"]
    for n in names:
        head += [f"{n} avg@{k} %", f"{n} pass@{k} %", f"{n} greedy %"]
    head += ["entropy first 5 steps", "entropy last 5 steps"]
    rows = []
    for mode, runs in groups.items():
        row = [mode, ",".join(_seed(r) for r in runs)]
        for i, _ in enumerate(names):
            row.append(pct_ci(_collect(runs, lambda r, i=i: _bench(r, i, "avg@k"))))
            row.append(pct_ci(_collect(runs, lambda r, i=i: _bench(r, i, "pass@k", str(k)))))
            row.append(pct_ci(_collect(runs, lambda r, i=i: _bench(r, i, "greedy", "accuracy"))))
        tr = [training_row(r) for r in runs]
        row += [mean_ci([t["entropy_first5"] for t in tr]), mean_ci([t["entropy_last5"] for t in tr])]
        rows.append(row)
    base = eval_summary(root, base_eval)
    if base:
        row = ["untrained model", "-"]
        for n in names:
            b = base.get(n, {})
            row += [pct_ci([b.get("avg@k", math.nan)]), pct_ci([b.get("pass@k", {}).get(str(k), math.nan)])]
            row.append(pct_ci([b.get("greedy", {}).get("accuracy", math.nan)]))
        rows.append([*row, "-", "-"])
    out = [table(head, rows)]
    ks = [j for j in (1, 2, 4, 8, 16) if j <= k]
    for i, n in enumerate(names):
        pk_rows = [
            [mode] + [pct_ci(_collect(runs, lambda r, i=i, j=j: _bench(r, i, "pass@k", str(j)))) for j in ks]
            for mode, runs in groups.items()
        ]
        if n in base:
            pk_rows.append(["untrained model"] + [pct_ci([base[n]["pass@k"].get(str(j), math.nan)]) for j in ks])
        out.append(f"pass@k on {n} (%)\n\n" + table(["mode"] + [f"pass@{j}" for j in ks], pk_rows))
    out.append(_paired_vs(groups, names, "both"))
    return "\n\n".join(out)


def _paired_vs(groups: dict[str, list[Path]], names: list[str], ref: str) -> str:
    """Each mode minus `ref` at the same seed (same prompts, same sampling seeds, same eval problems), in points,
    with the t-interval of the per-seed differences: tighter than comparing two unpaired means."""
    by_seed = _by_seed(groups.get(ref, []))
    head = ["mode minus " + ref, "seeds"] + [f"{n} {m} (points)" for n in names for m in ("avg@k", "pass@max k")]
    rows = []
    for mode, runs in groups.items():
        pairs = [(r, by_seed[_seed(r)]) for r in runs if _seed(r) in by_seed]
        if mode == ref or not pairs:
            continue
        row = [mode, ",".join(_seed(r) for r, _ in pairs)]
        for i, name in enumerate(names):
            ks = [int(j) for r, _ in pairs for j in eval_summary(r).get(name, {}).get("pass@k", {})]
            k = str(max(ks, default=1))
            row.append(pct_ci([_bench(a, i, "avg@k") - _bench(b, i, "avg@k") for a, b in pairs]))
            row.append(pct_ci([_bench(a, i, "pass@k", k) - _bench(b, i, "pass@k", k) for a, b in pairs]))
        rows.append(row)
    return f"Paired by seed, each mode minus {ref}\n\n" + table(head, rows) if rows else ""


def zero_adv(root: Path) -> str:
    groups = runs_of(root, "zero_adv")
    names = _bench_names(groups)
    head = ["dynamic sampling", "seeds", "zero-adv samples (trained batch) %", "zero-adv groups (generated) %"]
    head += ["groups generated / kept", "training minutes", f"{names[0] if names else 'in-domain'} avg@k %"]
    head += ["accuracy points / training minute"]
    base = eval_summary(root, "base-eval") if (root / "base-eval").is_dir() else {}
    base_acc = next(iter(base.values()))["avg@k"] if base else math.nan
    rows = []
    for variant, runs in groups.items():
        tr = [training_row(r) for r in runs]
        acc = _collect(runs, lambda r: _bench(r, 0, "avg@k"))
        per_min = [
            100 * (a - base_acc) / t["train_minutes"] if t["train_minutes"] > 0 else math.nan  # a run still starting
            for a, t in zip(acc, tr, strict=True)
        ]
        rows.append(
            [
                variant,
                str(len(runs)),
                pct_ci([t["zero_samples"] for t in tr]),
                pct_ci([t["zero_groups_generated"] for t in tr]),
                mean_ci([t["groups_per_kept"] for t in tr]),
                mean_ci([t["train_minutes"] for t in tr]),
                pct_ci(acc),
                mean_ci(per_min),
            ]
        )
    return table(head, rows)


def length(root: Path) -> str:
    groups = runs_of(root, "length")
    names = _bench_names(groups)
    head = ["relative length reward", "seeds", "samples shaped %", "response tokens, first 10 steps", "last 10 steps"]
    head += [f"{n} avg@k %" for n in names] + [f"{n} eval length" for n in names]
    rows = []
    for variant, runs in groups.items():
        tr = [training_row(r) for r in runs]
        row = [variant, str(len(runs)), pct_ci([t["shaped"] for t in tr])]
        row += [mean_ci([t["len_first10"] for t in tr]), mean_ci([t["len_last10"] for t in tr])]
        row += [pct_ci(_collect(runs, lambda r, i=i: _bench(r, i, "avg@k"))) for i, _ in enumerate(names)]
        row += [mean_ci(_collect(runs, lambda r, i=i: _bench(r, i, "response_len_mean"))) for i, _ in enumerate(names)]
        rows.append(row)
    return "\n\n".join(filter(None, [table(head, rows), _paired_vs(groups, names, "off")]))


def uncertain(root: Path, small: int = 30) -> str:
    """Per evaluated checkpoint and benchmark: uncertain problems, flips, and runs needed at `small` problems."""
    head = ["run", "benchmark", "problems", "samples / problem", "avg@k % (per seed)", "uncertain", "variance share %"]
    head += ["greedy flip rate %", f"1-sample runs for ±5 pts on {small} problems", "runs of k for ±2 pts (this set)"]
    rows = []
    for run in sorted((root / "polarity").glob("*-seed*")):
        for name, s in eval_summary(run, "eval-uncertain").items():
            u = s["uncertain"]
            per_problem_var = (u["one_sample_stderr"] * s["n_problems"]) ** 2 / s["n_problems"]  # mean p(1-p)
            small_runs = math.ceil(1.96**2 * per_problem_var / small / 0.05**2)
            rows.append(
                [
                    run.name,
                    name,
                    str(s["n_problems"]),
                    str(s["samples_per_problem"]),
                    f"{100 * s['avg@k']:.1f} ({', '.join(f'{100 * a:.1f}' for a in s['avg@k_per_seed'])})",
                    f"{u['count']} ({100 * u['frac']:.0f}%)",
                    f"{100 * u['variance_share']:.0f}",
                    f"{100 * s['greedy']['flip_rate']:.1f}" if "greedy" in s else "-",
                    str(small_runs),
                    str(u["runs_needed"]["0.02"]),
                ]
            )
    return table(head, rows) if rows else "no eval-uncertain results under " + str(root / "polarity")


SETTINGS = {"cold start": ("cold_start", "cold-start-eval"), "zero-RL": ("zero_rl_long", "base-eval-long")}
"""The two starting points of issue 18: label -> (runs directory, the starting model's evaluation)."""


def settings(root: Path) -> str:
    """Cold start vs zero-RL, the study's headline (negatives alone suffice from a long-CoT model; positives are
    needed from an instruct model): each mode's gain over its own starting model, in points, per setting, with the
    t-interval across seeds; the evaluation's response length and the last steps' entropy beside it."""
    head = ["setting", "mode", "seeds"]
    rows, names = [], []
    for label, (experiment, base_eval) in SETTINGS.items():
        groups, base = evaluated(runs_of(root, experiment)), eval_summary(root, base_eval)
        names = names or _bench_names(groups)
        for mode, done in groups.items():
            row = [label, mode, ",".join(_seed(r) for r in done)]
            for i, n in enumerate(names):
                for key, sub in (("avg@k", None), ("greedy", "accuracy")):
                    row.append(pct_ci(_gains(done, i, base.get(n, {}), key, sub)))
                row.append(mean_ci([_bench(r, i, "response_len_mean") for r in done], ".0f"))
            row.append(mean_ci([training_row(r)["entropy_last5"] for r in done]))  # the runs evaluated
            rows.append(row)
    for n in names:
        head += [f"{n} avg@k gain (points)", f"{n} greedy gain (points)", f"{n} eval length"]
    head.append("entropy last 5 steps")
    if not rows:
        return "no runs under " + ", ".join(str(root / e) for e, _ in SETTINGS.values())
    return table(head, rows)


def _gains(runs: list[Path], idx: int, start: dict, key: str, sub: str | None = None) -> list[float]:
    """Each run's eval number on benchmark idx minus the starting model's (fractions, not points)."""
    return [_bench(r, idx, key, sub) - _value(start, key, sub) for r in runs]


def settings_gains(root: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """setting label -> mode -> benchmark -> each evaluated seed's avg@k gain over the setting's starting model
    (fractions), in seed order: what docs/study/settings.png draws (examples/study/figures.py)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for label, (experiment, base_eval) in SETTINGS.items():
        groups, base = evaluated(runs_of(root, experiment)), eval_summary(root, base_eval)
        names = _bench_names(groups)
        out[label] = {
            mode: {n: _gains(done, i, base.get(n, {}), "avg@k") for i, n in enumerate(names)}
            for mode, done in groups.items()
        }
    return out


def injection(root: Path) -> str:
    """Offline-solution injection (`algo.injection`, the study's remedy for hard problems) against "both" at the
    same seed, per setting: what went in (groups, samples, their share of the update's tokens and of its advantage
    mass, each step's mean), the policy's own rollout accuracy over the run beside that of "both" (before any
    injection: what it sampled), and the avg@k it gained, in points. The injection data are the run's own training
    problems (cold_start_data.py --run-config), so both runs draw from the same prompt stream."""
    head = ["setting", "seed", "groups injected", "samples injected", "rejected", "token share %", "advantage share %"]
    head.append("rollout accuracy %, inject / both")
    rows, names = [], []
    for label, (experiment, _) in SETTINGS.items():
        groups = evaluated(runs_of(root, experiment))
        names = names or _bench_names(groups)
        both = _by_seed(groups.get("both", []))
        pairs = [(r, both.get(_seed(r))) for r in groups.get("inject", [])]
        for run, ref in pairs:
            m = read_metrics(run / "metrics.jsonl")
            row = [label, _seed(run)]
            row += [f"{sum(v for _, v in series(m, 'injection/' + k)):.0f}" for k in ("groups", "replaced", "rejected")]
            row += [pct_ci([_mean(m, "injection/token_share")]), pct_ci([_mean(m, "injection/adv_share")])]
            row.append(" / ".join(pct_ci([_rollout_accuracy(r)]) for r in (run, ref)))
            row += [pct_ci([_avg_gain(run, ref, i)]) for i in range(len(names))]
            rows.append(row)
        if len(pairs) > 1:
            paired = [(r, b) for r, b in pairs if b]
            row = [label, "mean", *["-"] * 6]
            rows.append(row + [pct_ci([_avg_gain(r, b, i) for r, b in paired]) for i in range(len(names))])
    if not rows:
        return "no evaluated inject-seed* runs under " + ", ".join(str(root / e) for e, _ in SETTINGS.values())
    return table(head + [f"{n} avg@k, inject minus both (points)" for n in names], rows)


def robustness(root: Path) -> str:
    """The study's robustness probe (negatives are said to make a model more robust) per setting and mode: clean
    and probed avg@k on the same problems and the drop, in points, across seeds; the starting model's beside it.
    Reads RUN/eval-robust (cold_start.sh with ROBUSTNESS=1)."""
    head = ["setting", "mode", "seeds", "clean avg@k %", "probed avg@k %", "drop (points)"]
    rows = []
    for label, (experiment, base_eval) in SETTINGS.items():
        probed = {
            mode: [(r, p) for r in runs if (p := _probe(r / "eval-robust"))]
            for mode, runs in runs_of(root, experiment).items()
        }
        for mode, done in probed.items():
            if done:
                row = [label, mode, ",".join(_seed(r) for r, _ in done)]
                rows.append(row + [pct_ci([p[key] for _, p in done]) for key in ("clean_avg@k", "avg@k", "drop")])
        if start := _probe(root / f"{base_eval}-robust"):
            rows.append([label, "starting model", "-"] + [pct_ci([start[k]]) for k in ("clean_avg@k", "avg@k", "drop")])
    if not rows:
        return "no robustness evaluations (RUN/eval-robust: cold_start.sh with ROBUSTNESS=1) under " + str(root)
    return table(head, rows)


def _probe(out: Path) -> dict | None:
    """The robustness block of the one benchmark an eval-robust directory holds, or None."""
    path = out / "summary.json"
    benches = json.loads(path.read_text())["benchmarks"] if path.is_file() else {}
    return next((b["robustness"] for b in benches.values() if "robustness" in b), None)


def _rollout_accuracy(run: Path | None) -> float:
    """The mean over steps of the rollout's accuracy (what the policy sampled, before any injection)."""
    return _mean(read_metrics(run / "metrics.jsonl"), "reward/accuracy") if run else math.nan


def _avg_gain(run: Path, ref: Path | None, idx: int) -> float:
    return _bench(run, idx, "avg@k") - _bench(ref, idx, "avg@k") if ref else math.nan


@dataclass(frozen=True)
class Comparison:
    """One number the verdicts of REPRODUCTION section 5 rest on: run `a`'s avg@k minus `b`'s at the same seed, or
    minus the starting model's (`b` None), or with `probe` the two runs' robustness-probe drops (clean minus probed)."""

    setting: str
    experiment: str
    a: str
    b: str | None
    expects: str
    base_eval: str = ""
    probe: bool = False


EVIDENCE = (
    Comparison("cold start", "cold_start", "both", None, "not stated", "cold-start-eval"),
    Comparison(
        "cold start", "cold_start", "negative", None, "> 0: negatives alone reach strong performance", "cold-start-eval"
    ),
    Comparison("cold start", "cold_start", "negative", "both", ">= 0: as good as both"),
    Comparison("cold start", "cold_start", "negative", "positive", "> 0 out of domain: negatives generalize better"),
    Comparison("cold start", "cold_start", "positive", None, "not stated", "cold-start-eval"),
    Comparison("cold start", "cold_start", "positive", "both", "< 0 out of domain: positives fit the training data"),
    Comparison("zero-RL", "zero_rl_long", "positive", None, "> 0: positives make it converge", "base-eval-long"),
    Comparison("zero-RL", "zero_rl_long", "negative", None, "<= 0 (the strong form)", "base-eval-long"),
    Comparison("zero-RL", "zero_rl_long", "positive", "negative", "> 0: positives are needed"),
    Comparison("zero-RL", "zero_rl_long", "positive", "both", "none stated for zero-RL"),
    Comparison("zero-RL", "zero_rl_long", "weighted", "both", "none stated (W-REINFORCE: >= 0)"),
    Comparison("zero-RL", "zero_rl_long", "inject", "both", "about 0: beyond capacity stays hard"),
    Comparison("cold start", "cold_start", "negative", "positive", "< 0: negatives make it robust", probe=True),
    Comparison("zero-RL", "zero_rl_long", "negative", "positive", "< 0: negatives make it robust", probe=True),
    Comparison("zero-RL, 48 tokens", "zero_adv", "refill", "drop", "> 0 (DAPO)"),
)
"""The comparisons behind each claim of the study that issue 18 tests, with the sign the study predicts."""


def interval_says(values: Sequence[float]) -> str:
    """Where the 95% t-interval of the mean across seeds lies: 'above 0', 'below 0' or 'spans 0' (no interval from
    one seed). The verdict in REPRODUCTION.md reads this column against the study's expected sign."""
    if len(values) < 2:
        return "one seed" if values else "-"
    m, h = statistics.fmean(values), half_width(values)
    return "above 0" if m - h > 0 else "below 0" if m + h < 0 else "spans 0"


def _differences(root: Path, c: Comparison, names: list[str]) -> tuple[list[str], list[list[float]]]:
    """The seeds compared and, per benchmark name, each seed's difference (fractions)."""
    groups = evaluated(runs_of(root, c.experiment))
    if c.b is None:
        runs, start = groups.get(c.a, []), eval_summary(root, c.base_eval)
        gains = [_gains(runs, i, start.get(n, {}), "avg@k") if n in start else [] for i, n in enumerate(names)]
        return [_seed(r) for r in runs], gains
    if c.probe:
        drop = {
            k: {_seed(r): p["drop"] for r in runs if (p := _probe(r / "eval-robust"))} for k, runs in groups.items()
        }
        a, b = drop.get(c.a, {}), drop.get(c.b, {})
        seeds = sorted(set(a) & set(b), key=int)
        return seeds, [[a[s] - b[s] for s in seeds]] + [[] for _ in names[1:]]
    b = _by_seed(groups.get(c.b, []))
    pairs = [(r, b[_seed(r)]) for r in groups.get(c.a, []) if _seed(r) in b]
    return [_seed(r) for r, _ in pairs], [[_avg_gain(r, ref, i) for r, ref in pairs] for i, _ in enumerate(names)]


def evidence(root: Path) -> str:
    """The comparisons of EVIDENCE in points, each with its 95% t-interval over seeds and where that interval lies:
    the numbers the claims table of REPRODUCTION section 5 quotes, rebuilt from the runs."""
    rows, names = [], []
    for c in EVIDENCE:
        names = _bench_names(evaluated(runs_of(root, c.experiment))) or names
        seeds, diffs = _differences(root, c, names)
        if not seeds:
            continue
        what = f"{c.a} minus the starting model" if c.b is None else f"{c.a} minus {c.b}, same seed"
        if c.probe:
            what = f"probe drop, {c.a} minus {c.b}, same seed"
        points = [[100 * v for v in d] for d in diffs]
        row = [c.setting, what, c.expects, ",".join(seeds)]
        row += [mean_ci(p, ".1f") for p in points[:2]] + ["-"] * (2 - len(points[:2]))
        rows.append([*row, " / ".join(interval_says(p) for p in points[:2] if p)])
    if not rows:
        return "no evaluated runs for any comparison under " + str(root)
    head = ["setting", "comparison", "the study expects", "seeds"]
    head += [f"{n} (points)" for n in ([*names, "", ""])[:2]] + ["the 95% interval"]
    return table(head, rows)


EXPORTED = ("config.yaml", "metrics.jsonl", "done")
EXPORTED_EVAL = ("summary.json", "problems.jsonl")


def export(root: Path, dest: Path) -> list[Path]:
    """Copy the files the tables read from every run (and base-eval) under root into dest, same layout. A run
    directory that is a symlink (an arm shared by two experiments) stays a symlink with the same target."""
    written = []
    for src in sorted(p for p in root.rglob("*") if p.is_dir() or p.is_symlink()):
        rel = src.relative_to(root)
        if rel.parts[0] in ("tables", "plots") or any(part in ("checkpoints", "logs") for part in rel.parts):
            continue
        out = dest / rel
        if src.is_symlink():
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.is_symlink():
                out.symlink_to(src.readlink())
            written.append(out)
            continue
        if any(p.is_symlink() for p in src.parents if root in p.parents):
            continue  # inside a linked run: its target is exported under its own name
        names = EXPORTED_EVAL if (src / "summary.json").is_file() else EXPORTED
        for name in names:
            if (src / name).is_file():
                out.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes((src / name).read_bytes())
                written.append(out / name)
    return written


EXPERIMENTS = {
    "polarity": polarity,
    "zero_adv": zero_adv,
    "length": length,
    "uncertain": uncertain,
    # issue 18: the polarity modes from the cold-start model and, with the same long responses, from the instruct model
    "cold_start": partial(polarity, experiment="cold_start", base_eval="cold-start-eval"),
    "zero_rl_long": partial(polarity, experiment="zero_rl_long", base_eval="base-eval-long"),
    "settings": settings,
    "injection": injection,
    "robustness": robustness,
    "evidence": evidence,
}


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "export" and len(argv) in (2, 3):
        root, dest = (Path("runs/study"), Path(argv[1])) if len(argv) == 2 else (Path(argv[1]), Path(argv[2]))
        print(f"exported {len(export(root, dest))} files and links into {dest}")
        return 0
    if not argv or argv[0] not in (*EXPERIMENTS, "all"):
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[1]) if len(argv) > 1 else Path("runs/study")
    names = list(EXPERIMENTS) if argv[0] == "all" else [argv[0]]
    (root / "tables").mkdir(parents=True, exist_ok=True)
    for name in names:
        text = f"## {name}\n\n{EXPERIMENTS[name](root)}\n"
        (root / "tables" / f"{name}.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
