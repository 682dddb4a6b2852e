"""The rollout half of a step: sample groups, score them, and (dynamic sampling) keep only informative ones.

Dynamic sampling (DAPO, Yu et al. 2025, sec. 3.2) answers the study's finding that over half of GRPO
samples carry zero advantage (Mu et al. 2025): groups whose advantages are all zero are dropped and more
prompts are sampled until the batch holds `trainer.prompts_per_step` informative groups or
`algo.dynamic_sampling.max_rounds` rounds are spent. A round is split into chunks that run concurrently
on the engine; once the batch is full the chunks not yet started are cancelled and the running ones
aborted, so no surplus is generated for long.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from lcot_mega.algo.advantages import group_advantages
from lcot_mega.config import Config
from lcot_mega.reward.grader import Grader
from lcot_mega.reward.repetition import ends_in_loop
from lcot_mega.reward.score import score_batch
from lcot_mega.rollout.protocol import RolloutEngine, SamplingParams, to_samples
from lcot_mega.types import Batch, Group, Prompt, SampleStatus


class ShortfallError(RuntimeError):
    """Dynamic sampling ran out of rounds and `algo.dynamic_sampling.on_shortfall` is `stop`."""


@dataclass
class Collected:
    """The groups a step trains on (scored, advantages set) and what it took to get them."""

    batch: Batch
    metrics: dict[str, float] = field(default_factory=dict)


def sampling_params(cfg: Config, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        n=r.n_samples,
        stop=tuple(r.stop),
        seed=seed,
    )


def step_seed(cfg: Config, step: int, salt: int = 0) -> int:
    """A sampling seed that depends only on the run's seed, the step and `salt`: a resumed run draws the same."""
    base = cfg.rollout.seed if cfg.rollout.seed is not None else cfg.trainer.seed
    return (base * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


@dataclass(frozen=True)
class ScoreCounts:
    """What grading a round's groups found beyond the rewards themselves."""

    timeouts: int
    """Grades that ran out of reward.timeout_s (they score 0)."""
    shaped: int
    """Samples whose reward a shaping term (relative length, overlong, repetition) moved off the grader's."""


def score_groups(groups: list[Group], grader: Grader, cfg: Config) -> ScoreCounts:
    """Grade, shape and compute group-relative advantages in place (advantages are group-local)."""
    if not groups:
        return ScoreCounts(0, 0)
    batch = Batch(groups)
    grades = score_batch(batch, grader, cfg.reward, cfg.rollout.max_new_tokens)
    t = batch.tensors()
    batch.set_advantages(group_advantages(t.rewards, t.group_ids, cfg.algo.advantage, cfg.algo.adv_eps))
    shaped = sum(abs(s.reward - g.reward) > 1e-9 for s, g in zip(batch.samples, grades, strict=True))
    return ScoreCounts(sum(g.timed_out for g in grades), shaped)


def informative(group: Group, tol: float = 1e-8) -> bool:
    return any(abs(s.advantage) > tol for s in group.samples)


def _generate_groups(engine: RolloutEngine, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
    completions = engine.generate([p.token_ids for p in prompts], params)
    return [Group(p, to_samples(p, c)) for p, c in zip(prompts, completions, strict=True)]


class _Tally:
    """Counts of one collection, turned into the `rollout/*` metrics."""

    def __init__(self) -> None:
        self.groups = self.zero_groups = self.samples = self.tokens = self.truncated = self.aborted = 0
        self.correct = 0
        self.looping = 0  # responses whose tail is a repeated block (degenerate output)
        self.grade_timeouts = 0
        self.shaped = 0
        self.reward_sum = 0.0
        self.rounds = 0

    def add(self, groups: list[Group]) -> None:
        for g in groups:
            self.groups += 1
            self.zero_groups += not informative(g)
            for s in g.samples:
                self.samples += 1
                self.tokens += s.response_len
                self.truncated += s.truncated
                self.looping += ends_in_loop(s.response_ids)
                self.correct += s.correct
                self.reward_sum += s.reward

    def metrics(self, kept: Batch, target: int, seconds: float) -> dict[str, float]:
        n = max(self.samples, 1)
        kept_groups = len(kept.groups)
        return {
            "reward/mean": self.reward_sum / n,
            "reward/accuracy": self.correct / n,
            "reward/timeout_frac": self.grade_timeouts / n,
            "reward/shaped_frac": self.shaped / n,
            "rollout/groups_generated": float(self.groups),
            "rollout/groups_per_kept_group": self.groups / kept_groups if kept_groups else math.inf,
            "rollout/zero_adv_frac": self.zero_groups / max(self.groups, 1),
            "rollout/rounds": float(self.rounds),
            "rollout/shortfall": float(max(target - kept_groups, 0)),
            "rollout/aborted_groups": float(self.aborted),
            "rollout/response_len_mean": self.tokens / n,
            "rollout/truncated_frac": self.truncated / n,
            "rollout/repetition_frac": self.looping / n,
            "perf/rollout_s": seconds,
            "perf/rollout_tok_s": self.tokens / seconds if seconds > 0 else 0.0,
        }


def collect(
    engine: RolloutEngine,
    next_prompts: Callable[[int], list[Prompt]],
    grader: Grader,
    cfg: Config,
    step: int,
    *,
    parallelism: int = 1,
    reseed: int = 0,
) -> Collected:
    """Sample, score and select the groups of one step (see the module docstring).

    `next_prompts(k)` hands out the next k training prompts; `parallelism` is how many generate calls may
    run at once (the number of engines behind `engine`); `reseed` > 0 draws other sampling seeds for the same
    step (after a guard rollback).
    """
    ds, target = cfg.algo.dynamic_sampling, cfg.trainer.prompts_per_step
    start = time.perf_counter()
    tally, kept, spare = _Tally(), [], []
    max_rounds = 1 if ds.mode == "off" else ds.max_rounds
    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="rollout") as pool:
        while len(kept) < target and tally.rounds < max_rounds:
            need = target - len(kept)
            prompts = next_prompts(need if ds.mode == "off" else math.ceil(need * ds.oversample))
            _round(engine, prompts, grader, cfg, step, tally, kept, spare, pool, parallelism, target, reseed)
            tally.rounds += 1
    if len(kept) < target and ds.mode == "drop_with_fallback":
        kept.extend(spare[: target - len(kept)])
    batch = Batch(kept[:target])
    if len(batch.groups) < target and ds.on_shortfall == "stop":
        raise ShortfallError(
            f"dynamic sampling found {len(batch.groups)} informative groups of {target} in {tally.rounds} rounds"
            " (algo.dynamic_sampling.max_rounds); raise max_rounds/oversample or set on_shortfall=train"
        )
    _recompute_advantages(batch, cfg)
    return Collected(batch, tally.metrics(batch, target, time.perf_counter() - start))


def _round(
    engine: RolloutEngine,
    prompts: list[Prompt],
    grader: Grader,
    cfg: Config,
    step: int,
    tally: _Tally,
    kept: list[Group],
    spare: list[Group],
    pool: ThreadPoolExecutor,
    parallelism: int,
    target: int,
    reseed: int = 0,
) -> None:
    """One generation round, chunked over the engines; stops early (abort) once `kept` holds `target` groups."""
    size = max(1, math.ceil(len(prompts) / parallelism))
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    salt0 = tally.rounds * 1000 + reseed * 1_000_003
    futures = [
        pool.submit(_generate_groups, engine, chunk, sampling_params(cfg, step_seed(cfg, step, salt0 + i)))
        for i, chunk in enumerate(chunks)
    ]
    order = {f: i for i, f in enumerate(futures)}
    pending: set[Future] = set(futures)
    ready: dict[int, list[Group]] = {}
    next_index = 0  # chunks are scored in order, so the kept set does not depend on which engine was faster
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            ready[order[f]] = f.result()
        while next_index in ready:
            groups = [g for g in ready.pop(next_index) if not _aborted(g)]
            next_index += 1
            if _absorb(groups, grader, cfg, tally, kept, spare, target):
                _stop(engine, pending, tally)
                tally.aborted += sum(len(g) for g in ready.values())
                return


def _absorb(
    groups: list[Group], grader: Grader, cfg: Config, tally: _Tally, kept: list[Group], spare: list[Group], target: int
) -> bool:
    """Score a finished chunk and sort its groups into kept / spare; True when the batch is full."""
    counts = score_groups(groups, grader, cfg)
    tally.grade_timeouts += counts.timeouts
    tally.shaped += counts.shaped
    tally.add(groups)
    off = cfg.algo.dynamic_sampling.mode == "off"
    for g in groups:
        (kept if off or informative(g) else spare).append(g)
    return len(kept) >= target


def _aborted(group: Group) -> bool:
    return any(s.status is SampleStatus.ABORTED for s in group.samples)


def _stop(engine: RolloutEngine, pending: set[Future], tally: _Tally) -> None:
    """The batch is full: cancel chunks not started, abort running ones and drop what they return."""
    running = [f for f in pending if not f.cancel()]
    if running:
        engine.abort()
    for f in running:
        # an aborted request may fail on a server; its groups are surplus either way
        with contextlib.suppress(Exception):
            tally.aborted += len(f.result())


def _recompute_advantages(batch: Batch, cfg: Config) -> None:
    """Advantages over the final batch: equal to the per-chunk ones for group-local estimators, and correct for
    estimators that normalise over the batch (REINFORCE++'s)."""
    if not batch.groups:
        return
    t = batch.tensors()
    batch.set_advantages(group_advantages(t.rewards, t.group_ids, cfg.algo.advantage, cfg.algo.adv_eps))
