"""The command line: resolved config printing, clear config errors, and the component self-test."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lcot_mega import algo
from lcot_mega.algo.divergence import KL_KINDS
from lcot_mega.cli import main
from lcot_mega.config import AlgoConfig, Config, ConfigError, RewardConfig, load_config
from lcot_mega.reward.extract import FALLBACKS
from lcot_mega.trainer.preflight import check_before_training


def _choices(cls: type, name: str) -> set:
    return set(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"])


def test_config_choices_match_what_the_components_implement():
    # The config package may not import the components; this pins the two lists together.
    assert _choices(AlgoConfig, "polarity") == set(algo.POLARITY_MODES)
    assert _choices(AlgoConfig, "kl_kind") == set(KL_KINDS)
    assert _choices(RewardConfig, "fallbacks") == set(FALLBACKS)


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "configs/quickstart.yaml", "algo.polarity=negative"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["algo"]["polarity"] == "negative"
    assert printed["rollout"]["n_samples"] == 4  # from the recipe
    assert printed["algo"]["clip_low"] == Config().algo.clip_low  # from the defaults


def test_a_bad_config_exits_2_naming_the_key(capsys):
    assert main(["config", "configs/quickstart.yaml", "algo.polarty=negative"]) == 2
    assert "did you mean 'algo.polarity'?" in capsys.readouterr().err


def test_unregistered_names_are_rejected_before_any_work():
    with pytest.raises(ConfigError) as err:
        check_before_training(
            load_config(None, ["algo.advantage=grpoo", "algo.loss_agg=token_mean", "reward.fn=no.such:fn"])
        )
    text = str(err.value)
    assert "algo.advantage = 'grpoo' is not registered; did you mean 'grpo'?" in text
    assert "did you mean 'token-mean'?" in text
    assert "reward.fn = 'no.such:fn'" in text


def test_check_writes_the_config_and_self_tests_the_components(tmp_path, capsys):
    model = tmp_path / "model"  # the preflight looks for config.json; the self-test loads no model
    model.mkdir()
    (model / "config.json").write_text("{}")
    override = f"model.path={model}"
    assert main(["check", "configs/quickstart.yaml", override, "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "all components work" in out
    assert "1 overran and was killed" in out
    assert load_config(tmp_path / "config.yaml") == load_config("configs/quickstart.yaml", [override])


def test_grade_command_exit_code_follows_correctness(capsys):
    assert main(["grade", "so it is \\boxed{\\frac{1}{2}}", "0.5"]) == 0
    assert main(["grade", "so it is \\boxed{3}", "0.5"]) == 1


def test_fit_is_a_subcommand_with_the_fit_checks_own_options(capsys):
    from pathlib import Path

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")
    # one actor rank and its engine reserve 1 CPU (cpus_per_rank's default): 4 CPUs fit, half a CPU does not
    assert main(["fit", tiny, "cluster.mode=colocated", "--nodes", "1", "--cpus-per-node", "4"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["fit", tiny, "cluster.mode=colocated", "--nodes", "1", "--cpus-per-node", "0.5"]) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0 and "lcot-mega fit" in capsys.readouterr().out
