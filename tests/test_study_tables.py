"""examples/study/tables.py: the reproduction tables come from the runs' own files; numbers checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.scripts import load_script


@pytest.fixture(scope="module")
def tables():
    return load_script("examples/study/tables.py", "study_tables")


def _run(root: Path, name: str, acc: float, entropy: list[float], zero: float, experiment: str = "polarity") -> None:
    run = root / experiment / name
    (run / "eval-final").mkdir(parents=True)
    lines = [
        {"step": s + 1, "actor/entropy": e, "adv/zero_frac_samples": zero, "perf/step_s": 30.0, "guard/action": "ok"}
        for s, e in enumerate(entropy)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9, "torn')
    bench = {"avg@k": acc, "pass@k": {"1": acc, "2": min(1.0, 2 * acc)}, "greedy": {"accuracy": acc}}
    bench["response_len_mean"] = 20.0
    (run / "eval-final" / "summary.json").write_text(json.dumps({"benchmarks": {"chain_sum": bench}}))


def test_mean_and_t_interval_across_seeds_by_hand(tables):
    assert tables.mean_ci([1.0, 3.0]) == "2 ± 12.7"  # sd sqrt(2), 12.706 * sqrt(2) / sqrt(2) = 12.7
    assert tables.mean_ci([0.5]) == "0.5" and tables.mean_ci([]) == "-"
    assert tables.pct_ci([0.1, 0.2, 0.3]) == "20.0 ± 24.8"  # sd 10, 4.303 * 10 / sqrt(3) = 24.8


def test_polarity_table_averages_each_mode_over_its_seeds(tables, tmp_path):
    _run(tmp_path, "both-seed1", 0.2, [1.0] * 6, 0.5)
    _run(tmp_path, "both-seed2", 0.4, [2.0] * 6, 0.5)
    _run(tmp_path, "negative-seed1", 0.3, [1.0, 1.0, 1.0, 1.0, 1.0, 3.0], 0.25)
    text = tables.polarity(tmp_path)
    both = next(line for line in text.splitlines() if line.startswith("| both |"))
    assert both.startswith("| both | 1,2 | 30.0 ± 127.1 |")  # mean 30, sd 14.1 -> 12.706 * 10 = 127
    neg = next(line for line in text.splitlines() if line.startswith("| negative |"))
    assert "| 30.0 | 60.0 | 30.0 | 1 | 1.4 |" in neg  # avg, pass@2, greedy; entropy first 5 = 1, last 5 = 7/5
    assert "pass@k on chain_sum" in text


def test_polarity_table_has_the_untrained_model_as_a_reference_row(tables, tmp_path):
    _run(tmp_path, "both-seed1", 0.2, [1.0] * 6, 0.5)
    base = {"avg@k": 0.1, "pass@k": {"1": 0.1, "2": 0.15}, "greedy": {"accuracy": 0.125}}
    (tmp_path / "base-eval").mkdir()
    (tmp_path / "base-eval" / "summary.json").write_text(json.dumps({"benchmarks": {"chain_sum": base}}))
    lines = tables.polarity(tmp_path).splitlines()
    assert "| untrained model | - | 10.0 | 15.0 | 12.5 | - | - |" in lines
    assert "| untrained model | 10.0 | 15.0 |" in lines  # the pass@k table: pass@1, pass@2


def test_export_copies_what_the_tables_read_and_rebuilds_the_same_tables(tables, tmp_path):
    root, dest = tmp_path / "runs", tmp_path / "copy"
    _run(root, "both-seed1", 0.2, [1.0] * 6, 0.5)
    _run(root, "negative-seed1", 0.3, [2.0] * 6, 0.25)
    both = root / "polarity" / "both-seed1"
    (both / "checkpoints" / "step_6").mkdir(parents=True)
    (both / "checkpoints" / "step_6" / "weights.bin").write_bytes(b"x" * 100)
    (both / "eval-final" / "samples.jsonl").write_text("{}\n")
    (root / "length").mkdir()
    (root / "length" / "off-seed1").symlink_to("../polarity/both-seed1")
    tables.export(root, dest)
    assert (dest / "polarity" / "both-seed1" / "metrics.jsonl").read_bytes() == (both / "metrics.jsonl").read_bytes()
    assert (dest / "polarity" / "both-seed1" / "eval-final" / "summary.json").is_file()
    assert not (dest / "polarity" / "both-seed1" / "checkpoints").exists()
    assert not (dest / "polarity" / "both-seed1" / "eval-final" / "samples.jsonl").exists()
    assert (dest / "length" / "off-seed1").readlink() == Path("../polarity/both-seed1")
    assert tables.polarity(dest) == tables.polarity(root)
    assert tables.length(dest) == tables.length(root)


def test_paired_table_differences_each_mode_from_both_at_the_same_seed(tables, tmp_path):
    _run(tmp_path, "both-seed1", 0.2, [1.0] * 6, 0.5)
    _run(tmp_path, "both-seed2", 0.4, [1.0] * 6, 0.5)
    _run(tmp_path, "negative-seed1", 0.3, [1.0] * 6, 0.5)
    _run(tmp_path, "negative-seed2", 0.5, [1.0] * 6, 0.5)
    _run(tmp_path, "positive-seed3", 0.5, [1.0] * 6, 0.5)  # no both run at seed 3: nothing to pair with
    text = tables.polarity(tmp_path)
    assert "Paired by seed, each mode minus both" in text
    # avg: +10, +10 points -> 10.0 with no spread; pass@2 (2 * acc): +20, +20
    assert "| negative | 1,2 | 10.0 ± 0.0 | 20.0 ± 0.0 |" in text
    assert "| positive |" not in text.split("Paired by seed")[1]


def test_cold_start_table_reads_its_own_runs_against_the_cold_start_model(tables, tmp_path, capsys):
    _run(tmp_path, "negative-seed1", 0.5, [1.0] * 6, 0.5, experiment="cold_start")
    _run(tmp_path, "both-seed1", 0.2, [1.0] * 6, 0.5)  # a zero-RL polarity run: not in this table
    base = {"avg@k": 0.3, "pass@k": {"1": 0.3, "2": 0.4}, "greedy": {"accuracy": 0.44}}
    (tmp_path / "cold-start-eval").mkdir()
    (tmp_path / "cold-start-eval" / "summary.json").write_text(json.dumps({"benchmarks": {"chain_sum": base}}))
    assert tables.main(["cold_start", str(tmp_path)]) == 0
    text = (tmp_path / "tables" / "cold_start.md").read_text()
    assert "| negative | 1 | 50.0 | 100.0 | 50.0 |" in text and "| both |" not in text
    assert "| untrained model | - | 30.0 | 40.0 | 44.0 | - | - |" in text
    assert "no finished runs under" in tables.polarity(tmp_path, experiment="zero_rl_long", base_eval="base-eval-long")


def test_settings_table_gives_each_mode_its_gain_over_its_own_starting_model(tables, tmp_path):
    _run(tmp_path, "negative-seed1", 0.50, [0.1] * 5, 0.5, experiment="cold_start")
    _run(tmp_path, "negative-seed2", 0.40, [0.3] * 5, 0.5, experiment="cold_start")
    _run(tmp_path, "negative-seed1", 0.10, [1.0] * 5, 0.5, experiment="zero_rl_long")
    training = tmp_path / "cold_start" / "negative-seed3"  # still training: no evaluation, counted nowhere
    training.mkdir()
    (training / "metrics.jsonl").write_text(json.dumps({"step": 1, "actor/entropy": 9.0}) + "\n")
    for base_eval, acc in (("cold-start-eval", 0.40), ("base-eval-long", 0.20)):
        (tmp_path / base_eval).mkdir()
        start = {"avg@k": acc, "greedy": {"accuracy": acc / 2}}
        (tmp_path / base_eval / "summary.json").write_text(json.dumps({"benchmarks": {"chain_sum": start}}))
    lines = tables.settings(tmp_path).splitlines()
    # cold start: gains +10 and 0 points (mean 5, sd 7.07, 12.706 * 7.07 / sqrt 2 = 63.5); greedy 50 and 40
    # against 20: +30 and +20; entropy 0.1 and 0.3 -> 0.2 ± 1.27
    assert "| cold start | negative | 1,2 | 5.0 ± 63.5 | 25.0 ± 63.5 | 20 ± 0 | 0.2 ± 1.27 |" in lines
    assert "| zero-RL | negative | 1 | -10.0 | 0.0 | 20 | 1 |" in lines  # 10 - 20 avg; 10 - 10 greedy
    gains = tables.settings_gains(tmp_path)  # what the figure draws: the same gains, per seed, as fractions
    assert gains["cold start"]["negative"]["chain_sum"] == pytest.approx([0.10, 0.0])
    assert gains["zero-RL"] == {"negative": {"chain_sum": pytest.approx([-0.10])}}


def test_polarity_table_leaves_out_runs_still_training(tables, tmp_path):
    _run(tmp_path, "both-seed1", 0.2, [1.0] * 6, 0.5, experiment="zero_rl_long")
    training = tmp_path / "zero_rl_long" / "both-seed2"  # no evaluation yet: not a seed, not in the entropy
    training.mkdir()
    (training / "metrics.jsonl").write_text(json.dumps({"step": 1, "actor/entropy": 9.0}) + "\n")
    text = tables.polarity(tmp_path, experiment="zero_rl_long", base_eval="base-eval-long")
    assert "| both | 1 | 20.0 | 40.0 | 20.0 | 1 | 1 |" in text.splitlines()


def _injected(root: Path, seed: int, acc: float, first: float, per_step: list[tuple[int, int, float, float]]) -> None:
    """An inject run of zero-RL: per step (groups, replaced, token share, advantage share) and the final avg@k."""
    _run(root, f"inject-seed{seed}", acc, [1.0] * len(per_step), 0.5, experiment="zero_rl_long")
    keys = ("injection/groups", "injection/replaced", "injection/token_share", "injection/adv_share")
    lines = [
        {"step": s + 1, "reward/accuracy": first, **dict(zip(keys, v, strict=True))} for s, v in enumerate(per_step)
    ]
    (root / "zero_rl_long" / f"inject-seed{seed}" / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines)
    )


def test_injection_table_pairs_each_inject_run_with_both_at_its_seed(tables, tmp_path):
    for seed, acc, first in ((1, 0.2, 0.125), (2, 0.4, 0.25)):
        _run(tmp_path, f"both-seed{seed}", acc, [1.0] * 2, 0.5, experiment="zero_rl_long")
        metrics = tmp_path / "zero_rl_long" / f"both-seed{seed}" / "metrics.jsonl"
        metrics.write_text("".join(json.dumps({"step": s, "reward/accuracy": first * s}) + "\n" for s in (1, 2)))
    _injected(tmp_path, 1, 0.3, 0.125, [(2, 2, 0.5, 0.25), (1, 1, 0.3, 0.15)])
    _injected(tmp_path, 2, 0.4, 0.25, [(0, 0, 0.0, 0.0), (3, 3, 0.6, 0.45)])
    lines = tables.injection(tmp_path).splitlines()
    # seed 1: 3 groups and samples over 2 steps, token share (50 + 30) / 2 = 40%, advantage share 20%; rollout
    # accuracy 12.5 against (12.5 + 25) / 2 = 18.75 for both; avg@k 30 - 20 = +10 points; seed 2: 0 points; mean 5,
    # sd 7.07 -> 12.706 * 7.07 / sqrt 2 = 63.5
    assert "| zero-RL | 1 | 3 | 3 | 0 | 40.0 | 20.0 | 12.5 / 18.8 | 10.0 |" in lines
    assert "| zero-RL | 2 | 3 | 3 | 0 | 30.0 | 22.5 | 25.0 / 37.5 | 0.0 |" in lines
    assert "| zero-RL | mean | - | - | - | - | - | - | 5.0 ± 63.5 |" in lines
    assert "cold start" not in "".join(lines[2:])
    assert "no evaluated inject-seed* runs" in tables.injection(tmp_path / "none")


def _probed(out: Path, clean: float, probed: float) -> None:
    out.mkdir(parents=True)
    block = {"clean_avg@k": clean, "avg@k": probed, "drop": clean - probed}
    (out / "summary.json").write_text(json.dumps({"benchmarks": {"chain_sum": {"avg@k": clean, "robustness": block}}}))


def test_robustness_table_gives_each_mode_its_probe_drop_across_seeds_and_the_starting_models(tables, tmp_path):
    _run(tmp_path, "negative-seed1", 0.5, [1.0] * 2, 0.5, experiment="cold_start")
    _run(tmp_path, "negative-seed2", 0.5, [1.0] * 2, 0.5, experiment="cold_start")
    _run(tmp_path, "both-seed1", 0.5, [1.0] * 2, 0.5, experiment="cold_start")  # not probed: no row
    _probed(tmp_path / "cold_start" / "negative-seed1" / "eval-robust", 0.5, 0.4)
    _probed(tmp_path / "cold_start" / "negative-seed2" / "eval-robust", 0.3, 0.3)
    _probed(tmp_path / "cold-start-eval-robust", 0.4, 0.1)
    lines = tables.robustness(tmp_path).splitlines()
    # drops 10 and 0 points: mean 5, 12.706 * 7.07 / sqrt 2 = 63.5; clean 40 ± 127.1 (sd 14.14)
    assert "| cold start | negative | 1,2 | 40.0 ± 127.1 | 35.0 ± 63.5 | 5.0 ± 63.5 |" in lines
    assert "| cold start | starting model | - | 40.0 | 10.0 | 30.0 |" in lines
    assert not [x for x in lines if "| both |" in x or "zero-RL" in x]
    assert "no robustness evaluations" in tables.robustness(tmp_path / "none")


def test_evidence_table_gives_each_comparison_its_interval_and_where_it_lies(tables, tmp_path):
    for seed, neg, both in ((1, 0.5, 0.3), (2, 0.4, 0.5)):
        _run(tmp_path, f"negative-seed{seed}", neg, [1.0] * 2, 0.5, experiment="cold_start")
        _run(tmp_path, f"both-seed{seed}", both, [1.0] * 2, 0.5, experiment="cold_start")
    for seed, pos, neg in ((1, 0.30, 0.00), (2, 0.32, 0.02), (3, 0.34, 0.04)):
        _run(tmp_path, f"positive-seed{seed}", pos, [1.0] * 2, 0.5, experiment="zero_rl_long")
        _run(tmp_path, f"negative-seed{seed}", neg, [1.0] * 2, 0.5, experiment="zero_rl_long")
    for base_eval, acc in (("cold-start-eval", 0.4), ("base-eval-long", 0.1)):
        (tmp_path / base_eval).mkdir()
        (tmp_path / base_eval / "summary.json").write_text(json.dumps({"benchmarks": {"chain_sum": {"avg@k": acc}}}))
    _probed(tmp_path / "zero_rl_long" / "negative-seed1" / "eval-robust", 0.5, 0.45)
    _probed(tmp_path / "zero_rl_long" / "positive-seed1" / "eval-robust", 0.5, 0.3)
    lines = tables.evidence(tmp_path).splitlines()
    row = {(x.split(" | ")[0][2:], x.split(" | ")[1]): x for x in lines[2:]}
    # cold start negative minus its start: +10 and 0 points, mean 5, sd 7.07 -> 12.706 * 7.07 / sqrt 2 = 63.5
    assert row["cold start", "negative minus the starting model"].endswith("| 1,2 | 5.0 ± 63.5 | - | spans 0 |")
    # negative minus both at the same seed: +20 and -10, sd 21.2 -> 190.6
    assert row["cold start", "negative minus both, same seed"].endswith("| 1,2 | 5.0 ± 190.6 | - | spans 0 |")
    # zero-RL gains 20, 22, 24 (sd 2, 4.303 * 2 / sqrt 3 = 5.0) and -10, -8, -6; paired 30 points at every seed
    assert row["zero-RL", "positive minus the starting model"].endswith("| 1,2,3 | 22.0 ± 5.0 | - | above 0 |")
    assert row["zero-RL", "negative minus the starting model"].endswith("| 1,2,3 | -8.0 ± 5.0 | - | below 0 |")
    assert row["zero-RL", "positive minus negative, same seed"].endswith("| 1,2,3 | 30.0 ± 0.0 | - | above 0 |")
    # probe drops 5 (negative) and 20 (positive) points at seed 1: one seed, no interval
    assert row["zero-RL", "probe drop, negative minus positive, same seed"].endswith("| 1 | -15.0 | - | one seed |")
    assert ("cold start", "negative minus positive, same seed") not in row  # no positive run in cold start
    assert not [k for k in row if k[0].startswith("zero-RL, 48")]  # no refill runs
    assert "no evaluated runs" in tables.evidence(tmp_path / "none")
