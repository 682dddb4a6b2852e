"""Config loading: YAML + overrides into typed dataclasses, and errors that name the key to fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lcot_mega.config import Config, ConfigError, config_from_dict, load_config, save_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_no_file_and_no_overrides_gives_the_dataclass_defaults():
    assert load_config() == Config()


def test_yaml_values_then_overrides_win(tmp_path):
    p = _write(tmp_path, "algo:\n  polarity: positive\n  kl_coef: 0.001\nactor:\n  lr: 1e-6\n")
    cfg = load_config(p, ["algo.polarity=negative", "rollout.stop=[</answer>,END]"])
    assert cfg.algo.polarity == "negative"
    assert cfg.algo.kl_coef == pytest.approx(0.001)
    assert isinstance(cfg.actor.lr, float) and cfg.actor.lr == pytest.approx(1e-6)
    assert cfg.rollout.stop == ["</answer>", "END"]
    assert cfg.trainer == Config().trainer  # untouched sections keep their defaults


def test_interpolation_is_resolved(tmp_path):
    p = _write(tmp_path, "rollout:\n  max_new_tokens: 512\nalgo:\n  loss_max_len: ${rollout.max_new_tokens}\n")
    assert load_config(p).algo.loss_max_len == 512


def test_integer_for_a_float_field_keeps_its_value():
    cfg = load_config(None, ["rollout.temperature=1"])
    assert cfg.rollout.temperature == 1.0


def test_null_is_accepted_for_optional_fields():
    assert load_config(None, ["algo.dual_clip=3.0", "algo.dual_clip=null"]).algo.dual_clip is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algo.polarty=negative", "unknown config key 'algo.polarty'; did you mean 'algo.polarity'?"),
        ("trainr.steps=3", "did you mean 'trainer'?"),
        ("algo.polarity=sideways", "algo.polarity = 'sideways' is not allowed; choose one of: 'both', 'positive'"),
        ("rollout.temperature=hot", "rollout.temperature must be a number, got 'hot'"),
        ("actor.tensor_parallel=true", "actor.tensor_parallel must be an integer, got True"),
        ("rollout.seed=3.5", "rollout.seed must be an integer, got 3.5"),
        ("algo.clip_low=1.5", "algo.clip_low = 1.5 is out of range: it must be < 1"),
        ("rollout.n_samples=0", "rollout.n_samples = 0 is out of range: it must be >= 1"),
        ("actor.context_parallel=0", "actor.context_parallel = 0 is out of range: it must be >= 1"),
        ("reward.fallbacks=[boxed]", "reward.fallbacks = 'boxed' is not allowed"),
        ("rollout.stop=END", "rollout.stop must be a list"),
        ("algo=3", "algo must be a mapping of keys"),
        ("algo", "override 'algo' must look like key=value"),
        ("algo.loss_agg=seq-mean-token-sum-norm", "needs algo.loss_max_len"),
        ("reward.relative_length.lower=2", "reward.relative_length.lower = 2.0 must be <="),
        ("algo.positive_weight=0.5", "only applies with algo.polarity = 'weighted'"),
        ("algo.dynamic_sampling.mode=off", "YAML reads an unquoted off/on/no/yes as a boolean: quote it"),
    ],
)
def test_bad_values_fail_naming_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_a_dr_grpo_normaliser_shorter_than_the_longest_response_is_refused_naming_both_keys():
    dr_grpo = ["algo.loss_agg=seq-mean-token-sum-norm", "rollout.max_new_tokens=1024"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*dr_grpo, "algo.loss_max_len=512"])
    (problem,) = err.value.problems
    assert problem.startswith("algo.loss_max_len = 512 must be >= rollout.max_new_tokens = 1024")
    assert "algo.loss_max_len=1024" in problem  # the fix
    for enough in ("${rollout.max_new_tokens}", "4096"):  # any constant that bounds every response is unbiased
        load_config(None, [*dr_grpo, f"algo.loss_max_len={enough}"])


def test_a_quoted_off_is_the_word():
    assert load_config(None, ["algo.dynamic_sampling.mode='off'"]).algo.dynamic_sampling.mode == "off"


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algo.polarty=x", "rollout.top_p=2", "actor.lr=-1"])
    assert len(err.value.problems) == 3


def test_missing_file_and_malformed_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "algo: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level of the config must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_validation_does_not_mutate_its_input():
    data = {"algo": {"polarity": "negative", "reserve_min": 2}, "rollout": {"stop": ["x"]}}
    snapshot = {"algo": dict(data["algo"]), "rollout": {"stop": ["x"]}}
    cfg = config_from_dict(data)
    assert data == snapshot
    cfg.rollout.stop.append("y")
    assert data["rollout"]["stop"] == ["x"]


def test_saved_config_reloads_to_an_equal_config(tmp_path):
    cfg = load_config(None, ["algo.polarity=negative", "algo.reserve_ratio=0.1", "reward.fallbacks=[last_number]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_every_default_satisfies_its_own_constraints():
    # A default outside its declared range would make the default config unloadable.
    assert config_from_dict(dataclasses.asdict(Config())) == Config()


def test_overriding_one_key_of_a_monitor_keeps_that_monitors_own_defaults():
    """Each guards monitor has its own defaults (not MonitorConfig's); setting one key must not reset the rest."""
    cfg = load_config(None, ["guards.entropy.min=0.1", "guards.grad_norm.window=5"])
    assert (cfg.guards.entropy.action, cfg.guards.entropy.min, cfg.guards.entropy.min_ratio) == ("rollback", 0.1, 0.25)
    assert (cfg.guards.grad_norm.action, cfg.guards.grad_norm.max_ratio, cfg.guards.grad_norm.window) == (
        "skip_step",
        10.0,
        5,
    )
    assert cfg.guards.clipfrac.max == 0.5  # untouched monitors keep theirs too


def test_an_override_value_that_is_not_yaml_is_a_config_error_not_a_traceback():
    with pytest.raises(ConfigError, match="an override's value is not valid YAML") as info:
        load_config(None, ["data.prompt_template={problem} Let's think"])  # `{` opens a YAML flow mapping
    assert "quote it, e.g. 'key=\"{problem} ...\"'" in str(info.value)
    quoted = load_config(None, ['data.prompt_template="{problem} Let\'s think"'])
    assert quoted.data.prompt_template == "{problem} Let's think"
