"""Every recipe under configs/ loads, would train but for this machine, states only non-defaults, and the study
recipes hold the study's values (a wrong recipe fails here, not hours into a GPU run)."""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from lcot_mega.cli import build_parser
from lcot_mega.config import Config, load_config
from lcot_mega.sft.driver import sft_config_errors
from lcot_mega.trainer.preflight import preflight_errors

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(ROOT.glob("configs/**/*.yaml"))
STUDY = ROOT / "configs" / "study"
STUDY_PROMPT = "{problem} Let's think step by step and output the final answer within \\boxed{}."


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _machine_errors(cfg: Config) -> list[str]:
    """The errors of `preflight_errors` that come from running the recipe here rather than on its GPU node:
    a hub id (or a model not downloaded yet) as model.path, and a served rollout engine."""
    expected = []
    if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        expected.append(f"model.path = {cfg.model.path!r} is not a Hugging Face model directory (no config.json)")
    if cfg.rollout.engine != "embedded":
        expected.append(f"rollout.engine = {cfg.rollout.engine!r}: the driver runs the embedded engine so far")
    return expected


def _is_machine_error(error: str, expected: list[str]) -> bool:
    return any(error == e or (e.startswith("rollout.engine") and error.startswith(e)) for e in expected)


def test_the_study_recipes_exist():
    names = {p.name for p in STUDY.glob("*.yaml")}
    assert {
        "cold_start_both.yaml",
        "cold_start_positive.yaml",
        "cold_start_negative.yaml",
        "relative_length.yaml",
        "dapo_zero_rl.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_loads_and_has_no_training_errors_but_those_of_this_machine(path):
    cfg = load_config(path)
    expected = _machine_errors(cfg)
    if cfg.sft.train:  # an `lcot-mega sft` recipe; its data files are generated (docs/SFT.md)
        expected += [f"sft data file {f!r} does not exist" for f in [*cfg.sft.train, *cfg.sft.eval]]
        errors = sft_config_errors(cfg)
    else:
        errors = preflight_errors(cfg)
    assert [e for e in errors if not _is_machine_error(e, expected)] == []


def _stated_defaults(data: dict[str, Any], cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of `data` (a raw recipe section) whose value equals the default of `cls`'s field."""
    found = []
    defaults = cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            continue  # unknown keys are load_config's business
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            found += _stated_defaults(value, type(default), f"{prefix}{key}.")
            if not value:
                found.append(f"{prefix}{key} (an empty section)")
        elif type(value) is type(default) or (isinstance(default, float) and isinstance(value, int)):
            if value == default:
                found.append(f"{prefix}{key} = {value!r}")
        elif value is None and default is None:
            found.append(f"{prefix}{key} = None")
    return found


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_states_only_values_that_differ_from_the_defaults(path):
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert _stated_defaults(raw, Config) == [], "STYLE.md rule 9: a recipe holds only what differs from the defaults"


def test_stated_defaults_finds_a_repeated_default_at_any_depth():
    raw = {
        "algo": {"kl_coef": 0.001, "clip_low": 0.2, "dynamic_sampling": {"max_rounds": 4}},
        "actor": {"lr": 1.0e-6, "tensor_parallel": 1},
        "rollout": {"seed": None, "stop": []},
        "eval": {},
    }
    assert _stated_defaults(raw, Config) == [
        "algo.clip_low = 0.2",
        "algo.dynamic_sampling.max_rounds = 4",
        "actor.lr = 1e-06",
        "actor.tensor_parallel = 1",
        "rollout.seed = None",
        "rollout.stop = []",
        "eval (an empty section)",
    ]


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


COLD_START = {
    "model.path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "model.dtype": "bfloat16",
    "data.train": ["data/deepscaler.jsonl"],
    "data.prompt_template": STUDY_PROMPT,
    "data.apply_chat_template": True,
    "data.max_prompt_len": 1024,
    "rollout.engine": "sglang",
    "rollout.n_samples": 8,
    "rollout.temperature": 0.6,
    "rollout.top_p": 1.0,
    "rollout.max_new_tokens": 8192,
    "reward.fn": "math",
    "reward.require_think_close": True,
    "reward.fallbacks": [],
    "algo.advantage": "grpo",
    "algo.reserve_ratio": 0.0,
    "algo.reserve_min": 0,
    "algo.kl_coef": 0.001,
    "algo.kl_kind": "low_var_kl",
    "algo.entropy_coef": 0.001,
    "algo.clip_low": 0.2,
    "algo.clip_high": 0.2,
    "algo.loss_agg": "token-mean",
    "algo.dynamic_sampling.mode": "off",
    "actor.lr": 1e-6,
    "actor.lr_schedule": "constant",
    "actor.warmup_steps": 0,
    "actor.grad_clip": 1.0,
    "actor.updates_per_batch": 1,
    "actor.precision": "bf16",
    "trainer.prompts_per_step": 64,
    "trainer.save_every": 10,
    "trainer.eval_every": 10,
    "eval.n_samples": 64,
    "eval.temperature": 0.6,
    "cluster.mode": "colocated",
    "cluster.actor_ranks": 8,
    "cluster.gpus_per_rank": 1.0,
}

STUDY_VALUES = {
    "cold_start_both.yaml": COLD_START | {"algo.polarity": "both", "trainer.run_dir": "runs/cold_start_both"},
    "cold_start_positive.yaml": COLD_START
    | {"algo.polarity": "positive", "trainer.run_dir": "runs/cold_start_positive"},
    "cold_start_negative.yaml": COLD_START
    | {"algo.polarity": "negative", "trainer.run_dir": "runs/cold_start_negative"},
    "relative_length.yaml": COLD_START
    | {
        "model.path": "agentica-org/DeepScaleR-1.5B-Preview",
        "algo.polarity": "both",
        "algo.kl_coef": 0.0,
        "algo.entropy_coef": 0.0,
        "reward.relative_length.enabled": True,
        "reward.relative_length.corr_ratio": 0.75,
        "reward.relative_length.length_base": 500.0,
        "reward.relative_length.lower": -0.5,
        "reward.relative_length.upper": 1.0,
        "trainer.run_dir": "runs/relative_length",
    },
    "dapo_zero_rl.yaml": {
        "model.dtype": "bfloat16",
        "data.train": ["data/dapo17k.jsonl"],
        "data.max_prompt_len": 2048,
        "rollout.engine": "sglang",
        "rollout.n_samples": 16,
        "rollout.temperature": 1.0,
        "rollout.top_p": 1.0,
        "rollout.max_new_tokens": 20480,
        "reward.require_think_close": False,
        "reward.fallbacks": ["answer_is"],
        "reward.overlong.enabled": True,
        "reward.overlong.buffer_len": 4096,
        "reward.overlong.penalty_factor": 1.0,
        "algo.advantage": "grpo",
        "algo.polarity": "both",
        "algo.clip_low": 0.2,
        "algo.clip_high": 0.28,
        "algo.loss_agg": "token-mean",
        "algo.kl_coef": 0.0,
        "algo.entropy_coef": 0.0,
        "algo.dynamic_sampling.mode": "drop",
        "algo.dynamic_sampling.max_rounds": 10,
        "algo.dynamic_sampling.oversample": 3.0,
        "actor.lr": 1e-6,
        "actor.weight_decay": 0.1,
        "actor.warmup_steps": 160,
        "actor.updates_per_batch": 16,
        "actor.grad_clip": 1.0,
        "actor.precision": "bf16",
        "trainer.prompts_per_step": 512,
        "eval.temperature": 1.0,
        "cluster.mode": "colocated",
        "cluster.actor_ranks": 8,
    },
}


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) and not isinstance(actual, bool):
        return actual == pytest.approx(expected)
    return type(actual) is type(expected) and actual == expected


@pytest.mark.parametrize("name", sorted(STUDY_VALUES))
def test_study_recipe_holds_the_study_values(name):
    cfg = load_config(STUDY / name)
    wrong = {k: (_get(cfg, k), v) for k, v in STUDY_VALUES[name].items() if not _same(_get(cfg, k), v)}
    assert wrong == {}, "key: (recipe, study)"


def test_polarity_runs_differ_only_in_polarity_and_run_dir():
    def flat(name: str) -> dict[str, Any]:
        raw = OmegaConf.to_container(OmegaConf.load(STUDY / name))
        return {k: v for k, v in _flatten(raw).items() if k not in ("algo.polarity", "trainer.run_dir")}

    assert flat("cold_start_positive.yaml") == flat("cold_start_both.yaml") == flat("cold_start_negative.yaml")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_dapo_prompt_puts_back_the_wrapper_prepare_data_strips():
    tree = ast.parse((ROOT / "tools" / "prepare_data.py").read_text())
    consts = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        if node.targets[0].id in ("DAPO_PREFIX", "DAPO_SUFFIX")
    }
    template = load_config(STUDY / "dapo_zero_rl.yaml").data.prompt_template
    assert template == consts["DAPO_PREFIX"] + "\n\n{problem}\n\n" + consts["DAPO_SUFFIX"]


def _documented_commands(path: Path) -> list[str]:
    """`lcot-mega ...` command lines in a recipe's header comment (backslash continuations joined)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = re.sub(r"\\\s*\n\s*", " ", "\n".join(header))
    return [m.group(0) for m in re.finditer(r"lcot-mega train [^\n]*", text)]


@pytest.mark.parametrize("name", ["cold_start_both.yaml", "cold_start_positive.yaml", "cold_start_negative.yaml"])
def test_documented_stage_commands_parse_and_load(name):
    commands = _documented_commands(STUDY / name)
    assert len(commands) == 3, commands
    lengths = []
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.config == f"configs/study/{name}"
        cfg = load_config(ROOT / args.config, args.overrides)
        if cfg.rollout.max_new_tokens > 8192:
            assert args.resume is True
            assert cfg.rollout.n_samples == 16  # the study's 16 samples at the longer contexts
        lengths.append(cfg.rollout.max_new_tokens)
    assert lengths == [8192, 16384, 24576]
