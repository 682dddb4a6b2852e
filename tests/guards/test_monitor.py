"""Monitor: absolute bounds, ratio-times-median bounds once the window is full, and the action order."""

from __future__ import annotations

import math

import pytest

from lcot_mega.config.schema import MonitorConfig
from lcot_mega.guards import Action, Breach, Monitor


def grad_norm(**kw) -> Monitor:
    return Monitor("grad_norm", "actor/grad_norm", MonitorConfig(**{"action": "skip_step"} | kw))


def test_hand_worked_median_bound():
    m = grad_norm(max_ratio=10.0, window=5)
    for v in [5, 1, 4, 2, 3]:
        m.accept(v)
    assert m.median() == 3
    lo, hi = m.limits()
    assert lo is None and hi.threshold == 30 and hi.text == "10 x median 3"
    assert m.breach(30.0) is None
    assert m.breach(31.0) == Breach("grad_norm", "actor/grad_norm", 31.0, "> 10 x median 3", Action.SKIP)


def test_ratio_bound_waits_for_a_full_window():
    m = grad_norm(max_ratio=10.0, window=5)
    for v in [1, 2, 3, 4]:
        m.accept(v)
    assert m.median() is None and m.limits() == (None, None)
    assert m.breach(1000.0) is None
    m.accept(5)
    assert m.breach(1000.0) is not None


def test_window_keeps_only_the_newest_values():
    m = grad_norm(max_ratio=2.0, window=3)
    for v in [100, 100, 100, 1, 2, 3]:
        m.accept(v)
    assert list(m.history) == [1, 2, 3] and m.limits()[1].threshold == 4


def test_tighter_of_absolute_and_ratio_bound_wins():
    m = Monitor("entropy", "actor/entropy", MonitorConfig(action="rollback", min=0.1, min_ratio=0.25, window=3))
    for v in [2.0, 2.0, 2.0]:
        m.accept(v)
    assert m.limits()[0].threshold == 0.5  # 0.25 x 2 beats 0.1
    assert m.breach(0.4).bound == "< 0.25 x median 2"
    m.load_history([0.2, 0.2, 0.2])
    assert m.limits()[0].threshold == 0.1  # 0.25 x 0.2 = 0.05 is looser than 0.1
    assert m.breach(0.09).bound == "< 0.1"


def test_ratio_bounds_skip_a_median_that_is_not_positive():
    m = Monitor("reward", "reward/mean", MonitorConfig(min_ratio=0.3, window=2))
    m.load_history([-0.5, -0.5])
    assert m.limits() == (None, None)  # 0.3 x -0.5 = -0.15 > the median itself: meaningless
    assert m.breach(-0.5) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_value_breaches_a_bounded_monitor(value):
    m = grad_norm(max_ratio=10.0)  # window not full: no numeric bound yet, still bounded
    b = m.breach(value)
    assert b is not None and b.bound == "not finite" and b.describe() == f"grad_norm {value:.3g} not finite"


def test_monitor_without_bounds_never_breaches():
    m = Monitor("kl_ref", "actor/kl_loss", MonitorConfig(action="warn"))
    assert m.breach(1e9) is None and m.breach(math.nan) is None


def test_nonfinite_values_never_enter_the_window():
    m = grad_norm(max_ratio=10.0, window=2)
    m.accept(math.nan)
    m.accept(math.inf)
    assert list(m.history) == []


def test_action_words_and_order():
    assert sorted(Action) == ["ok", "log", "warn", "skip", "rollback", "halt"]  # severity, not alphabet
    assert Action.SKIP == "skip" and "warn" in (Action.OK, Action.LOG, Action.WARN)
    assert f"{Action.ROLLBACK}" == "rollback"
    assert Action.from_config("skip_step") is Action.SKIP and Action.from_config("off") is None
    assert Action.from_config("halt") > Action.from_config("rollback") > Action.SKIP > Action.WARN > Action.LOG
    assert Action.WARN <= "warn" < Action.SKIP and max(Action.LOG, Action.HALT, Action.OK) is Action.HALT
    with pytest.raises(ValueError, match="skip_step"):
        Action.from_config("skip")
    with pytest.raises(TypeError):
        assert Action.OK < "fine"


def test_off_monitor_is_not_built():
    with pytest.raises(ValueError, match="off"):
        Monitor("entropy", "actor/entropy", MonitorConfig(action="off"))
