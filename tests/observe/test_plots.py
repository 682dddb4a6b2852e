"""PNG plots of a run and of an evaluation: metrics read back as worked by hand, every panel written, valid and
not blank, a missing key skipping its panel, and the dispatcher's and CLI's errors."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from lcot_mega.observe import plots
from lcot_mega.observe.plots import add_plot_parser, load_metrics, plot_dir, plot_eval, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PNGS = {"overview", "reward", "entropy", "kl", "length", "zero_adv", "polarity"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_png(path):
    """A real PNG with pixels, not an empty canvas."""
    imread = pytest.importorskip("matplotlib.image").imread
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0
    assert image.var() > 0
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        im.verify()
        assert im.size == (image.shape[1], image.shape[0])


def _run_rows(steps=30):
    """A run with every plotted key, evals every 10 steps, and guard verdicts (labels) on a few steps."""
    rows = []
    for s in range(steps):
        acc = 0.1 + 0.02 * s + 0.05 * math.sin(s)
        row = {"step": s, "time": 1000.0 + s, "reward/mean": acc - 0.05, "reward/accuracy": acc}
        row |= {"actor/entropy": 2.0 - 0.05 * s, "actor/ppo_kl": 1e-3 * s, "actor/approx_kl_k3": 5e-4 * s}
        row |= {"rollout/logp_gap_mean": 0.03, "rollout/response_len_mean": 300.0 + 10 * s}
        row |= {"rollout/truncated_frac": 0.01 * s, "adv/zero_frac_samples": 0.3, "adv/zero_frac_groups": 0.2}
        row |= {"rollout/zero_adv_frac": 0.5, "polarity/pos_share": 0.4, "polarity/neg_share": 0.6}
        row |= {"polarity/kept_pos_share": 0.5, "polarity/kept_neg_share": 0.5}
        row["guard/action"] = {7: "warn", 15: "rollback", 16: "skip"}.get(s, "ok")
        row["guard/reason"] = "" if row["guard/action"] == "ok" else "grad_norm 53.1 > 10 x median 4.2"
        if s % 10 == 0:
            row |= {"eval/math_500/accuracy": 0.2 + 0.01 * s, "eval/math_500/accuracy_stderr": 0.02}
            row |= {"eval/math_500/pass@4": 0.5}
        rows.append(row)
    rows[steps // 2]["actor/entropy"] = None  # NaN
    return rows


def test_load_metrics_last_write_wins_null_is_nan_labels_skipped(tmp_path):
    path = _write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            {"step": 2, "time": 10.0, "reward/accuracy": 0.5, "guard/action": "ok", "actor/entropy": 1.0},
            {"step": 1, "time": 11.0, "reward/accuracy": 0.25, "actor/grad_norm": None},
            {"step": 2, "time": 12.0, "reward/accuracy": 0.75, "guard/reason": "x > y"},  # repeated step: wins
            {"step": 3, "time": 13.0, "eval/gsm8k/accuracy": 0.4},
        ],
    )
    series = load_metrics(path)
    assert series["reward/accuracy"] == [(1, 0.25), (2, 0.75)]
    assert series["actor/entropy"] == [(2, 1.0)]  # absent from the repeat: the earlier value stays
    assert series["eval/gsm8k/accuracy"] == [(3, 0.4)]
    assert series["time"] == [(1, 11.0), (2, 12.0), (3, 13.0)]
    (step, value), *_ = series["actor/grad_norm"]
    assert step == 1 and math.isnan(value)
    assert "guard/action" not in series and "guard/reason" not in series and "step" not in series


def test_load_metrics_names_file_and_line_of_a_damaged_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a/b": 1.0}\n[1, 2]\n{"step": 2, "a/b": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2"):
        load_metrics(path)


def test_load_metrics_skips_a_torn_last_line_of_a_live_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a/b": 1.0}\n{"step": 1, "a/')
    assert load_metrics(path) == {"a/b": [(0, 1.0)]}


def test_load_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        load_metrics(tmp_path / "metrics.jsonl")


def test_plot_run_writes_every_panel_as_a_valid_nonblank_png(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", _run_rows())
    written = plot_run(run)
    assert {p.stem for p in written} == RUN_PNGS
    assert all(p.parent == run / "plots" for p in written)
    for png in written:
        _assert_png(png)


def test_plot_run_skips_the_panels_of_missing_keys(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "time": float(s), "actor/entropy": 1.0 / (s + 1), "guard/action": "ok"} for s in range(5)]
    _write_jsonl(tmp_path / "metrics.jsonl", rows)
    written = plot_run(tmp_path, tmp_path / "out")
    assert sorted(p.name for p in written) == ["entropy.png", "overview.png"]
    for png in written:
        _assert_png(png)


def test_plot_run_eval_only_run_still_has_a_reward_panel(tmp_path):
    pytest.importorskip("matplotlib")
    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": 0, "time": 0.0, "eval/x/accuracy": 0.3}])
    assert sorted(p.stem for p in plot_run(tmp_path, tmp_path / "out")) == ["overview", "reward"]


def _problem_rows():
    rows = []
    for i in range(40):
        correct = [i % 5, (i * 3) % 5]  # two seeds of k=4: per-problem accuracy in steps of 1/8
        rows.append(
            {"benchmark": "math_500", "uid": f"m/{i}", "k": 4, "correct": correct, "accuracy": sum(correct) / 8}
        )
    for i in range(25):
        rows.append({"benchmark": "aime", "uid": f"a/{i}", "k": 1, "correct": [i % 2], "accuracy": float(i % 2)})
    for i in range(12):  # k differs per problem: no common bin width, 20 plain bins
        k = 1 + i % 3
        rows.append(
            {"benchmark": "mixed", "uid": f"x/{i}", "k": k, "correct": [i % (k + 1)], "accuracy": i % (k + 1) / k}
        )
    return rows


def test_plot_eval_histogram_and_pass_at_k(tmp_path):
    pytest.importorskip("matplotlib")
    _write_jsonl(tmp_path / "problems.jsonl", _problem_rows())
    (tmp_path / "summary.json").write_text(
        json.dumps({"model": "m", "benchmarks": {"math_500": {"pass@k": {"1": 0.3, "2": 0.45, "4": 0.6}}, "aime": {}}})
    )
    written = plot_eval(tmp_path, tmp_path / "out")
    assert [p.name for p in written] == ["accuracy_hist.png", "pass_at_k.png"]
    for png in written:
        _assert_png(png)


def test_plot_eval_without_summary_writes_only_the_histogram(tmp_path):
    pytest.importorskip("matplotlib")
    _write_jsonl(tmp_path / "problems.jsonl", _problem_rows()[:10])
    assert [p.name for p in plot_eval(tmp_path)] == ["accuracy_hist.png"]
    assert (tmp_path / "plots" / "accuracy_hist.png").is_file()


def test_plot_eval_names_a_bad_row(tmp_path):
    (tmp_path / "problems.jsonl").write_text('{"benchmark": "b", "accuracy": 0.5}\n{"benchmark": "b"}\n')
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="line 2"):
        plot_eval(tmp_path)


@pytest.fixture
def fake_plotters(monkeypatch):
    """plot_run / plot_eval replaced by recorders: dispatch and CLI tests need not draw (drawing has its own tests)."""
    calls = []

    def fake(kind):
        def plot(directory, out_dir=None):
            calls.append((kind, directory, out_dir))
            return [Path(out_dir or directory) / f"{kind}.png"]

        return plot

    monkeypatch.setattr(plots, "plot_run", fake("run"))
    monkeypatch.setattr(plots, "plot_eval", fake("eval"))
    return calls


def test_plot_dir_dispatches_on_what_the_directory_holds(tmp_path, fake_plotters):
    _write_jsonl(tmp_path / "metrics.jsonl", _run_rows(3))
    assert plot_dir(tmp_path) == [tmp_path / "run.png"]
    (tmp_path / "metrics.jsonl").unlink()
    _write_jsonl(tmp_path / "problems.jsonl", _problem_rows())
    assert plot_dir(tmp_path) == [tmp_path / "eval.png"]
    _write_jsonl(tmp_path / "metrics.jsonl", _run_rows(3))
    assert plot_dir(tmp_path, tmp_path / "out") == [tmp_path / "out" / "run.png", tmp_path / "out" / "eval.png"]


def test_plot_dir_errors_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"neither metrics\.jsonl .* nor problems\.jsonl"):
        plot_dir(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        plot_dir(tmp_path / "absent")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="lcot-mega")
    add_plot_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_written_paths_and_returns_2_on_an_empty_dir(tmp_path, capsys, fake_plotters):
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", _run_rows(3))
    assert _cli(["plot", str(run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "run.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(["plot", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcot-mega plot:") and "nothing to plot" in err


def test_cli_several_dirs_get_one_out_folder_each(tmp_path, capsys, fake_plotters):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _write_jsonl(tmp_path / name / "metrics.jsonl", _run_rows(3))
    assert _cli(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    assert [out for _, _, out in fake_plotters] == [tmp_path / "out" / "a", tmp_path / "out" / "b"]


def test_package_imports_without_matplotlib():
    import subprocess
    import sys

    code = "import sys; sys.modules['matplotlib'] = None; import lcot_mega.observe.plots"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_moving_average_skips_nan_and_uses_partial_windows_at_the_edges():
    smoothed = plots._smooth([1.0, 2.0, math.nan, 4.0, 5.0], 3)
    assert smoothed == [1.5, 1.5, 3.0, 4.5, 4.5]
    assert math.isnan(plots._smooth([math.nan, math.nan, 1.0], 1)[0])
