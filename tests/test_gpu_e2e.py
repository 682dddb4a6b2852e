"""tools/gpu_e2e.py: its training command validates here (CPU), its metric checks are worked by hand, and on a
GPU node the script itself runs 3 steps of Qwen2.5-0.5B-Instruct (skipped without CUDA and sglang)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.scripts import load_script
from helpers.tiny_models import make_tiny_hf

from lcot_mega.cli import main as cli_main
from lcot_mega.config import load_config
from lcot_mega.trainer.preflight import preflight_errors

ROOT = Path(__file__).resolve().parents[1]
gpu_e2e = load_script("tools/gpu_e2e.py")


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_the_training_command_validates_and_would_train_but_for_the_engine_package(tmp_path, engine, capsys):
    model = make_tiny_hf(tmp_path / "model", "qwen2")
    gpu_e2e.write_inputs(tmp_path / "work")
    cmd = gpu_e2e.build_command(tmp_path / "work", str(model), engine, steps=3)
    assert cmd[:4] == [sys.executable, "-m", "lcot_mega.cli", "train"] and cmd[-2] == "--run-dir"
    recipe, overrides = cmd[4], cmd[5:-2]
    assert cli_main(["config", recipe, *overrides]) == 0  # what `lcot-mega config` prints after validation
    assert "engine: " + engine in capsys.readouterr().out
    cfg = load_config(recipe, overrides)
    assert cfg.rollout.engine == engine and cfg.trainer.steps == 3 and cfg.actor.precision == "bf16"
    assert cfg.data.prompt_template.endswith("within \\boxed{}.") and cfg.data.train == [
        str(tmp_path / "work" / "prompts.jsonl")
    ]
    package_missing = f"rollout.engine = '{engine}' needs the {engine} package"
    assert [e for e in preflight_errors(cfg) if not e.startswith(package_missing)] == []
    assert len((tmp_path / "work" / "prompts.jsonl").read_text().splitlines()) == 10


def _record(step: int, gap: float = 0.01, kl: float = 0.0) -> dict:
    return {"step": step, "perf/step_s": 2.0, "rollout/logp_gap_mean": gap, "actor/ppo_kl": kl}


def test_check_metrics_passes_a_good_run_and_names_each_failure():
    good = [{"step": 0, "eval/x/accuracy": 0.5}] + [_record(s) for s in (1, 2, 3)]
    assert gpu_e2e.check_metrics(good, 3, max_gap=0.05, max_kl=1e-3) == []
    bad = [_record(1, gap=0.2, kl=-2e-3), _record(2)]
    assert gpu_e2e.check_metrics(bad, 3, max_gap=0.05, max_kl=1e-3) == [
        "steps completed [1, 2], expected 1..3",
        "step 1 rollout/logp_gap_mean = 0.2, expected < 0.05",
        "step 1 actor/ppo_kl = -0.002, expected |kl| < 0.001 (old policy == current)",
    ]
    (nan_gap, _) = gpu_e2e.check_metrics([_record(1, gap=math.nan, kl=math.nan)], 1, 0.05, 1e-3)
    assert nan_gap.startswith("step 1 rollout/logp_gap_mean = nan")


def test_the_table_has_one_row_per_trained_step():
    table = gpu_e2e.format_table([{"step": 0}] + [_record(s) for s in (1, 2)]).splitlines()
    assert table[0].startswith("step | logp_gap | ppo_kl") and len(table) == 4
    assert table[2].startswith("   1 | 0.01 | 0 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run")
def test_without_cuda_the_script_skips_and_exits_0():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_e2e.py")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "skipped: no CUDA device"


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None),
    reason="needs a CUDA GPU and the sglang package",
)
def test_three_steps_of_a_half_billion_model_with_te_and_sglang():
    """Not run on the CPU machines: needs a GPU, Transformer Engine and the model (downloaded from the hub)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_e2e.py"), "--engine", "sglang"], timeout=3600)
    assert proc.returncode == 0
