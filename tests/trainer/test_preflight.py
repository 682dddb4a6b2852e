"""The preflight: one list of config errors that `lcot-mega check`, `lcot-mega train` and `driver.train` all refuse
with, before any work; a Config built in Python is held to the loader's checks; unwired options are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lcot_mega.cli import main
from lcot_mega.cluster.fit import check_fit, uniform_nodes
from lcot_mega.config import ClusterConfig, Config, ConfigError, ModelConfig, TrainerConfig, load_config
from lcot_mega.trainer.preflight import check_before_training, preflight_errors

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
INJECTION = "algo.injection.enabled = true needs offline solutions, and no data.train entry is a prompt file"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A directory the preflight takes for a model (it only looks for config.json; nothing here loads it)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def _cli_errors(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit status and the `  - ` lines of the ConfigError the command printed."""
    status = main(list(argv))
    err = capsys.readouterr().err
    return status, [line[4:] for line in err.splitlines() if line.startswith("  - ")]


def test_check_and_train_refuse_a_bad_config_with_the_same_error_list(tmp_path, capsys):
    bad = [f"model.path={tmp_path / 'none'}", "algo.advantage=grpoo", "rollout.temperature=0"]
    bad += ["algo.injection.enabled=true", "data.prompt_template=Solve."]
    expected = preflight_errors(load_config(TINY, bad))
    assert len(expected) == 5, expected
    check = _cli_errors(capsys, "check", TINY, *bad, "--run-dir", str(tmp_path / "check"))
    train = _cli_errors(capsys, "train", TINY, *bad, "--run-dir", str(tmp_path / "train"))
    assert check == train == (2, expected)
    assert not (tmp_path / "check").exists() and not (tmp_path / "train").exists()  # nothing written


def test_injection_without_a_prompt_file_is_refused_by_check_and_train(tmp_path, model_dir, capsys):
    args = (TINY, f"model.path={model_dir}", "algo.injection.enabled=true")  # tiny_cpu trains on reasoning-gym
    for command in ("check", "train"):
        status, errors = _cli_errors(capsys, command, *args, "--run-dir", str(tmp_path / command))
        assert status == 2 and len(errors) == 1 and errors[0].startswith(INJECTION), errors
        assert "algo.injection.enabled=false" in errors[0]
    with_file = load_config(TINY, [*args[1:], f"data.train=[{tmp_path / 'solutions.jsonl'}]"])
    assert preflight_errors(with_file) == []  # whether the file carries solutions is seen when it is read


def test_train_from_python_runs_the_preflight_before_any_work(tmp_path, model_dir):
    from lcot_mega.trainer.driver import train

    cfg = Config(model=ModelConfig(path=str(model_dir)), trainer=TrainerConfig(run_dir=str(tmp_path / "run")))
    cfg.data.train = ["reasoning_gym:chain_sum"]
    assert preflight_errors(cfg) == []
    cfg.algo.injection.enabled = True
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(INJECTION)
    assert not (tmp_path / "run").exists()


def test_a_config_changed_in_python_is_held_to_the_loaders_checks():
    with pytest.raises(ConfigError) as loaded:
        load_config(None, ["algo.polarity=sideways", "actor.min_lr=1.0"])
    cfg = Config()
    cfg.algo.polarity = "sideways"
    cfg.actor.min_lr = 1.0
    assert preflight_errors(cfg) == loaded.value.problems
    assert len(loaded.value.problems) == 1  # the cross-field check waits until every field is valid
    cfg.algo.polarity = "both"
    assert preflight_errors(cfg)[0] == f"actor.min_lr = 1.0 must be <= actor.lr = {Config().actor.lr}"


def test_colocated_mode_refuses_several_engines_in_the_preflight_and_the_fit_check(model_dir):
    cfg = Config(model=ModelConfig(path=str(model_dir)), cluster=ClusterConfig(mode="colocated", num_engines=2))
    cfg.data.train = ["reasoning_gym:chain_sum"]
    with pytest.raises(ConfigError, match=r"cluster\.num_engines = 2: colocated mode runs one engine"):
        check_before_training(cfg)
    assert check_fit(cfg, uniform_nodes(1, cpus=8, gpus=0)).layout == preflight_errors(cfg)
    one = dataclasses.replace(cfg, cluster=ClusterConfig(mode="colocated", num_engines=1))
    assert preflight_errors(one) == []


def test_context_parallel_is_refused_before_any_work_where_it_cannot_run(model_dir):
    cfg = Config(model=ModelConfig(path=str(model_dir)), cluster=ClusterConfig(mode="colocated", actor_ranks=3))
    cfg.data.train = ["reasoning_gym:chain_sum"]
    cfg.actor.context_parallel, cfg.actor.pack_sequences = 2, True
    errors = preflight_errors(cfg)
    assert any(
        "cluster.actor_ranks = 3 is not divisible by" in e and "actor.context_parallel = 1 x 1 x 2" in e for e in errors
    )
    assert "actor.context_parallel = 2 needs actor.pack_sequences=false" in "\n".join(errors)
    cfg.cluster.actor_ranks, cfg.actor.pack_sequences = 4, False
    assert preflight_errors(cfg) == []


def test_a_template_without_the_problem_is_refused_before_any_work(model_dir):
    cfg = load_config(TINY, [f"model.path={model_dir}", "data.prompt_template=Solve."])
    assert preflight_errors(cfg) == ["data.prompt_template = 'Solve.' must contain {problem} where the problem goes"]


def test_contradicting_parallel_settings_are_refused_before_any_rank_starts(model_dir):
    cfg = load_config(TINY, [f"model.path={model_dir}", "actor.virtual_pipeline=2", "actor.sequence_parallel=true"])
    assert preflight_errors(cfg) == [
        "actor.virtual_pipeline needs actor.pipeline_parallel >= 2",
        "actor.sequence_parallel needs actor.tensor_parallel > 1",
    ]


def test_a_loss_max_len_the_loss_aggregation_does_not_read_is_refused(model_dir):
    cfg = load_config(TINY, [f"model.path={model_dir}", "algo.loss_max_len=8"])  # loss_agg token-mean, the default
    assert preflight_errors(cfg) == [
        "algo.loss_max_len = 8 is not used by algo.loss_agg = 'token-mean' (only by seq-mean-token-sum-norm): the loss"
        " would silently ignore it; drop algo.loss_max_len or choose an aggregation that uses it"
    ]
    dr_grpo = ["algo.loss_agg=seq-mean-token-sum-norm", "algo.loss_max_len=8"]
    assert preflight_errors(load_config(TINY, [f"model.path={model_dir}", *dr_grpo])) == []


def test_off_policy_bounds_a_correction_does_not_read_are_refused(model_dir):
    base = [f"model.path={model_dir}"]
    cfg = load_config(TINY, [*base, "algo.off_policy.correction=tis", "algo.off_policy.low=0.5"])
    assert preflight_errors(cfg) == [
        "algo.off_policy: off-policy correction 'tis' has no lower bound; leave algo.off_policy.low unset"
    ]
    icepop = ["algo.off_policy.correction=icepop", "algo.off_policy.low=3", "algo.off_policy.high=2"]
    cfg = load_config(TINY, [*base, *icepop])
    assert preflight_errors(cfg) == ["algo.off_policy: algo.off_policy.low (3.0) must be below high (2.0)"]
    assert preflight_errors(load_config(TINY, [*base, "algo.off_policy.correction=geo_mask"])) == []
    with pytest.raises(ConfigError, match=r"algo\.is_cap = 2\.0 is shorthand for algo\.off_policy\.correction = 'tis'"):
        load_config(TINY, [*base, "algo.is_cap=2.0", "algo.off_policy.correction=mis"])


def test_sampling_ahead_is_refused_where_the_engine_hands_its_devices_to_the_actor(model_dir):
    base = [f"model.path={model_dir}", "trainer.max_staleness=1"]
    colocated = preflight_errors(load_config(TINY, [*base, "cluster.mode=colocated"]))
    assert any("trainer.max_staleness = 1 samples while the actor trains" in e and "colocated" in e for e in colocated)
    assert preflight_errors(load_config(TINY, base)) == []  # local, embedded engine


def test_partial_rollout_needs_a_staleness_bound_and_a_window_shorter_than_a_response(model_dir):
    base = [f"model.path={model_dir}", "rollout.partial=true", "rollout.max_new_tokens=8"]
    no_bound = preflight_errors(load_config(TINY, base))
    assert any("set trainer.max_staleness >= 1" in e for e in no_bound)
    wide = preflight_errors(load_config(TINY, [*base, "trainer.max_staleness=1", "rollout.partial_window=8"]))
    assert any("no response would ever be continued" in e for e in wide)
    assert preflight_errors(load_config(TINY, [*base, "trainer.max_staleness=1"])) == []
    alone = preflight_errors(load_config(TINY, [f"model.path={model_dir}", "rollout.partial_oversubscribe=2"]))
    assert any("act only with rollout.partial = true" in e for e in alone)
    # k = 1 with partial rollout samples no step ahead: nothing overlaps the update, so colocated is fine; k = 2 is not
    colocated = [*base, "cluster.mode=colocated"]
    assert preflight_errors(load_config(TINY, [*colocated, "trainer.max_staleness=1"])) == []
    two = preflight_errors(load_config(TINY, [*colocated, "trainer.max_staleness=2"]))
    assert any("trainer.max_staleness = 2 with rollout.partial samples while the actor trains" in e for e in two)
