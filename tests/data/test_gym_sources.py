"""reasoning-gym sources: `reasoning_gym:TASK?args` parsing, errors, seeds, and generation."""

from __future__ import annotations

import pytest

from lcot_mega.data import generate_problems, generator_seed, normalize_problem, parse_gym_spec

pytest.importorskip("reasoning_gym")


def test_args_are_read_as_the_config_field_types():
    spec = "reasoning_gym:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2&allow_negation=TRUE"
    gym = parse_gym_spec(spec)
    assert gym.task == "chain_sum"
    assert gym.args == {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "allow_negation": True}
    assert type(gym.args["min_terms"]) is int
    assert parse_gym_spec("reasoning_gym:number_sorting?min_value=-5&max_value=5").args == {
        "min_value": -5.0,
        "max_value": 5.0,
    }
    assert parse_gym_spec("reasoning_gym:caesar_cipher?delimiter=123").args == {"delimiter": "123"}
    assert parse_gym_spec("reasoning_gym:caesar_cipher?delimiter=%20%26").args == {"delimiter": " &"}
    assert parse_gym_spec("reasoning_gym:chain_sum").args == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("reasoning_gym:chain_sun", r"unknown reasoning-gym task 'chain_sun'; did you mean 'chain_sum'"),
        ("reasoning_gym:chain_sum?min_term=2", r"chain_sum has no argument 'min_term'; did you mean 'min_terms'\?"),
        ("reasoning_gym:chain_sum?min_terms=two", r"argument min_terms = 'two' is not an integer"),
        ("reasoning_gym:chain_sum?allow_negation=yes", r"allow_negation = 'yes' is not a boolean"),
        ("reasoning_gym:chain_sum?min_terms", r"'min_terms' must look like name=value"),
        ("reasoning_gym:chain_sum?min_terms=2&min_terms=3", r"'min_terms' is given twice"),
        ("reasoning_gym:chain_sum?seed=3", r"'seed' is set by trainer\.seed"),
        ("reasoning_gym:chain_sum?size=3", r"'size' is set by data\.gym_train_size"),
        ("reasoning_gym:chain_sum?min_terms=4&max_terms=3", r"invalid generator arguments: max_terms must be >= min"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_gym_spec(spec)
    assert str(info.value).startswith(spec.split("?")[0])


def test_generator_seeds_are_fixed_and_far_apart():
    assert generator_seed("chain_sum", "eval") == generator_seed("chain_sum", "eval")
    seeds = [generator_seed("chain_sum", "eval")] + [generator_seed("chain_sum", "train", s) for s in range(5)]
    # reasoning-gym seeds item idx with Random(seed + idx): seeds closer than the draw count share items
    assert min(abs(a - b) for i, a in enumerate(seeds) for b in seeds[i + 1 :]) > 10**6


def test_generation_skips_excluded_questions_and_repeats_when_asked():
    gym = parse_gym_spec("reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1")
    first, stats = generate_problems(gym, name="cs", seed=7, size=50, uid_tag="eval", distinct=True)
    keys = [normalize_problem(p.problem) for p in first]
    assert len(first) == 50 and len(set(keys)) == 50 and stats.duplicates > 0  # 200 possible questions
    assert first[0].uid.startswith("cs/eval/") and first[0].source == "cs"
    assert int(first[0].answer) == eval(first[0].problem.split(": ")[1].rstrip(" ="))
    again, stats = generate_problems(gym, name="cs", seed=7, size=100, uid_tag="t", exclude=set(keys))
    assert len(again) == 100 and stats.held_out > 0
    assert not {normalize_problem(p.problem) for p in again} & set(keys)
