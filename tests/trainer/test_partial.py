"""Partial rollout (`rollout.partial`): responses sampled in token windows, unfinished ones carried into the next
step and continued under newer weights.

The scheduling tests use an engine whose every response has a length fixed by its prompt, so which groups finish in
which window is known by hand; grading goes through the real grader. The continuation tests use the real embedded
engine: a response continued window by window is the response sampled whole (greedy), and a response continued
across a weight update carries, per token, the version and the log-prob of the weights that sampled it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
import torch
from helpers.tiny_models import SHARP_LONG, make_tiny_hf, save_char_tokenizer
from transformers import AutoModelForCausalLM

from lcot_mega.config import Config, config_from_dict
from lcot_mega.reward.grader import Grader
from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import Completion, SamplingParams
from lcot_mega.trainer.partial import MAX_SPAN, METRIC_KEYS, OpenResponse, PartialRollout, window_tokens
from lcot_mega.types import Prompt, SampleStatus

BASE = 1000  # token p of sample j is (j + 1) * BASE + p: a continued response says which sample it is


class LengthEngine:
    """Prompt (i, L0, L1): sample j of it is L_j tokens long and ends COMPLETED; a call's budget cuts it (TRUNCATED)
    first. A continuation's context is the prompt + the tokens so far, which say which sample it is and where.
    Log-probs say the version: -(version + 1) / 100 per token."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len, self.version = prompt_len, 0
        self.started: dict[tuple[int, ...], int] = {}  # a new response is sample j of its prompt: the j-th request

    @property
    def weight_version(self) -> int:
        return self.version

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        assert params.n == 1  # a partial rollout asks for one response per request
        out = []
        for ctx in prompt_ids:
            prompt, so_far = tuple(ctx[: self.prompt_len]), ctx[self.prompt_len :]
            if so_far:
                j = so_far[0] // BASE - 1
            else:
                j = self.started.get(prompt, 0)
                self.started[prompt] = j + 1
            length, done = prompt[1 + j], len(so_far)
            n = min(length - done, params.max_new_tokens)
            status = SampleStatus.COMPLETED if done + n == length else SampleStatus.TRUNCATED
            ids = [(j + 1) * BASE + done + p for p in range(n)]
            lp = [-(self.version + 1) / 100] * n
            out.append([Completion(ids, lp, status, text=_decode(ids), weight_version=self.version)])
        return out

    def abort(self) -> None:
        pass


def _decode(ids: Sequence[int]) -> str:
    """Correct (answer 1) when the response has an odd number of tokens."""
    return f"\\boxed{{{len(ids) % 2}}}"


def _cfg(target: int, max_new: int, window: int, **ds) -> Config:
    return config_from_dict(
        {
            "rollout": {
                "n_samples": 2,
                "max_new_tokens": max_new,
                "partial": True,
                "partial_window": window,
                "partial_oversubscribe": 1.5,
            },
            "algo": {"dynamic_sampling": {"mode": ds.pop("mode", "off"), **ds}},
            "trainer": {"prompts_per_step": target, "max_staleness": 1},
        }
    )


@pytest.fixture(scope="module")
def grader():
    with Grader("math", num_workers=1) as g:
        yield g


def _prompts(lengths: list[tuple[int, int]]):
    """Prompt i with samples of the given lengths (distinct within a group), and a feeder that logs what it drew."""
    prompts = [Prompt(f"p{i}", f"q{i}", "1", (i, *ls)) for i, ls in enumerate(lengths)]
    drawn: list[str] = []

    def next_prompts(k: int) -> list[Prompt]:
        out = prompts[len(drawn) : len(drawn) + k]
        drawn.extend(p.uid for p in out)
        return out

    return next_prompts, drawn


def _steps(carry: PartialRollout, engine, next_prompts, grader, cfg, steps: int, first: int = 1):
    """The driver's k=1 partial schedule: collect step t with the weights of step t-1, then the update syncs t."""
    out = []
    for step in range(first, first + steps):
        out.append(carry.collect(engine, next_prompts, grader, cfg, step))
        engine.version = step
    return out


def test_windows_fill_the_batch_from_the_first_groups_to_finish_and_carry_the_rest_once(grader):
    # window 4, responses up to 12 tokens; 2 groups a step, 3 started (oversubscribe 1.5)
    lengths = [(3, 2), (12, 11), (5, 4), (3, 4), (9, 12), (2, 3), (4, 3), (3, 2), (2, 1), (1, 2)]
    next_prompts, _ = _prompts(lengths)
    cfg = _cfg(target=2, max_new=12, window=4)
    engine, carry = LengthEngine(3), PartialRollout(cfg, _decode)
    s1, s2, s3 = _steps(carry, engine, next_prompts, grader, cfg, 3)

    # step 1 (version 0): p0 and p2 finish in window 1 (all samples <= 4... p2 has 5: window 2), p1 needs 3 windows
    assert [g.prompt.uid for g in s1.batch.groups] == ["p0", "p2"]
    assert s1.metrics["rollout/windows"] == 2.0 and s1.metrics["rollout/open_groups"] == 1.0
    assert set(METRIC_KEYS) <= set(s1.metrics)  # documented in docs/METRICS.md (tests/observe)
    # step 2 (version 1): p1 was carried (8 of 12 tokens at version 0) and must finish; p3 and p4 were drawn
    assert [g.prompt.uid for g in s2.batch.groups] == ["p1", "p3"]
    p1 = s2.batch.groups[0].samples
    assert p1[0].token_versions == [0] * 8 + [1] * 4 and p1[0].weight_version == 0
    assert p1[0].rollout_logprobs == [-0.01] * 8 + [-0.02] * 4
    assert p1[0].response_ids == [BASE + p for p in range(12)] and p1[0].status is SampleStatus.COMPLETED
    assert p1[0].response_text == _decode(p1[0].response_ids)  # decoded whole, not per window
    assert s2.metrics["rollout/carried_in_groups"] == 1.0 and s2.metrics["rollout/multi_version_frac"] == 0.5
    # p4 (9 and 12 tokens) is still open: it goes on at step 3 under version 2 and finishes there
    assert s2.metrics["rollout/open_groups"] == 1.0
    assert "p4" in [g.prompt.uid for g in s3.batch.groups]
    for step, c in enumerate((s1, s2, s3), start=1):  # the k = 1 bound: no token older than the step's weights - 1
        for s in c.batch.samples:
            assert step - 1 - min(s.token_versions or [s.weight_version]) <= 1


def test_every_drawn_group_is_trained_once_dropped_with_a_count_or_still_carried(grader):
    lengths = [((i * 7) % 13 + 1, (i * 5) % 11 + 2) for i in range(60)]
    lengths = [(a, b if b != a else b + 1) for a, b in lengths]
    next_prompts, drawn = _prompts(lengths)
    cfg = _cfg(target=3, max_new=12, window=3, mode="drop", max_rounds=3)
    engine, carry = LengthEngine(3), PartialRollout(cfg, _decode)
    out = _steps(carry, engine, next_prompts, grader, cfg, 8)
    trained = [g.prompt.uid for c in out for g in c.batch.groups]
    assert len(trained) == len(set(trained))  # never twice
    zero = sum(c.metrics["rollout/zero_adv_frac"] * c.metrics["rollout/groups_generated"] for c in out)
    dropped = carry.dropped_groups + round(zero)
    still = len(carry.open) + len(carry.ready)
    assert len(trained) + dropped + still == len(drawn)
    assert all(o.span < MAX_SPAN for o in carry.open)


def test_the_carried_state_round_trips_through_json_and_resumes_the_same_samples(grader):
    lengths = [((i * 7) % 13 + 1, (i * 5) % 11 + 2) for i in range(40)]
    lengths = [(a, b if b != a else b + 1) for a, b in lengths]
    cfg = _cfg(target=3, max_new=12, window=3)
    straight_prompts, _ = _prompts(lengths)
    engine, carry = LengthEngine(3), PartialRollout(cfg, _decode)
    want = _steps(carry, engine, straight_prompts, grader, cfg, 5)

    resumed_prompts, _ = _prompts(lengths)
    engine2, first = LengthEngine(3), PartialRollout(cfg, _decode)
    _steps(first, engine2, resumed_prompts, grader, cfg, 2)
    assert first.open or first.ready  # something is carried across the checkpoint
    second = PartialRollout(cfg, _decode)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got = _steps(second, engine2, resumed_prompts, grader, cfg, 3, first=3)
    for a, b in zip(want[2:], got, strict=True):
        assert [g.prompt.uid for g in a.batch.groups] == [g.prompt.uid for g in b.batch.groups]
        for x, y in zip(a.batch.samples, b.batch.samples, strict=True):
            assert (x.response_ids, x.rollout_logprobs, x.token_versions, x.reward, x.advantage) == (
                y.response_ids,
                y.rollout_logprobs,
                y.token_versions,
                y.reward,
                y.advantage,
            )


def test_a_discard_drops_and_counts_everything_carried(grader):
    next_prompts, _ = _prompts([(3, 2), (12, 11), (5, 4), (3, 4)])
    cfg = _cfg(target=1, max_new=12, window=4)
    carry = PartialRollout(cfg, _decode)
    carry.collect(LengthEngine(3), next_prompts, grader, cfg, 1)
    held = len(carry.open) + len(carry.ready)
    assert held == 1 and carry.discard() == held and carry.dropped_groups == held
    assert not carry.open and not carry.ready


def test_the_window_defaults_to_a_quarter_of_the_response_limit():
    cfg = config_from_dict({"rollout": {"max_new_tokens": 10, "partial": True}})
    assert window_tokens(cfg) == 2
    assert window_tokens(config_from_dict({"rollout": {"max_new_tokens": 3, "partial_window": 0}})) == 1


def test_a_stop_string_split_across_two_windows_ends_the_response_where_it_completes():
    chars = "xyzabq"
    decode = lambda ids: "".join(chars[i] for i in ids)  # noqa: E731
    carry = PartialRollout(_cfg(1, 12, 4), decode)
    s = OpenResponse(ids=[0, 1, 3, 4, 2, 5], logprobs=[-0.1] * 6, versions=[0, 0, 0, 1, 1, 1])  # "xya" + "bzq"
    carry.split_stop(s, ["ab", "q"])
    assert s.ids == [0, 1, 3, 4] and s.versions == [0, 0, 0, 1] and len(s.logprobs) == 4
    assert s.status is SampleStatus.COMPLETED and s.matched == "ab"
    untouched = OpenResponse(ids=[0, 1, 2], logprobs=[-0.1] * 3, versions=[0] * 3)
    carry.split_stop(untouched, ["ab"])
    assert untouched.status is None and len(untouched.ids) == 3


# ----------------------------------------------------------------------------- the real embedded engine


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    d = make_tiny_hf(tmp_path_factory.mktemp("sharp"), "llama", seed=3, **SHARP_LONG)
    save_char_tokenizer(d)
    return d


def _engine(model_dir) -> EmbeddedEngine:
    return EmbeddedEngine(str(model_dir), dtype=torch.float32, seed=0)


def _real_cfg(temperature: float, target: int, stop: list[str]) -> Config:
    return config_from_dict(
        {
            "rollout": {
                "n_samples": 2,
                "max_new_tokens": 12,
                "temperature": temperature,
                "stop": stop,
                "partial": True,
                "partial_window": 4,
            },
            "trainer": {"prompts_per_step": target, "max_staleness": 1},
        }
    )


def test_a_greedy_response_continued_window_by_window_is_the_response_sampled_whole(sharp_dir, grader):
    engine = _engine(sharp_dir)
    cfg = _real_cfg(0.0, target=2, stop=["k"])
    prompts = [Prompt(f"p{i}", "", "1", tuple(range(3 + i, 9 + i))) for i in range(12)]
    queue = list(prompts)
    carry = PartialRollout(cfg, lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))
    trained = []
    for step in range(1, 4):
        got = carry.collect(engine, lambda k: [queue.pop(0) for _ in range(min(k, len(queue)))], grader, cfg, step)
        trained += got.batch.groups
    assert any(s.response_len > 4 for g in trained for s in g.samples)  # some were continued
    whole = SamplingParams(max_new_tokens=12, temperature=0.0, n=1, stop=("k",))
    for g in trained:
        ref = engine.generate([g.prompt.token_ids], whole)[0][0]
        for s in g.samples:
            assert s.response_ids == ref.token_ids and s.status is ref.finish and s.response_text == ref.text


def test_a_response_continued_across_a_weight_update_keeps_each_tokens_version_and_log_prob(sharp_dir, grader):
    old, engine = _engine(sharp_dir), _engine(sharp_dir)
    cfg = _real_cfg(1.0, target=1, stop=[c for c in "abcdefghij"])
    queue = [Prompt(f"p{i}", "", "1", tuple(range(5 + i, 11 + i))) for i in range(20)]
    carry = PartialRollout(cfg, lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))
    first = carry.collect(engine, lambda k: [queue.pop(0) for _ in range(k)], grader, cfg, 1)
    assert carry.open, "nothing was carried: the test needs a response longer than the first step's windows"
    gen = torch.Generator().manual_seed(0)
    weights = AutoModelForCausalLM.from_pretrained(sharp_dir, dtype=torch.float32).state_dict()
    engine.update_weights([(n, w + 0.05 * torch.randn(w.shape, generator=gen)) for n, w in weights.items()], 1)
    second = carry.collect(engine, lambda k: [queue.pop(0) for _ in range(k)], grader, cfg, 2)
    mixed = [s for s in second.batch.samples + first.batch.samples if s.token_versions]
    assert mixed, "no trained response spans two versions"
    for s in mixed:
        a = s.token_versions.index(1)
        assert s.token_versions == [0] * a + [1] * (s.response_len - a) and s.weight_version == 0
        before = old.score(s.prompt_ids, s.response_ids)[:a]
        after = engine.score(s.prompt_ids, s.response_ids)[a:]
        torch.testing.assert_close(torch.tensor(s.rollout_logprobs), torch.cat([before, after]), atol=1e-4, rtol=0)
        assert math.isfinite(sum(s.rollout_logprobs))
