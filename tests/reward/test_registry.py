import pytest
import reward_fns_for_tests as fns

from lcot_mega.reward import Grader, register_reward, resolve_reward
from lcot_mega.reward.registry import available_rewards, exact_reward, math_reward, reward_kwargs


def test_builtin_names():
    assert resolve_reward("math") is math_reward
    assert resolve_reward("exact") is exact_reward
    assert {"math", "exact"} <= set(available_rewards())


def test_dotted_paths_both_spellings():
    assert resolve_reward("reward_fns_for_tests:think_flag") is fns.think_flag
    assert resolve_reward("reward_fns_for_tests.think_flag") is fns.think_flag
    assert resolve_reward("lcot_mega.reward.registry:exact_reward") is exact_reward


def test_unknown_name_names_registered_and_closest():
    with pytest.raises(ValueError, match=r"unknown reward function 'mth'.*'exact'.*'math'.*closest: 'math'"):
        resolve_reward("mth")


def test_bad_dotted_paths():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        resolve_reward("reward_fns_for_tests:nope")


def test_register_refuses_silent_replacement():
    register_reward("contains_gold")(fns.contains_gold)  # same function again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact")(fns.contains_gold)
    with pytest.raises(ValueError, match="dotted"):
        register_reward("my.reward")


def test_options_passed_only_when_accepted():
    options = {"require_think_close": True, "fallbacks": ("last_number",)}
    assert reward_kwargs(fns.contains_gold, **options) == {}
    assert reward_kwargs(fns.think_flag, **options) == {"require_think_close": True}
    assert reward_kwargs(fns.all_options, **options) == options
    assert reward_kwargs(math_reward, **options) == options


def test_exact_reward_strips_whitespace_only():
    assert exact_reward(r"\boxed{ 42 }", " 42\n")
    assert not exact_reward(r"\boxed{42.0}", "42")
    assert not exact_reward("42", "42")  # nothing extracted
    assert exact_reward("so 42", "42", fallbacks=("last_number",))


def test_math_reward_in_process():
    assert math_reward(r"\boxed{\frac{2}{4}}", "0.5")
    assert not math_reward(r"\boxed{" + "1" * 2001 + "}", "1" * 2001)  # over the length cap: not parsed
    assert not math_reward("no answer", "1")


def test_custom_functions_in_workers():
    """A registered name, and dotted paths, resolve in spawned workers; options follow each signature."""
    responses, golds = ["the gold is 5", "nothing"], ["5", "5"]
    with Grader("contains_gold", num_workers=1, require_think_close=True, fallbacks=("last_number",)) as g:
        results = g.grade_batch(responses, golds)
        assert [(r.reward, r.correct, r.error) for r in results] == [(1.0, True, None), (0.0, False, None)]
        assert [r.extracted for r in results] == [None, None]  # think close required: nothing extracted
    with Grader("reward_fns_for_tests:think_flag", num_workers=1, require_think_close=True) as g:
        assert [r.reward for r in g.grade_batch(responses, golds)] == [1.0, 1.0]
    with Grader("reward_fns_for_tests.all_options", num_workers=1) as g:
        [r] = g.grade_batch(["x"], ["y"])
        assert (r.reward, r.correct, r.error) == (0.5, False, None)  # half credit is not "correct"
