"""Comparison plots across runs: grouping by `<variant>-seed<N>`, the per-step mean worked by hand, the PNGs
written and not blank, and the CLI's errors."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from lcot_mega.observe.compare import group_runs, mean_series, plot_compare
from lcot_mega.observe.plots import add_plot_parser

pytest.importorskip("matplotlib")


def _run(root, name, steps, entropy0, extra=None):
    d = root / name
    d.mkdir(parents=True)
    rows = [
        {"step": s, "actor/entropy": entropy0 - 0.1 * s, "reward/accuracy": 0.1 * s, "guard/action": "ok"}
        | (extra or {})
        for s in range(1, steps + 1)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_runs_group_by_variant_and_sort_by_seed(tmp_path):
    dirs = [_run(tmp_path, n, 3, 1.0) for n in ("neg-seed3", "both-seed2", "neg-seed1", "plain")]
    variants = group_runs(dirs)
    assert [v.name for v in variants] == ["neg", "both", "plain"]
    assert [d.name for d in variants[0].runs] == ["neg-seed1", "neg-seed3"]
    assert [d.name for d in variants[2].runs] == ["plain"]


def test_mean_series_keeps_common_steps_and_skips_nan():
    a = [(1, 1.0), (2, 3.0), (3, 5.0)]
    b = [(1, 2.0), (2, math.nan)]  # stopped after step 2; NaN at step 2
    assert mean_series([a, b]) == [(1, 1.5), (2, 3.0)]
    assert mean_series([]) == []


def test_plot_compare_writes_a_png_per_logged_metric(tmp_path):
    dirs = [_run(tmp_path / "runs", f"{v}-seed{s}", 12, 2.0 + s) for v in ("both", "negative") for s in (1, 2)]
    dirs.append(_run(tmp_path / "runs", "solo", 4, 1.0, {"eval/chain_sum/accuracy": 0.3}))
    written = plot_compare(dirs, tmp_path / "out", title="polarity")
    names = {p.name for p in written}
    assert names == {
        "compare_overview.png",
        "compare_actor_entropy.png",
        "compare_reward_accuracy.png",
        "compare_eval_chain_sum_accuracy.png",
    }
    image = pytest.importorskip("matplotlib.image").imread(tmp_path / "out" / "compare_actor_entropy.png")
    assert image.var() > 0


def test_cli_compare_needs_out_and_runs(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_plot_parser(parser.add_subparsers())
    run = _run(tmp_path, "a-seed1", 3, 1.0)
    args = parser.parse_args(["plot", str(run), "--compare"])
    assert args.func(args) == 2 and "--out" in capsys.readouterr().err
    args = parser.parse_args(["plot", str(run), str(tmp_path / "missing"), "--compare", "--out", str(tmp_path / "o")])
    assert args.func(args) == 2 and "no metrics file" in capsys.readouterr().err
    args = parser.parse_args(["plot", str(run), "--compare", "--out", str(tmp_path / "o")])
    assert args.func(args) == 0 and "compare_overview.png" in capsys.readouterr().out
