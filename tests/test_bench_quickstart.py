"""tools/bench_quickstart.py's pure parts: the statistics over seeds (worked by hand), reading the product's per-step
records from a hand-written metrics.jsonl, the report and the PERFORMANCE.md section. No model runs here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers.scripts import load_script

from lcot_mega.config import load_config

TOOLS = Path(__file__).parents[1] / "tools"
sys.path.insert(0, str(TOOLS))  # the tool imports bench_all as a sibling, as when it runs as a script
bq = load_script("tools/bench_quickstart.py")


def test_three_seeds_give_the_hand_worked_mean_and_t_interval() -> None:
    # ratios 1.0, 1.5, 2.0: mean 1.5, sd 0.5, t_{0.975,2} = 4.303, half width 4.303 x 0.5 / sqrt(3) = 1.242
    stats = bq.ratio_stats([1.0, 3.0, 4.0], [1.0, 2.0, 2.0])
    assert stats.ratios == [1.0, 1.5, 2.0] and stats.n == 3
    assert stats.mean == pytest.approx(1.5) and stats.sd == pytest.approx(0.5)
    assert stats.half_width == pytest.approx(1.242, abs=1e-3)
    assert stats.interval == pytest.approx((0.258, 2.742), abs=1e-3)
    assert stats.ratio_of_means == pytest.approx((8 / 3) / (5 / 3))  # 1.6: not the mean of the ratios
    assert bq.final_line(stats) == "lcot-mega / plain, points per minute over 3 seeds: 1.50 (95% CI 0.26-2.74)"


def test_a_plain_loop_without_gain_leaves_its_seed_out_instead_of_dividing_by_it() -> None:
    stats = bq.ratio_stats([2.0, 1.0, 3.0], [0.0, -1.0, 1.5])
    assert stats.ratios == [None, None, 2.0] and stats.n == 1 and stats.mean == 2.0
    assert stats.sd is None and stats.interval is None
    assert stats.ratio_of_means == pytest.approx(2.0 / (0.5 / 3))
    assert (
        bq.final_line(stats) == "lcot-mega / plain, points per minute over 1 seeds: 2.00 (95% CI undefined: one seed)"
    )
    none = bq.ratio_stats([1.0], [0.0])
    assert none.mean is None and none.ratio_of_means is None
    assert bq.final_line(none).endswith("over 0 seeds: undefined (the plain loop gained nothing on any seed)")


def test_t_quantiles_without_scipy_match_scipy(monkeypatch) -> None:
    stats = pytest.importorskip("scipy.stats")
    expected = {df: float(stats.t.ppf(0.975, df)) for df in (*range(1, 31), 31, 45, 100, 1000)}
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` now raises ImportError
    assert bq.t_975(2) == 4.303
    for df, value in expected.items():
        assert bq.t_975(df) == pytest.approx(value, abs=1e-3), df


def _metrics(tmp_path: Path) -> Path:
    kept = {"polarity/kept_pos_count": 3, "polarity/kept_neg_count": 5, "polarity/kept_zero_count": 0}
    perf = {"perf/rollout_s": 5.0, "perf/train_s": 2.5, "perf/sync_s": 0.5}
    lines = [
        {"step": 0, "time": 1030.0, "eval/x/accuracy": 0.1, "eval/x/accuracy_stderr": 0.02},
        {"step": 1, "time": 1040.0, "perf/step_s": 8.0, **perf, "reward/accuracy": 0.25, **kept}
        | {"actor/response_tokens": 100, "rollout/response_len_mean": 12.5, "actor/lr": 1e-5, "actor/skipped": 0},
        # the update skipped (nothing trained) and the lr not finite (null); the evaluation after it took 26 s
        {"step": 2, "time": 1075.0, "perf/step_s": 9.0, **perf, "reward/accuracy": 0.5, **kept}
        | {"actor/response_tokens": 80, "rollout/response_len_mean": 10.0, "actor/lr": None, "actor/skipped": 1}
        | {"eval/x/accuracy_stderr": 0.03, "eval/x/accuracy": 0.3},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_product_steps_from_its_metrics_file(tmp_path: Path) -> None:
    run = bq.product_side(bq.read_metrics(_metrics(tmp_path)), start=1000.0, wall_s=90.0, seed=7)
    assert (run.side, run.seed, run.setup_s, run.first_eval_s) == ("lcot-mega train", 7, 30.0, None)
    assert run.evals == [(0, 0.1), (2, 0.3)] and (run.before, run.after) == (0.1, 0.3)
    assert run.points_per_min == pytest.approx(100 * 0.2 / 1.5)
    one, two = run.steps
    assert (one.step, one.elapsed_s, one.step_s, one.rollout_s, one.grade_s) == (1, 40.0, 8.0, 5.0, None)
    assert (one.train_s, one.sync_s, one.eval_s, one.accuracy) == (2.5, 0.5, 0.0, 0.25)
    assert (one.trained, one.response_tokens, one.response_len, one.lr) == (8, 100.0, 12.5, 1e-5)
    assert two.eval_s == pytest.approx(1075 - 1040 - 9)  # the gap between the lines less perf/step_s
    assert (two.trained, two.response_tokens, two.lr) == (0, 0.0, None)


def test_product_without_an_evaluation_before_training_starts_at_its_first_step(tmp_path: Path) -> None:
    records = bq.read_metrics(_metrics(tmp_path))[1:]
    run = bq.product_side(records, start=1000.0, wall_s=90.0, seed=1)
    assert run.setup_s == 32.0 and run.steps[0].eval_s == 0.0 and run.evals == [(2, 0.3)]


def _step(step: int, accuracy: float, grade_s: float | None, eval_s: float = 0.0) -> object:
    return bq.StepRecord(step, 10.0 * step, 4.0, 2.0, grade_s, 1.5, 0.5, eval_s, accuracy, 6, 60.0, 10.0, 1e-5)


def _runs() -> list:
    """Seed 1: ours +10 points in 2 min (5/min), plain +5 (2.5/min); seed 2: ours halted, no plain run;
    seed 3: ours +6 in 2 min (3/min), plain -2 (-1/min: ratio undefined)."""

    def side(i: int, seed: int, before: float, after: float, **kw) -> object:
        grade = None if i == 0 else 0.25
        steps = [_step(1, 0.2, grade), _step(2, 0.4, grade, eval_s=20.0 if i == 0 else 0.0)]
        return bq.SideRun(bq.SIDES[i], seed, 120.0, before, after, 30.0, steps=steps, **kw)

    plain = {"first_eval_s": 10.0, "final_eval_s": 20.0}  # its final evaluation is in no step's record
    return [
        side(0, 1, 0.1, 0.2, load=(1.04, 2.0)),
        side(1, 1, 0.1, 0.15, **plain),
        side(0, 2, 0.1, None, error="exit code 3"),
        side(0, 3, 0.2, 0.26),
        side(1, 3, 0.2, 0.18, **plain),
    ]


def test_report_has_each_seed_the_time_split_and_the_closing_line() -> None:
    report = bq.render_report(_runs(), load_config("configs/quickstart.yaml"))
    lines = report.splitlines()
    assert "| 1 | lcot-mega train | 120 | 2 | 10.0% | 20.0% | +5.00 | 1.0 / 2.0 | 2.00 |" in lines
    assert "| 1 | plain PyTorch loop | 120 | 2 | 10.0% | 15.0% | +2.50 | - |  |" in lines
    assert "| 2 | lcot-mega train | 120 | 2 | 10.0% | - | - | - | - (exit code 3) |" in lines
    assert "| 3 | lcot-mega train | 120 | 2 | 20.0% | 26.0% | +3.00 | - | undefined (plain gained nothing) |" in lines
    # wall 120 = 30 set-up + 2 x 4 s steps + 20 s evaluation + 62 other
    assert "| lcot-mega train | 120 | 30 | 2.0 | 4.00 | 2.00 | in rollout | 1.50 | 0.50 | 20 | 62 |" in lines
    assert "| plain PyTorch loop | 120 | 30 | 2.0 | 4.00 | 2.00 | 0.25 | 1.50 | 0.50 | 20 | 62 |" in lines
    assert "| 1 | 20.0% | 20.0% |" in lines and "| 2 | 40.0% | 40.0% |" in lines
    assert (
        "| lcot-mega train | 1e-05 | token-mean, PPO clip 0.2/0.2 | fp32 master, bf16 autocast | bfloat16 engine"
        " | 6.0 | 60 | 10.0 |" in lines
    )
    assert "Left out of the mean, the plain loop gaining nothing: seed 3." in lines
    assert "Not compared, a side failed: seed 2 (exit code 3)." in lines
    assert (
        "Ratio of the mean points per minute over the 2 compared seeds: 5.33." in lines
    )  # (5 + 3) / 2 over (2.5 - 1) / 2
    assert lines[-1] == "lcot-mega / plain, points per minute over 1 seeds: 2.00 (95% CI undefined: one seed)"


def test_section_replaces_its_old_text_or_is_appended_and_ends_with_the_closing_line() -> None:
    machine = {"CPU": "test cpu", "date (UTC)": "2026-12-06 10:00", "command": "python tools/bench_quickstart.py"}
    section = bq.render_section(
        machine, "report\n\nlcot-mega / plain, points per minute over 3 seeds: 1.50 (95% CI 0.26-2.74)"
    )
    assert section.startswith("## Learning per minute\n\n`tools/bench_quickstart.py`")
    assert "| CPU | test cpu |" in section and "Command: `python tools/bench_quickstart.py`" in section
    doc = "# Performance\n\nhead\n\n## A\n\na\n\n## Learning per minute\n\nold\ntext\n\n## B\n\nb\n"
    replaced = bq.replace_section(doc, section)
    assert replaced == doc.replace("## Learning per minute\n\nold\ntext", section)
    appended = bq.replace_section("# Performance\n\nhead\n\n## A\n\na\n", section)
    assert appended == f"# Performance\n\nhead\n\n## A\n\na\n\n{section}\n"
    assert appended.splitlines()[-1].startswith("lcot-mega / plain, points per minute over 3 seeds: 1.50")
    assert bq.replace_section(appended, section) == appended
    assert bq.replace_section("", section) == section + "\n"


def test_json_records_hold_both_sides_per_step(tmp_path: Path) -> None:
    path = tmp_path / "out" / "bench.json"
    bq.write_json(path, {"CPU": "test cpu"}, _runs()[:2])
    data = json.loads(path.read_text())
    assert [r["side"] for r in data["runs"]] == ["lcot-mega train", "plain PyTorch loop"]
    assert data["runs"][0]["points_per_min"] == pytest.approx(5.0)
    assert data["runs"][1]["steps"][1] | {"eval_s": 0.0, "grade_s": 0.25} == data["runs"][1]["steps"][1]
    assert data["runs"][1]["final_eval_s"] == 20.0
    assert not math.isnan(data["runs"][1]["steps"][0]["accuracy"])
