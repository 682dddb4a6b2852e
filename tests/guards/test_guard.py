"""Guard: update bounds from skip_step monitors, verdicts, accept-only history, checkpoint round trip."""

from __future__ import annotations

import json
import math
import pickle

from lcot_mega.config import config_from_dict
from lcot_mega.config.schema import GuardsConfig, MonitorConfig
from lcot_mega.guards import MONITOR_KEYS, Action, Guard, UpdateBounds, Verdict
from lcot_mega.observe import is_documented

OFF = MonitorConfig(action="off")


def only(**monitors: MonitorConfig) -> GuardsConfig:
    """A config with every monitor off except `monitors`."""
    fields = {name: OFF for name in [*MONITOR_KEYS, "nonfinite"]}
    return GuardsConfig(**(fields | monitors))


def grad_guard(window: int = 5) -> Guard:
    return Guard(only(grad_norm=MonitorConfig(action="skip_step", max_ratio=10.0, window=window)))


def test_monitor_fields_map_to_documented_keys():
    assert set(MONITOR_KEYS) | {"nonfinite"} == {
        n for n, v in vars(GuardsConfig()).items() if isinstance(v, MonitorConfig)
    }
    assert all(is_documented(k) for k in MONITOR_KEYS.values())
    assert MONITOR_KEYS["kl_ref"] == "actor/kl_loss" and MONITOR_KEYS["kl_old"] == "actor/ppo_kl"


def test_hand_worked_grad_norm_spike_against_the_median():
    guard = grad_guard()
    for v in [1, 2, 3, 4, 5]:
        assert guard.check(v, {"actor/grad_norm": v}).action is Action.OK
        guard.accept({"actor/grad_norm": v})
    assert guard.update_bounds() == UpdateBounds({"actor/grad_norm": (None, 30.0)}, reject_nonfinite=False)
    assert guard.check(6, {"actor/grad_norm": 30.0}).action is Action.OK
    verdict = guard.check(6, {"actor/grad_norm": 31.0})
    assert verdict.action is Action.SKIP and not verdict.keeps_update
    assert verdict.metrics() == {
        "guard/action": "skip",
        "guard/reason": "grad_norm 31 > 10 x median 3",
        "guard/breaches": 1.0,
    }
    # the actor's gate and the verdict agree on the same values
    assert guard.update_bounds().rejects({"actor/grad_norm": 31.0}) == ["actor/grad_norm 31 > 30"]


def test_nan_breaches_and_nonfinite_watches_every_metric():
    guard = Guard(only(nonfinite=MonitorConfig(action="skip_step")))
    assert guard.update_bounds() == UpdateBounds({}, reject_nonfinite=True)
    verdict = guard.check(3, {"actor/loss": math.nan, "perf/step_s": 1.0, "sync/gb": math.inf})
    assert verdict.action is Action.SKIP
    assert [(b.monitor, b.key) for b in verdict.breaches] == [("nonfinite", "actor/loss"), ("nonfinite", "sync/gb")]
    assert verdict.metrics()["guard/reason"] == "actor/loss nan not finite; sync/gb inf not finite"
    # inf groups per kept group means "none kept", not a numerical failure
    assert guard.check(4, {"rollout/groups_per_kept_group": math.inf}).action is Action.OK


def test_history_grows_only_on_accept():
    guard = grad_guard(window=2)
    guard.check(1, {"actor/grad_norm": 1.0})
    guard.check(2, {"actor/grad_norm": 1.0})
    assert guard.state_dict() == {"windows": {"grad_norm": []}, "streaks": {"grad_norm": 0}}
    assert guard.update_bounds().bounds == {"actor/grad_norm": (None, None)}
    guard.accept({"actor/grad_norm": 1.0, "actor/entropy": 2.0})
    guard.accept({"actor/grad_norm": 3.0})
    assert guard.state_dict()["windows"] == {"grad_norm": [1.0, 3.0]}
    assert guard.update_bounds().bounds == {"actor/grad_norm": (None, 20.0)}


def test_a_skipped_spike_does_not_move_the_median():
    guard = grad_guard(window=3)
    for v in [2.0, 2.0, 2.0]:
        guard.accept({"actor/grad_norm": v})
    for step in range(4, 10):  # the driver accepts only kept steps, so a run of spikes keeps being caught
        verdict = guard.check(step, {"actor/grad_norm": 500.0})
        assert verdict.action is Action.SKIP
        if verdict.keeps_update:
            guard.accept({"actor/grad_norm": 500.0})
    assert guard.update_bounds().bounds["actor/grad_norm"] == (None, 20.0)


def test_state_dict_round_trip_gives_identical_decisions():
    cfg = GuardsConfig()  # every default monitor
    a = Guard(cfg)
    for step in range(1, 31):
        metrics = {
            "actor/grad_norm": 1.0 + step % 4,
            "actor/entropy": 0.8 + 0.01 * step if step < 29 else 0.1,  # two low steps: the entropy streak is 2
            "reward/mean": 0.2 + 0.01 * step,
            "rollout/response_len_mean": 300.0 + step,
        }
        a.end_step(a.check(step, metrics))
        a.accept(metrics)
    state = json.loads(json.dumps(a.state_dict()))  # through JSON, as a checkpoint stores it
    b = Guard(cfg)
    assert b.check(31, {"actor/grad_norm": 100.0}).action is Action.OK  # fresh: window empty, nothing to compare
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert b.update_bounds() == a.update_bounds()
    probes = [
        {"actor/grad_norm": 100.0},
        {"actor/grad_norm": 3.0},
        {"actor/entropy": 0.1},
        {"reward/mean": 0.01},
        {"rollout/response_len_mean": 5000.0},
        {"actor/loss": math.nan},
    ]
    for metrics in probes:
        assert b.check(31, metrics) == a.check(31, metrics)
    assert {a.check(31, m).action for m in probes} == {Action.OK, Action.SKIP, Action.ROLLBACK, Action.WARN}


def test_load_state_dict_tolerates_changed_config():
    a = grad_guard(window=5)
    for v in [1, 2, 3, 4, 5]:
        a.accept({"actor/grad_norm": v})
    b = grad_guard(window=3)  # the window shrank on resume: the newest values are kept
    b.load_state_dict(a.state_dict() | {"windows": a.state_dict()["windows"] | {"gone": [1.0]}})
    assert b.state_dict()["windows"] == {"grad_norm": [3.0, 4.0, 5.0]}
    c = Guard(only(entropy=MonitorConfig(min=0.1)))  # a monitor the state has no window for
    c.load_state_dict(a.state_dict())
    assert c.state_dict() == {"windows": {"entropy": []}, "streaks": {"entropy": 0}}


def test_verdict_is_the_most_severe_action():
    guard = Guard(
        only(
            clipfrac=MonitorConfig(action="log", max=0.5),
            truncation=MonitorConfig(action="warn", max=0.5),
            entropy=MonitorConfig(action="rollback", min=0.1),
            kl_old=MonitorConfig(action="halt", max=1.0),
        )
    )
    base = {"actor/clipfrac": 0.9, "rollout/truncated_frac": 0.9}
    assert guard.check(1, {"actor/clipfrac": 0.9}).action is Action.LOG
    assert guard.check(1, base).action is Action.WARN
    assert guard.check(1, base | {"actor/entropy": 0.01}).action is Action.ROLLBACK
    verdict = guard.check(1, base | {"actor/entropy": 0.01, "actor/ppo_kl": 2.0})
    assert verdict.action is Action.HALT and len(verdict.breaches) == 4
    # the reason names the most severe breaches first, and counts the rest
    assert verdict.metrics()["guard/reason"] == "kl_old 2 > 1; entropy 0.01 < 0.1 (+2 more)"
    assert verdict.metrics()["guard/breaches"] == 4.0


def test_keeps_update_for_ok_log_warn_only():
    assert Verdict(1).keeps_update
    guard = Guard(
        only(clipfrac=MonitorConfig(action="warn", max=0.5), entropy=MonitorConfig(action="skip_step", min=1))
    )
    assert guard.check(1, {"actor/clipfrac": 0.9}).keeps_update
    assert not guard.check(1, {"actor/entropy": 0.5}).keeps_update


def test_ok_verdict_metrics():
    assert Verdict(5).metrics() == {"guard/action": "ok", "guard/reason": "", "guard/breaches": 0.0}


def test_log_monitor_records_but_does_not_bound_the_update():
    guard = Guard(only(grad_norm=MonitorConfig(action="log", max=1.0)))
    assert guard.update_bounds() == UpdateBounds({}, reject_nonfinite=False)
    assert guard.check(1, {"actor/grad_norm": 2.0}).action is Action.LOG


def test_only_skip_step_monitors_give_update_bounds():
    cfg = only(
        grad_norm=MonitorConfig(action="skip_step", max=10.0),
        entropy=MonitorConfig(action="skip_step", min=0.05, max=9.0),
        clipfrac=MonitorConfig(action="rollback", max=0.5),
        kl_ref=MonitorConfig(action="skip_step"),  # no bound at all
        nonfinite=MonitorConfig(action="halt"),
    )
    b = Guard(cfg).update_bounds()
    assert b == UpdateBounds({"actor/entropy": (0.05, 9.0), "actor/grad_norm": (None, 10.0)}, reject_nonfinite=False)
    assert pickle.loads(pickle.dumps(b)) == b


def test_disabled_guard_is_all_ok():
    guard = Guard(GuardsConfig(enabled=False))
    assert guard.update_bounds() == UpdateBounds({}, reject_nonfinite=False)
    bad = {"actor/grad_norm": math.nan, "actor/entropy": 0.0, "actor/loss": math.inf, "actor/ppo_kl": 50.0}
    assert guard.check(1, bad) == Verdict(1)
    guard.accept({"actor/grad_norm": 1.0})
    assert guard.state_dict() == {"windows": {}, "streaks": {}}


def test_default_config_guards_what_the_schema_says():
    guard = Guard(config_from_dict({}).guards)
    assert guard.update_bounds() == UpdateBounds({"actor/grad_norm": (None, None)}, reject_nonfinite=True)
    assert guard.check(1, {"actor/ppo_kl": 0.2}).action is Action.WARN
    assert guard.check(1, {"actor/grad_norm": math.nan}).action is Action.SKIP


def test_string_metrics_are_not_judged():
    guard = Guard(GuardsConfig())
    assert guard.check(1, {"guard/action": "halt", "guard/reason": "nan"}).action is Action.OK


def test_absolute_bounds_apply_from_the_first_step():
    guard = Guard(only(truncation=MonitorConfig(action="warn", max=0.5)))
    assert guard.check(1, {"rollout/truncated_frac": 0.5}).action is Action.OK
    assert guard.check(1, {"rollout/truncated_frac": 0.55}).action is Action.WARN


def test_patience_warns_until_the_breach_has_lasted_and_then_acts():
    """entropy rollback with patience 3: two low steps are pending warnings, the third asks for the rollback; a
    recovery in between restarts the count. Streaks survive a state_dict round trip."""
    cfg = MonitorConfig(action="rollback", min=1.0, patience=3)
    guard = Guard(only(entropy=cfg))

    def step(n: int, value: float) -> Verdict:
        verdict = guard.check(n, {"actor/entropy": value})
        guard.end_step(verdict)
        return verdict

    first, second = step(1, 0.5), step(2, 0.5)
    assert (first.action, first.suspect, second.action, second.suspect) == (Action.WARN, True, Action.WARN, True)
    assert "(2 of 3 steps in a row)" in second.reason()
    assert step(3, 2.0).action is Action.OK  # back within bounds: the count restarts
    assert [step(n, 0.5).action for n in (4, 5)] == [Action.WARN, Action.WARN]
    twin = Guard(only(entropy=cfg))
    twin.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    third = step(6, 0.5)
    assert (third.action, third.suspect) == (Action.ROLLBACK, False)
    assert twin.check(6, {"actor/entropy": 0.5}).action is Action.ROLLBACK  # the resumed guard agrees


def test_a_skip_monitor_gives_the_actor_its_bound_only_once_patience_is_used_up():
    guard = Guard(only(grad_norm=MonitorConfig(action="skip_step", max=5.0, patience=2)))
    assert guard.update_bounds().bounds == {}  # a first breach would only warn
    guard.end_step(guard.check(1, {"actor/grad_norm": 9.0}))
    assert guard.update_bounds().bounds == {"actor/grad_norm": (None, 5.0)}
    assert guard.check(2, {"actor/grad_norm": 9.0}).action is Action.SKIP


def test_async_monitors_watch_staleness_and_the_share_of_masked_tokens():
    guard = Guard(GuardsConfig())  # defaults: staleness has no bound, off_policy_masked warns above 0.2
    assert guard.check(1, {"rollout/staleness_mean": 5.0, "rollout/is_masked_frac": 0.2}).action is Action.OK
    verdict = guard.check(2, {"rollout/is_masked_frac": 0.25})
    assert verdict.action is Action.WARN and verdict.metrics()["guard/reason"] == "off_policy_masked 0.25 > 0.2"
    strict = Guard(only(staleness=MonitorConfig(action="skip_step", max=0.5)))
    assert strict.check(3, {"rollout/staleness_mean": 1.0}).action is Action.SKIP


def test_moe_monitors_watch_expert_load_router_entropy_and_replay_mismatch():
    """Defaults: expert load warns at 1.5x its median of 10, router entropy at half of it, replay mismatch above 0.2;
    a dense model's steps (no moe/ keys) are not judged."""
    guard = Guard(GuardsConfig())
    healthy = {"moe/expert_load_max": 2.0, "moe/router_entropy": 3.0, "moe/replay_mismatch": 0.01}
    for step in range(10):
        assert guard.check(step, healthy).action is Action.OK
        guard.accept(healthy)
    collapsing = {"moe/expert_load_max": 3.1, "moe/router_entropy": 1.4, "moe/replay_mismatch": 0.25}
    reasons = [b.describe() for b in guard.check(10, collapsing).breaches]
    assert reasons == [
        "expert_load 3.1 > 1.5 x median 2",
        "router_entropy 1.4 < 0.5 x median 3",
        "replay_mismatch 0.25 > 0.2",
    ]
    assert guard.check(11, {"actor/entropy": 1.0}).action is Action.OK
    strict = Guard(only(expert_load=MonitorConfig(action="skip_step", max=4.0)))
    assert strict.check(12, {"moe/expert_load_max": 4.5}).action is Action.SKIP
