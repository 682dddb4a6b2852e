"""Offline injection on the rollout path: which samples are replaced, what the group's rewards and advantages become,
what is refused, and what the actor is handed. Scripted engine (tests/trainer/test_collect.py), real grader,
the tiny models' one-character tokenizer; expected advantages worked by hand (GRPO, unbiased std).
"""

from __future__ import annotations

import pytest
from helpers.scripted_engine import G, ScriptedEngine, feeder, scripted_prompts

from lcot_mega.config import ConfigError, config_from_dict
from lcot_mega.reward.grader import Grader
from lcot_mega.trainer.collect import collect
from lcot_mega.trainer.inject import OfflineInjector
from lcot_mega.trainer.update import select_for_update, to_train_batch
from lcot_mega.types import SampleStatus

RIGHT, WRONG = "I add them. \\boxed{1}", "I add them. \\boxed{7}"  # every scripted prompt's answer is "1"


def _cfg(mode: str = "drop", target: int = 2, alpha: float = 0.125, max_new_tokens: int = 64, **algo):
    return config_from_dict(
        {
            "rollout": {"n_samples": G, "max_new_tokens": max_new_tokens},
            "algo": {
                "dynamic_sampling": {"mode": mode, "max_rounds": 1},
                "injection": {"enabled": True, "alpha": alpha},
                **algo,
            },
            "trainer": {"prompts_per_step": target},
        }
    )


@pytest.fixture(scope="module")
def grader():
    with Grader("math", num_workers=1) as g:
        yield g


def _run(kinds, solutions, cfg, grader, char_tok):
    prompts, table = scripted_prompts(kinds)
    injector = OfflineInjector(solutions, char_tok, cfg)
    next_prompts, _ = feeder(prompts)
    return collect(ScriptedEngine(table), next_prompts, grader, cfg, step=1, injector=injector), injector


def test_an_all_wrong_group_gets_the_solution_in_its_first_sample_and_becomes_trainable(grader, char_tok):
    got, _ = _run(["none", "mixed"], {"p0": RIGHT}, _cfg(), grader, char_tok)
    hard, mixed = got.batch.groups  # without injection the all-wrong p0 would be dropped as zero-advantage
    first = hard.samples[0]
    assert first.offline and first.correct and first.reward == 1.0 and first.status is SampleStatus.COMPLETED
    assert first.response_text == RIGHT and first.rollout_logprobs is None
    assert first.response_ids == char_tok(RIGHT, add_special_tokens=False)["input_ids"] + [char_tok.eos_token_id]
    assert [s.offline for s in hard.samples[1:]] == [False] * 3 and not any(s.offline for s in mixed.samples)
    # rewards [1, 0, 0, 0]: mean 0.25, unbiased std 0.5 -> (1 - 0.25) / 0.5 = 1.5 and -0.5
    assert [s.advantage for s in hard.samples] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    m = got.metrics
    assert (m["injection/replaced"], m["injection/groups"], m["injection/rejected"]) == (1, 1, 0)
    # the rollout tally is what the policy sampled: p0 all wrong and zero-advantage, p1 half right
    assert m["reward/accuracy"] == pytest.approx(2 / 8) and m["rollout/zero_adv_frac"] == pytest.approx(1 / 2)


def test_only_groups_at_or_below_alpha_with_a_solution_are_touched(grader, char_tok):
    solutions = {"p0": RIGHT, "p1": RIGHT}
    got, _ = _run(["one", "one", "none"], solutions, _cfg(mode="off", target=3), grader, char_tok)
    assert not any(s.offline for s in got.batch)  # accuracy 0.25 > alpha; p2 has no solution
    got, _ = _run(["one", "mixed"], solutions, _cfg(mode="off", alpha=0.25), grader, char_tok)
    one, mixed = got.batch.groups
    # the earliest incorrect sample of '1000' is the second one; '1100' (accuracy 0.5) is left alone
    assert [s.offline for s in one.samples] == [False, True, False, False]
    assert not any(s.offline for s in mixed.samples)
    # rewards [1, 1, 0, 0]: mean 0.5, unbiased std sqrt(1/3) -> +-0.866
    assert [s.advantage for s in one.samples] == pytest.approx([0.866025, 0.866025, -0.866025, -0.866025], abs=1e-5)


def test_a_solution_the_grader_refuses_is_never_injected_and_not_offered_again(grader, char_tok):
    prompts, table = scripted_prompts(["none", "mixed"])
    cfg = _cfg(mode="off")
    injector = OfflineInjector({"p0": WRONG}, char_tok, cfg)
    engine = ScriptedEngine(table)
    got = collect(engine, feeder(prompts)[0], grader, cfg, step=1, injector=injector)
    hard = got.batch.groups[0]
    assert not any(s.offline for s in hard.samples) and [s.reward for s in hard.samples] == [0.0] * 4
    assert [s.rollout_logprobs for s in hard.samples] == [[-0.5, -0.5]] * 4  # the sampled responses are back
    assert (got.metrics["injection/replaced"], got.metrics["injection/rejected"]) == (0, 1)
    assert injector.solution("p0") is None
    again = collect(engine, feeder(prompts)[0], grader, cfg, step=2, injector=injector)
    assert again.metrics["injection/rejected"] == 0 and not any(s.offline for s in again.batch)


def test_a_solution_longer_than_max_new_tokens_is_skipped(grader, char_tok):
    cfg = _cfg(mode="off", max_new_tokens=len(RIGHT))  # the solution plus EOS is one token too long
    got, injector = _run(["none"], {"p0": RIGHT}, cfg, grader, char_tok)
    assert not any(s.offline for s in got.batch) and injector.too_long == {"p0"}
    assert got.metrics["injection/replaced"] == 0
    cfg = _cfg(mode="off", max_new_tokens=len(RIGHT) + 1)
    assert any(s.offline for s in _run(["none"], {"p0": RIGHT}, cfg, grader, char_tok)[0].batch)


def test_no_solutions_at_all_is_a_config_error(char_tok):
    with pytest.raises(ConfigError, match="no training prompt has an offline solution"):
        OfflineInjector({}, char_tok, _cfg())


@pytest.mark.parametrize(("polarity", "trained"), [("both", 1), ("negative", 0)])
def test_the_actor_gets_the_offline_flag_and_the_update_share(grader, char_tok, polarity, trained):
    got, _ = _run(["none", "mixed"], {"p0": RIGHT}, _cfg(polarity=polarity), grader, char_tok)
    batch, m = select_for_update(got.batch, got_cfg := _cfg(polarity=polarity).algo, seed=0)
    assert got_cfg.injection.enabled and m["injection/trained"] == trained
    update = to_train_batch(batch, temperature=1.0)
    if trained:
        assert update.offline == [True, False, False, False, False, False, False, False]
        solution_len = len(RIGHT) + 1
        assert update.rollout_logprobs[0].tolist() == [0.0] * solution_len  # placeholder, never read
        assert m["injection/token_share"] == pytest.approx(solution_len / (solution_len + 7 * 2))
        # |A| mass: 1.5 of the solution; 3 x 0.5 in p0 and 4 x 0.866 in p1
        assert m["injection/adv_share"] == pytest.approx(1.5 / (1.5 + 1.5 + 4 * 0.866025), abs=1e-5)
    else:  # negative-only drops the correct samples, the injected one included
        assert update.offline is None and m["injection/token_share"] == 0.0
        assert all(lp.numel() == 2 for lp in update.rollout_logprobs)
