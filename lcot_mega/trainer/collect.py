"""The rollout half of a step: sample groups, score them, and (dynamic sampling) keep only informative ones.

Dynamic sampling (DAPO, Yu et al. 2025, sec. 3.2) answers the study's finding that over half of GRPO
samples carry zero advantage (Mu et al. 2025): groups whose advantages are all zero are dropped and more
prompts are sampled until the batch holds `trainer.prompts_per_step` informative groups or
`algo.dynamic_sampling.max_rounds` rounds are spent. A round is split into chunks that run concurrently
on the engine; once the batch is full the chunks not yet started are cancelled and the running ones
aborted, so no surplus is generated for long.

Which groups are informative is decided from rewards (`algo.selection.informative_groups`): every advantage
estimator gives a group all-zero advantages exactly when its rewards are equal. Advantages are then computed
once, over the groups that train, which is also what estimators that normalise over the batch (REINFORCE++)
need. One `DynamicSampler` per step owns the kept and spare groups and the tally.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lcot_mega.algo.advantages import group_advantages
from lcot_mega.algo.selection import informative_groups
from lcot_mega.config import Config
from lcot_mega.reward.grader import Grader
from lcot_mega.reward.repetition import ends_in_loop
from lcot_mega.reward.score import score_batch
from lcot_mega.rollout.protocol import RolloutEngine, SamplingParams, to_samples
from lcot_mega.types import Batch, Group, Prompt, SampleStatus

if TYPE_CHECKING:
    from lcot_mega.trainer.inject import InjectionCounts, OfflineInjector


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
        ignore_eos=r.ignore_eos,
        seed=seed,
        return_routed_experts=cfg.actor.routing_replay == "rollout",
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
    """Grade and shape the rewards of `groups` in place; advantages come later, once, over the final batch."""
    if not groups:
        return ScoreCounts(0, 0)
    batch = Batch(groups)
    grades = score_batch(batch, grader, cfg.reward, cfg.rollout.max_new_tokens)
    shaped = sum(abs(s.reward - g.reward) > 1e-9 for s, g in zip(batch.samples, grades, strict=True))
    return ScoreCounts(sum(g.timed_out for g in grades), shaped)


def informative_flags(groups: list[Group]) -> list[bool]:
    """Per group: whether its rewards differ, i.e. whether it carries any nonzero advantage (scored groups)."""
    t = Batch(groups).tensors()
    ids = set(informative_groups(t.rewards, t.group_ids).tolist())
    return [i in ids for i in range(len(groups))]


def set_advantages(batch: Batch, cfg: Config) -> None:
    """The step's one advantage computation, over the groups that train (`algo.advantage`)."""
    t = batch.tensors()
    batch.set_advantages(group_advantages(t.rewards, t.group_ids, cfg.algo.advantage, cfg.algo.adv_eps))


def _generate_groups(engine: RolloutEngine, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
    completions = engine.generate([p.token_ids for p in prompts], params)
    return [Group(p, to_samples(p, c)) for p, c in zip(prompts, completions, strict=True)]


def _aborted(group: Group) -> bool:
    return any(s.status is SampleStatus.ABORTED for s in group.samples)


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
        self.injection: InjectionCounts | None = None  # what algo.injection did, when it is on

    def add(self, groups: list[Group], informative: list[bool], counts: ScoreCounts) -> None:
        self.grade_timeouts += counts.timeouts
        self.shaped += counts.shaped
        for g, flag in zip(groups, informative, strict=True):
            self.groups += 1
            self.zero_groups += not flag
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
        } | (self.injection.metrics() if self.injection is not None else {})


class DynamicSampler:
    """One step of dynamic sampling: runs rounds until `trainer.prompts_per_step` groups are kept (see the module
    docstring), owning the kept and spare groups and the tally.

    Only generation runs on the worker threads; scoring, sorting and counting run on the caller's thread, chunk by
    chunk in submission order, so the kept set does not depend on which engine finished first.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        grader: Grader,
        cfg: Config,
        step: int,
        *,
        reseed: int = 0,
        parallelism: int = 1,
        injector: OfflineInjector | None = None,
    ) -> None:
        self.engine, self.grader, self.cfg, self.step = engine, grader, cfg, step
        self.reseed, self.parallelism, self.injector = reseed, parallelism, injector
        self.ds, self.target = cfg.algo.dynamic_sampling, cfg.trainer.prompts_per_step
        self.kept: list[Group] = []
        self.spare: list[Group] = []  # scored groups without signal: the drop_with_fallback top-up
        self.tally = _Tally()

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.target

    def run(self, next_prompts: Callable[[int], list[Prompt]]) -> Collected:
        """Generate, score and select the step's groups; advantages are set once, on the returned batch."""
        start = time.perf_counter()
        max_rounds = 1 if self.ds.mode == "off" else self.ds.max_rounds
        with ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="rollout") as pool:
            while not self.full and self.tally.rounds < max_rounds:
                self._round(pool, next_prompts(self._prompts_wanted()))
                self.tally.rounds += 1
        batch = self._final_batch()
        set_advantages(batch, self.cfg)
        return Collected(batch, self.tally.metrics(batch, self.target, time.perf_counter() - start))

    def _prompts_wanted(self) -> int:
        need = self.target - len(self.kept)
        return need if self.ds.mode == "off" else math.ceil(need * self.ds.oversample)

    def _round(self, pool: ThreadPoolExecutor, prompts: list[Prompt]) -> None:
        """One generation round, chunked over the engines; stops early (abort) once the batch is full."""
        size = max(1, math.ceil(len(prompts) / self.parallelism))
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        salt0 = self.tally.rounds * 1000 + self.reseed * 1_000_003
        seeds = [step_seed(self.cfg, self.step, salt0 + i) for i in range(len(chunks))]
        futures = [
            pool.submit(_generate_groups, self.engine, chunk, sampling_params(self.cfg, seed))
            for chunk, seed in zip(chunks, seeds, strict=True)
        ]
        for i, future in enumerate(futures):
            self._absorb([g for g in future.result() if not _aborted(g)])
            if self.full:
                self._stop(futures[i + 1 :])
                return

    def _absorb(self, groups: list[Group]) -> None:
        """Score a finished chunk, count it, inject offline solutions (`algo.injection`) and sort its groups into
        kept / spare. The tally counts what the policy sampled; selection sees the groups after injection."""
        counts = score_groups(groups, self.grader, self.cfg)
        flags = informative_flags(groups)
        self.tally.add(groups, flags, counts)
        if self.injector is not None:
            done = self.injector.inject(groups, self.grader)
            self.tally.injection = done if self.tally.injection is None else self.tally.injection + done
            flags = informative_flags(groups)
        for g, flag in zip(groups, flags, strict=True):
            (self.kept if flag or self.ds.mode == "off" else self.spare).append(g)

    def _stop(self, rest: list[Future]) -> None:
        """The batch is full: cancel chunks not started, abort running ones and count what the rest returned."""
        started = [f for f in rest if not f.cancel()]
        if any(not f.done() for f in started):
            self.engine.abort()
        for f in started:
            # an aborted request may fail on a server; its groups are surplus either way
            with contextlib.suppress(Exception):
                self.tally.aborted += len(f.result())

    def _final_batch(self) -> Batch:
        kept = self.kept
        if not self.full and self.ds.mode == "drop_with_fallback":
            kept = kept + self.spare[: self.target - len(kept)]
        batch = Batch(kept[: self.target])
        if len(batch.groups) < self.target and self.ds.on_shortfall == "stop":
            raise ShortfallError(
                f"dynamic sampling found {len(batch.groups)} informative groups of {self.target} in"
                f" {self.tally.rounds} rounds (algo.dynamic_sampling.max_rounds); raise max_rounds/oversample"
                " or set on_shortfall=train"
            )
        return batch


def collect(
    engine: RolloutEngine,
    next_prompts: Callable[[int], list[Prompt]],
    grader: Grader,
    cfg: Config,
    step: int,
    *,
    parallelism: int = 1,
    reseed: int = 0,
    injector: OfflineInjector | None = None,
) -> Collected:
    """Sample, score and select the groups of one step (see the module docstring).

    `next_prompts(k)` hands out the next k training prompts; `parallelism` is how many generate calls may
    run at once (the number of engines behind `engine`); `reseed` > 0 draws other sampling seeds for the same
    step (after a guard rollback); `injector` replaces wrong responses of hard groups by offline solutions
    (`algo.injection`, `lcot_mega.trainer.inject`).
    """
    sampler = DynamicSampler(engine, grader, cfg, step, reseed=reseed, parallelism=parallelism, injector=injector)
    return sampler.run(next_prompts)
