"""Dynamic sampling with refill on a constructed reward pattern: what is kept, what is counted, what is aborted.

The engine here is scripted (each prompt's answer says which of its samples are correct), so the pattern of
informative and zero-advantage groups is exact; grading goes through the real isolated grader.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import torch
from helpers.scripted_engine import G, ScriptedEngine, feeder, scripted_prompts

from lcot_mega.algo import advantages
from lcot_mega.algo.advantages import grpo_advantages
from lcot_mega.config import Config, config_from_dict
from lcot_mega.reward.grader import Grader
from lcot_mega.rollout.protocol import Completion, SamplingParams
from lcot_mega.trainer.collect import ShortfallError, collect
from lcot_mega.types import SampleStatus


def _cfg(mode: str, target: int, **ds) -> Config:
    return config_from_dict(
        {
            "rollout": {"n_samples": G, "max_new_tokens": 8},
            "algo": {"dynamic_sampling": {"mode": mode, **ds}},
            "trainer": {"prompts_per_step": target},
        }
    )


@pytest.fixture(scope="module")
def grader():
    with Grader("math", num_workers=1) as g:
        yield g


def test_drop_refills_until_the_batch_holds_enough_informative_groups(grader):
    # round 1 asks for 4 (oversample 1): 2 informative; round 2 asks for the 2 missing: 1 informative;
    # round 3 asks for 1: informative -> full after 3 rounds, 7 groups generated for 4 kept
    kinds = ["all", "mixed", "none", "one", "none", "mixed", "mixed", "all"]
    prompts, table = scripted_prompts(kinds)
    next_prompts, state = feeder(prompts)
    got = collect(ScriptedEngine(table), next_prompts, grader, _cfg("drop", 4, max_rounds=4), step=1)
    assert state["asked"] == [4, 2, 1]
    assert [g.prompt.uid for g in got.batch.groups] == ["p1", "p3", "p5", "p6"]
    m = got.metrics
    assert m["rollout/rounds"] == 3 and m["rollout/groups_generated"] == 7 and m["rollout/shortfall"] == 0
    assert m["rollout/groups_per_kept_group"] == pytest.approx(7 / 4)
    assert m["rollout/zero_adv_frac"] == pytest.approx(3 / 7)  # p0 all, p2 none, p4 none
    # accuracy over everything generated: 4 + 0 + 2 + 1 + 0 + 2 + 2 correct of 28
    assert m["reward/accuracy"] == pytest.approx(11 / 28)
    # GRPO on the kept groups: '1100' -> +-0.866 (std with Bessel), '1000' -> +1.5 / -0.5
    adv = [s.advantage for s in got.batch.groups[1].samples]
    assert adv == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)


def test_oversampling_asks_for_more_prompts_and_keeps_only_the_target(grader):
    kinds = ["mixed"] * 6
    prompts, table = scripted_prompts(kinds)
    next_prompts, state = feeder(prompts)
    got = collect(ScriptedEngine(table), next_prompts, grader, _cfg("drop", 4, oversample=1.5), step=1)
    assert state["asked"] == [6] and len(got.batch.groups) == 4
    assert got.metrics["rollout/groups_generated"] == 6


def test_shortfall_trains_on_what_there_is_or_stops_or_falls_back(grader):
    kinds = ["none", "mixed", "all", "none", "all", "none"]
    for mode, on_shortfall, expected in [
        ("drop", "train", ["p1"]),
        ("drop_with_fallback", "train", ["p1", "p0", "p2", "p3"]),
    ]:
        prompts, table = scripted_prompts(kinds)
        next_prompts, _ = feeder(prompts)
        cfg = _cfg(mode, 4, max_rounds=2, on_shortfall=on_shortfall)
        got = collect(ScriptedEngine(table), next_prompts, grader, cfg, step=1)
        assert [g.prompt.uid for g in got.batch.groups] == expected
        assert got.metrics["rollout/rounds"] == 2
    prompts, table = scripted_prompts(kinds)
    next_prompts, _ = feeder(prompts)
    with pytest.raises(ShortfallError, match="1 informative groups of 4 in 2 rounds"):
        collect(ScriptedEngine(table), next_prompts, grader, _cfg("drop", 4, max_rounds=2, on_shortfall="stop"), 1)


def test_off_keeps_every_group_in_one_round(grader):
    prompts, table = scripted_prompts(["all", "none", "mixed"])
    next_prompts, state = feeder(prompts)
    got = collect(ScriptedEngine(table), next_prompts, grader, _cfg("off", 3), step=1)
    assert state["asked"] == [3] and len(got.batch.groups) == 3
    assert got.metrics["rollout/zero_adv_frac"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(("buffer_len", "shaped"), [(7, 1.0), (6, 0.0)])
def test_shaped_frac_counts_samples_a_shaping_term_moved(grader, buffer_len, shaped):
    # every response is 2 tokens, the limit 8: DAPO's overlong term starts at 8 - buffer_len tokens, so a buffer of 7
    # costs each sample (1 - 2) / 7 and a buffer of 6 costs nothing (2 <= 8 - 6)
    prompts, table = scripted_prompts(["all", "mixed"])
    cfg = _cfg("off", 2)
    cfg.reward.overlong.enabled, cfg.reward.overlong.buffer_len = True, buffer_len
    got = collect(ScriptedEngine(table), feeder(prompts)[0], grader, cfg, step=1)
    assert got.metrics["reward/shaped_frac"] == shaped
    assert got.metrics["reward/mean"] == pytest.approx(6 / 8 - shaped / 7)  # 6 of 8 correct, minus the penalty
    assert got.metrics["reward/accuracy"] == pytest.approx(6 / 8)


def test_surplus_in_flight_generation_is_aborted_once_the_batch_is_full(grader):
    # two engines' worth of parallelism: the first chunk fills the batch, the second is still running
    prompts, table = scripted_prompts(["mixed", "mixed", "none", "none"])
    next_prompts, _ = feeder(prompts)
    engine = ScriptedEngine(table, slow_kinds=("none",), fast_waits_for_slow=True)
    start = time.monotonic()
    got = collect(engine, next_prompts, grader, _cfg("drop", 2, oversample=2.0), step=1, parallelism=2)
    assert time.monotonic() - start < 20, "the surplus chunk was waited for instead of aborted"
    assert engine.aborts == 1 and [g.prompt.uid for g in got.batch.groups] == ["p0", "p1"]
    assert got.metrics["rollout/aborted_groups"] == 2 and got.metrics["rollout/groups_generated"] == 2


def test_chunks_are_scored_in_order_whichever_engine_finishes_first(grader):
    # two chunks of one prompt each, both informative; the first is slower, yet it is the one kept, and the second
    # (finished but surplus) counts as aborted without an abort call, since nothing was running any more
    prompts, table = scripted_prompts(["one", "mixed"])
    engine = ScriptedEngine(table, slow_kinds=("one",), slow_s=0.5)
    got = collect(engine, feeder(prompts)[0], grader, _cfg("drop", 1, oversample=2.0), step=1, parallelism=2)
    assert [g.prompt.uid for g in got.batch.groups] == ["p0"]
    assert engine.aborts == 0 and got.metrics["rollout/aborted_groups"] == 1
    assert got.metrics["rollout/groups_generated"] == 1


class LoopingEngine(ScriptedEngine):
    """ScriptedEngine whose first sample per prompt is cut by the length limit inside a loop of [7, 8], and whose
    second sample loops too but ends on EOS (it got out)."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        out = super().generate(prompt_ids, params)
        for group in out:
            looped, escaped = [7, 8] * 20, [7, 8] * 20 + [0]
            group[0] = Completion(looped, [-0.5] * 40, SampleStatus.TRUNCATED, text=group[0].text)
            group[1] = Completion(escaped, [-0.5] * 41, SampleStatus.COMPLETED, text=group[1].text)
        return out


def test_repetition_frac_counts_looping_samples_of_every_generated_group(grader):
    # round 1 asks for 2: 'none' (dropped) + 'mixed'; round 2 asks for 1: 'mixed' -> 3 groups, 12 samples,
    # one looping sample in each group (the dropped one included) -> 3 / 12
    prompts, table = scripted_prompts(["none", "mixed", "mixed"])
    next_prompts, state = feeder(prompts)
    got = collect(LoopingEngine(table), next_prompts, grader, _cfg("drop", 2, max_rounds=2), step=1)
    assert state["asked"] == [2, 1] and got.metrics["rollout/groups_generated"] == 3
    assert got.metrics["rollout/repetition_frac"] == pytest.approx(3 / 12)
    assert got.metrics["rollout/truncated_frac"] == pytest.approx(3 / 12)


def test_repetition_frac_is_zero_without_loops(grader):
    prompts, table = scripted_prompts(["mixed", "all"])
    next_prompts, _ = feeder(prompts)
    got = collect(ScriptedEngine(table), next_prompts, grader, _cfg("off", 2), step=1)
    assert got.metrics["rollout/repetition_frac"] == 0.0


# ---- informative rule and advantages computed once ----


@pytest.fixture
def spy_estimator(monkeypatch):
    """Registers `spy`: GRPO that records the rewards of every call (removed again after the test)."""
    calls: list[list[float]] = []

    def spy(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
        calls.append(rewards.tolist())
        return grpo_advantages(rewards, group_ids, eps)

    monkeypatch.setitem(advantages._REGISTRY, "spy", spy)
    return calls


@pytest.mark.parametrize("parallelism", [1, 2])
def test_advantages_are_computed_once_over_the_kept_groups(grader, spy_estimator, parallelism):
    # same pattern as the refill test: 3 rounds, 7 groups scored, 4 kept ('mixed', 'one', 'mixed', 'mixed')
    kinds = ["all", "mixed", "none", "one", "none", "mixed", "mixed", "all"]
    prompts, table = scripted_prompts(kinds)
    cfg = _cfg("drop", 4, max_rounds=4)
    cfg.algo.advantage = "spy"
    got = collect(ScriptedEngine(table), feeder(prompts)[0], grader, cfg, step=1, parallelism=parallelism)
    mixed, one = [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]
    assert spy_estimator == [mixed + one + mixed + mixed]
    assert [s.advantage for s in got.batch.groups[0].samples] == pytest.approx(
        [0.866025] * 2 + [-0.866025] * 2, abs=1e-5
    )


@pytest.mark.parametrize(
    ("mode", "kinds", "expected"),
    [
        # drop: round 1 = ['all', 'mixed'] (one chunk), round 2 = ['none'], round 3 = ['one']; the batch is
        # 'mixed' + 'one', x = r - mean_g = [.5, .5, -.5, -.5, .75, -.25, -.25, -.25], batch mean 0, sum sq 1.75,
        # unbiased std sqrt(1.75 / 7) = .5 -> 2x. (Normalised over round 1's chunk alone, 'mixed' would get
        # +-.5 / sqrt(1 / 7) = +-1.32.)
        ("drop", ["all", "mixed", "none", "one"], [1, 1, -1, -1, 1.5, -0.5, -0.5, -0.5]),
        # off: the batch is 'all' + 'mixed', x = [0] * 4 + [.5, .5, -.5, -.5], std sqrt(1 / 7): the constant group
        # stays 0 under batch whitening, 'mixed' gets +-.5 * sqrt(7)
        ("off", ["all", "mixed"], [0] * 4 + [0.5 * 7**0.5] * 2 + [-0.5 * 7**0.5] * 2),
    ],
)
def test_reinforce_pp_advantages_are_normalised_over_the_final_batch(grader, mode, kinds, expected):
    prompts, table = scripted_prompts(kinds)
    cfg = _cfg(mode, 2, max_rounds=4)
    cfg.algo.advantage = "reinforce_pp"
    got = collect(ScriptedEngine(table), feeder(prompts)[0], grader, cfg, step=1)
    assert [s.advantage for s in got.batch.samples] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "reinforce_pp"])
def test_every_estimator_keeps_the_groups_with_unequal_rewards(grader, estimator):
    # 'all' and 'none' are constant (dropped), 'mixed' and 'one' are not; each kept group trains on a nonzero
    # advantage and the dropped ones count as zero-advantage groups under every estimator
    prompts, table = scripted_prompts(["all", "mixed", "none", "one", "all", "mixed"])
    cfg = _cfg("drop", 3, max_rounds=1, oversample=2.0)
    cfg.algo.advantage = estimator
    got = collect(ScriptedEngine(table), feeder(prompts)[0], grader, cfg, step=1)
    assert [g.prompt.uid for g in got.batch.groups] == ["p1", "p3", "p5"]
    assert all(max(abs(s.advantage) for s in g.samples) > 0.1 for g in got.batch.groups)
    assert got.metrics["rollout/zero_adv_frac"] == pytest.approx(3 / 6)
