"""examples/study/figures.py: the cold start vs zero-RL chart, from the same run files as the tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.scripts import ROOT, load_script

SCRIPT = ROOT / "examples" / "study" / "figures.py"


@pytest.fixture(scope="module")
def figures():
    return load_script("examples/study/figures.py", "study_figures")


def _evaluated(path: Path, accs: dict[str, float]) -> None:
    path.mkdir(parents=True)
    benches = {name: {"avg@k": acc, "greedy": {"accuracy": acc}} for name, acc in accs.items()}
    (path / "summary.json").write_text(json.dumps({"benchmarks": benches}))


def _runs(root: Path) -> None:
    """Two cold-start seeds and one zero-RL seed of "negative", one of "both", and each starting model."""
    for experiment, name, acc in (
        ("cold_start", "negative-seed1", 0.5),
        ("cold_start", "negative-seed2", 0.4),
        ("zero_rl_long", "both-seed1", 0.3),
    ):
        run = root / experiment / name
        _evaluated(run / "eval-final", {"chain_sum": acc, "products": acc / 2})
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "actor/entropy": 0.1}) + "\n")
    _evaluated(root / "cold-start-eval", {"chain_sum": 0.4, "products": 0.2})
    _evaluated(root / "base-eval-long", {"chain_sum": 0.1, "products": 0.1})


def test_half_width_is_the_t_interval_of_the_mean_by_hand(figures):
    half_width = figures._tables().half_width
    assert half_width([10.0, 0.0]) == pytest.approx(12.706 * 7.0711 / 2**0.5, rel=1e-4)  # 63.5
    assert half_width([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3**0.5, rel=1e-6)  # sd 1
    assert half_width([5.0]) == 0.0


def test_settings_figure_is_drawn_from_the_runs_as_a_plain_script(figures, tmp_path):
    _runs(tmp_path)
    out = tmp_path / "fig" / "settings.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "settings", str(tmp_path), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    default = figures.main(["settings", str(tmp_path)])  # RUNS_ROOT/plots/settings.png
    assert default == 0 and (tmp_path / "plots" / "settings.png").is_file()


def test_settings_figure_without_runs_is_a_clear_error(figures, tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluated cold-start or zero-RL runs"):
        figures.settings_figure(tmp_path, tmp_path / "x.png")
    assert figures.main(["tables"]) == 2
