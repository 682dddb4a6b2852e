"""tools/bench_all.py's pure parts: data efficiency from constructed runs (worked by hand), the markdown, the
machine description. The benchmarks themselves are not run here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers.scripts import load_script

bench_all = load_script("tools/bench_all.py")


def _kept(pos: int, neg: int, zero: int) -> dict[str, float]:
    return {"polarity/kept_pos_count": pos, "polarity/kept_neg_count": neg, "polarity/kept_zero_count": zero}


def _run(tmp: Path, name: str, mode_yaml: str, records: list[dict]) -> Path:
    run = tmp / name
    run.mkdir()
    cfg = f"algo:\n  dynamic_sampling:\n    mode: {mode_yaml}\n    max_rounds: 1\nrollout:\n  n_samples: 4\n"
    (run / "config.yaml").write_text(cfg)
    lines = [json.dumps({"step": i, "time": 0.0, **r}) for i, r in enumerate(records)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    drop = [
        {"eval/x/accuracy": 0.1},  # an evaluation-only line: not a step
        {"rollout/groups_generated": 8, "rollout/groups_per_kept_group": 4, "rollout/zero_adv_frac": 0.75}
        | _kept(3, 5, 0)
        | {"actor/response_tokens": 100},
        {"rollout/groups_generated": 4, "rollout/groups_per_kept_group": 2, "rollout/zero_adv_frac": 0.5}
        | _kept(4, 2, 2)
        | {"actor/response_tokens": 80},
    ]
    off = [
        {"rollout/groups_generated": 4, "rollout/groups_per_kept_group": 1, "rollout/zero_adv_frac": 0.25}
        | _kept(6, 6, 4)
        | {"actor/response_tokens": 160},
        # nothing trained (null written for a non-finite value): counts toward generation only
        {"rollout/groups_generated": 4, "rollout/groups_per_kept_group": 1, "rollout/zero_adv_frac": 1.0}
        | _kept(0, 0, 0)
        | {"actor/skipped": 1, "actor/grad_norm": None},
    ]
    # `off` unquoted is YAML 1.1 false, as a hand-written config may have it; `drop` quoted as OmegaConf saves
    return _run(tmp_path, "a", "'drop'", drop), _run(tmp_path, "b", "off", off)


def test_efficiency_of_a_drop_run_matches_hand_worked_numbers(runs: tuple[Path, Path]) -> None:
    e = bench_all.run_efficiency(runs[0])
    assert (e.mode, e.steps) == ("drop", 2)
    # 12 groups x 4 samples = 48 generated; 3 + 5 + 4 + 2 = 14 informative kept
    assert e.samples_generated == 48 and e.informative_trained == 14
    assert e.rollouts_per_informative == pytest.approx(48 / 14)
    assert e.groups_per_kept_group == pytest.approx(12 / (8 / 4 + 4 / 2))  # 3.0
    assert e.zero_generated_share == pytest.approx((0.75 * 8 + 0.5 * 4) / 12)  # 2/3
    assert e.zero_token_share == pytest.approx((80 * 2 / 8) / 180)  # 20 of 180 tokens


def test_efficiency_reads_unquoted_off_and_skips_untrained_steps(runs: tuple[Path, Path]) -> None:
    e = bench_all.run_efficiency(runs[1])
    assert (e.mode, e.steps) == ("off", 2)
    assert e.rollouts_per_informative == pytest.approx(32 / 12)
    assert e.groups_per_kept_group == pytest.approx(1.0)
    assert e.zero_generated_share == pytest.approx((0.25 * 4 + 1.0 * 4) / 8)
    assert e.actor_tokens == 160 and e.zero_token_share == pytest.approx(0.25)  # 160 x 4 / 16


def test_rows_group_by_mode_and_pool_several_runs(runs: tuple[Path, Path]) -> None:
    rows = bench_all.efficiency_rows([runs[1], runs[0], runs[0]])
    assert [r.mode for r in rows] == ["drop", "drop", "drop", "off"]
    pooled = rows[2]
    assert pooled.name.startswith("all 2 `drop` runs")
    assert pooled.steps == 4 and pooled.rollouts_per_informative == pytest.approx(48 / 14)


def test_data_table_renders_the_worked_numbers(runs: tuple[Path, Path]) -> None:
    table = bench_all.render_data(bench_all.efficiency_rows(list(runs)))
    lines = table.splitlines()
    assert lines[0].startswith("| dynamic sampling | run |") and lines[1] == "|" + "---|" * 10
    assert lines[2] == f"| drop | {runs[0]} | 2 | 48 | 14 | 3.43 | 3.00 | 66.7% | 180 | 11.1% |"
    assert lines[3] == f"| off | {runs[1]} | 2 | 32 | 12 | 2.67 | 1.00 | 62.5% | 160 | 25.0% |"


def test_md_table_and_small_ratios() -> None:
    assert bench_all.md_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert [bench_all._ratio(x) for x in (1.234, 0.0456, math.nan, math.inf)] == ["1.23", "0.046", "-", "inf"]


def test_document_keeps_skipped_and_failed_sections_with_reason(runs: tuple[Path, Path]) -> None:
    specs = bench_all.bench_specs(quick=True, vllm=False)
    results = {"actor": {"error": "exit code 1"}}
    data = bench_all.efficiency_rows(list(runs))
    machine = {"CPU": "test cpu", "command": "python tools/bench_all.py --quick"}
    doc = bench_all.render(machine, {"actor", "scaling", "data"}, specs, results, data, [str(r) for r in runs])
    assert doc.count("\n## ") == 6 and doc.count("How to reproduce: `python tools/bench_") == 6
    assert "`python tools/bench_actor.py --model tiny" in doc and "failed (exit code 1)" in doc
    assert "Not measured in this run (`--skip sync`)." in doc and "Not measured in this run (`--skip rollout`)." in doc
    assert "| CPU | test cpu |" in doc and "| command | `python tools/bench_all.py --quick` |" in doc
    assert f"--runs {runs[0]} {runs[1]}`" in doc


def test_keep_carries_measured_sections_of_skipped_areas_only(runs: tuple[Path, Path]) -> None:
    specs = bench_all.bench_specs(quick=True, vllm=False)
    data = bench_all.efficiency_rows(list(runs))
    earlier = {"CPU": "old cpu", "date (UTC)": "2026-01-02 03:04", "command": "python tools/bench_all.py"}
    old = bench_all.render(earlier, {"data"}, specs, {}, data, [str(r) for r in runs])
    now = bench_all.render({"CPU": "new cpu"}, {"sync"}, specs, {"sync": {"error": "exit code 9"}}, None, [])
    doc = bench_all.keep_skipped(now, bench_all.kept_sections(old), bench_all._old_date(old))
    data_section = doc.split("## Data efficiency: dynamic sampling\n", 1)[1]
    assert data_section.startswith("\n_Kept from the earlier run of this file (2026-01-02 03:04; `--keep`)")
    assert f"| drop | {runs[0]} | 2 | 48 | 14 |" in data_section
    assert "| CPU | new cpu |" in doc and "old cpu" not in doc
    assert "failed (exit code 9)" in doc  # this run's failure is reported, never replaced
    assert "Not measured in this run (`--skip actor`)." in doc  # nothing measured earlier to keep
    assert doc.count("\n## ") == 6


def test_kept_sections_keep_the_blank_line_after_them_and_the_final_newline(runs: tuple[Path, Path]) -> None:
    specs = bench_all.bench_specs(quick=True, vllm=False)
    sync = {
        "meta": dict(model="tiny", params=1e6, bytes=4e6, bucket_mb=64, procs=2, threads=1, repeats=1),
        "rows": [dict(name="memcpy", seconds=0.001, gb_per_s=4.0, buckets=None, ratio=1.0)],
    }
    data = bench_all.efficiency_rows(list(runs))
    old = bench_all.render({}, {"sync", "data"}, specs, {"sync": sync}, data, [str(r) for r in runs])
    now = bench_all.render({}, set(), specs, {}, None, [])
    doc = bench_all.keep_skipped(now, bench_all.kept_sections(old), "2026-01-02 03:04")
    assert doc.count("_Kept from the earlier run") == 2 and "| memcpy | 0.0010 | 4.000 | - | 1.00 |" in doc
    assert doc.count("\n\n## ") == doc.count("\n## ") == 6  # the sync section (kept) ends as the others do
    assert doc.endswith("`\n") and not doc.endswith("\n\n")  # so does the data section, the file's last
    again = bench_all.keep_skipped(now, bench_all.kept_sections(doc), "2026-02-03 04:05")
    assert again == doc  # kept a second time: one note, still naming the run that measured it


def test_needed_runs_follow_the_areas() -> None:
    assert bench_all.needed_runs({"scaling", "sync"}, quick=False) == ["actor", "actor_tp", "sync"]
    assert bench_all.needed_runs({"actor", "scaling", "rollout"}, quick=True) == ["actor", "rollout"]
    assert bench_all.needed_runs({"memory", "sync", "data"}, quick=True) == ["sync", "memory"]
    assert bench_all.needed_runs({"data"}, quick=False) == []
    assert bench_all.bench_specs(quick=False, vllm=True)["rollout"] == ("bench_rollout.py", ["--vllm"])


def test_memory_runs_long_sequences_in_full_mode_and_tiny_ones_in_quick_mode() -> None:
    full = bench_all.reproduce(bench_all.bench_specs(quick=False, vllm=False)["memory"])
    assert (
        full == "python tools/bench_memory.py --model random135m --tokens 2048 8192 16384 32768 --skip-plain-above 8192"
    )
    quick = bench_all.reproduce(bench_all.bench_specs(quick=True, vllm=False)["memory"])
    assert quick == "python tools/bench_memory.py --model tiny --tokens 256 512"


def _memory_row(tokens: int, ours: tuple, plain: tuple | None) -> dict:
    """A bench_memory.py JSON row; `ours`/`plain` = (peak MiB, step s, oom), plain None when not run."""
    row = dict(
        tokens=tokens, peak_rss_mib=ours[0], step_s=ours[1], oom=ours[2], error="exit 1" if ours[0] is None else None
    )
    plain_ = plain or (None, None, False)
    return row | dict(
        plain_peak_rss_mib=plain_[0], plain_step_s=plain_[1], plain_oom=plain_[2], plain_skipped=plain is None
    )


MEMORY = {
    "meta": {
        "model": "random135m",
        "recipe": str(bench_all.REPO / "configs" / "long_cot_cpu.yaml"),
        "threads": 2,
        "settings": {"attention": "auto", "recompute": "full", "logits_chunk_tokens": 1024, "precision": "auto"},
        "limit_gib": 20.0,
        "prompt_tokens": 64,
    },
    "rows": [
        _memory_row(2048, (1500.4, 12.3, False), (3001.2, 6.0, False)),
        _memory_row(4096, (None, None, False), (4000.0, 9.0, False)),  # our step failed
        _memory_row(8192, (2600.0, 40.0, False), (20481.7, None, True)),  # plain killed at the limit
        _memory_row(16384, (4100.0, 150.0, False), None),
        _memory_row(32768, (20500.2, None, True), None),
    ],
}


def test_memory_table_shows_oom_not_run_and_the_ratio_only_where_both_ran() -> None:
    head, table = bench_all.render_memory(MEMORY).split("\n\n")
    assert head.startswith("Model random135m, one sequence of N tokens (64 prompt, the rest response), 2 threads")
    assert "actor settings from `configs/long_cot_cpu.yaml`: `actor.attention: auto`, `actor.recompute: full`," in head
    assert "`actor.logits_chunk_tokens: 1024`, `actor.precision: auto`." in head
    assert "OOM = resident memory passed 20 GiB" in head
    lines = table.splitlines()
    assert lines[0] == (
        "| tokens | our peak RSS MiB | our step s | plain transformers peak RSS MiB | plain step s"
        " | ratio (plain / our peak RSS) |"
    )
    assert lines[2:] == [
        "| 2,048 | 1,500 | 12.30 | 3,001 | 6.00 | 2.00 |",
        "| 4,096 | error | - | 4,000 | 9.00 | - |",
        "| 8,192 | 2,600 | 40.00 | OOM (killed at 20,482) | - | - |",
        "| 16,384 | 4,100 | 150.00 | not run | - | - |",
        "| 32,768 | OOM (killed at 20,500) | - | not run | - | - |",
    ]


def test_memory_section_in_the_document_and_not_measured_when_skipped() -> None:
    specs = bench_all.bench_specs(quick=False, vllm=False)
    doc = bench_all.render({}, {"memory"}, specs, {"memory": MEMORY}, None, [])
    section = doc.split("## Long sequences: one train step's memory\n", 1)[1].split("\n## ", 1)[0]
    assert "Ratio = plain peak RSS / our peak RSS where both ran" in section
    assert "| 2,048 | 1,500 | 12.30 | 3,001 | 6.00 | 2.00 |" in section
    how = "How to reproduce: `python tools/bench_memory.py --model random135m --tokens 2048 8192 16384 32768"
    assert how + " --skip-plain-above 8192`" in section
    skipped = bench_all.render({}, {"actor", "data"}, specs, {"actor": {"error": "exit code 1"}}, None, [])
    section = skipped.split("## Long sequences: one train step's memory\n", 1)[1].split("\n## ", 1)[0]
    assert "Not measured in this run (`--skip memory`)." in section and "| tokens |" not in section
    assert "--skip rollout --skip memory --runs RUN_DIR ...`" in skipped  # the data section's command runs no benchmark


def test_skipping_every_benchmark_writes_the_document_without_running_one(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "PERFORMANCE.md"
    skips = [arg for area in bench_all.AREAS for arg in ("--skip", area)]
    monkeypatch.setattr(sys, "argv", ["bench_all.py", *skips, "--out", str(out)])
    monkeypatch.setattr(bench_all, "run_bench", lambda *a: pytest.fail("a benchmark ran"))
    bench_all.main()
    doc = out.read_text()
    assert doc.count("\n## ") == 6 and doc.count("Not measured in this run (`--skip") == 6
    assert "Not measured in this run (`--skip memory`)." in doc


def test_rewrite_keeps_sections_other_tools_wrote_after_its_own(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "PERFORMANCE.md"
    foreign = "## Learning per minute\n\nWritten by bench_quickstart.\n\n| seed | ratio |\n|---|---|\n| 1 | 1.10 |"
    first = bench_all.render({"CPU": "old cpu"}, set(), bench_all.bench_specs(quick=True, vllm=False), {}, None, [])
    out.write_text(first.replace("## Weight sync", foreign + "\n\n## Weight sync"))  # anywhere in the file
    skips = [arg for area in bench_all.AREAS for arg in ("--skip", area)]
    monkeypatch.setattr(sys, "argv", ["bench_all.py", *skips, "--out", str(out)])
    bench_all.main()
    doc = out.read_text()
    assert doc.count("## Learning per minute") == 1 and doc.count("\n## ") == 7
    assert doc.endswith(foreign + "\n")  # after the tool's own sections, as it was, one final newline
    assert "| CPU | old cpu |" not in doc  # the tool's own sections are rewritten
    assert bench_all.keep_foreign(doc, doc) == doc  # kept once: a second rewrite changes nothing
    assert bench_all.keep_foreign(first, "") == first


def test_performance_doc_has_every_section_render_writes_in_order() -> None:
    doc = (bench_all.REPO / "docs" / "PERFORMANCE.md").read_text()
    rendered = bench_all.render({}, set(), bench_all.bench_specs(quick=False, vllm=False), {}, None, [])

    def titles(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("## ")]

    ours = titles(rendered)
    assert titles(doc)[: len(ours)] == ours and "## Long sequences: one train step's memory" in titles(doc)
    # other tools' sections come after (bench_quickstart.py's, bench_async.py's table written by hand)
    assert set(titles(doc)[len(ours) :]) <= {
        "## Learning per minute",
        "## Asynchronous RL: what overlap buys on 2 shared cores",
    }


def test_machine_description_has_every_field() -> None:
    machine = bench_all.describe_machine("python tools/bench_all.py")
    for key in ("CPU", "cores usable (sched_getaffinity) / online", "RAM total / available at start", "torch"):
        assert key in machine
    assert all(isinstance(v, str) and v.strip() for v in machine.values())
    assert "nan" not in machine["RAM total / available at start"]
    assert machine["command"] == "python tools/bench_all.py"
