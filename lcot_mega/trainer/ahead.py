"""Rollout ahead of training (`trainer.max_staleness` = k > 0): the rollout engine samples the batches of the next
steps while the actor trains on this one, under a bound on how old the weights that sampled a trained token are.

The schedule is fixed, so a run is reproducible and resumable to the sample: while the actor trains step t on
weights version t-1, the engine samples step t+k's batch with the weights it holds (version t-1); the driver
waits for that batch, then syncs version t. Step t+k thus trains on samples k updates old (fewer when a skipped
update left the weights unchanged), and the first k steps on fresher ones. A group with a sample more than k
updates older than the weights it would train is dropped and counted (`rollout/stale_dropped_groups`): a safety
net that this schedule never trips, since a rollback drops the batches it made obsolete itself (`discard`).

Every prompt drawn is trained once or dropped with a counted reason: the batches sampled ahead are complete
between steps (nothing is in flight when the driver saves, evaluates or stops) and go into the checkpoint with
the data position that already counts their prompts, so a run killed anywhere resumes on the very samples an
uninterrupted run would train (tests/trainer/test_ahead.py). AReaL (Fu et al. 2025) and verl's one-step-off-policy
recipe bound staleness the same way; overlap buys time where the engine and the actor do not share the cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress

from lcot_mega.rollout.protocol import RolloutEngine
from lcot_mega.trainer.collect import Collected
from lcot_mega.trainer.serialize import group_from_json, group_to_json
from lcot_mega.types import Batch

CollectFn = Callable[[int], Collected]
"""Samples, scores and selects the batch of a step (`collect.collect` bound to the run's engine and data)."""


class RolloutAhead:
    """The batches sampled ahead of the actor: at most `depth` of them, for steps up to `last_step`; a trained token
    may be `bound` updates old (default `depth`; one more with partial rollout, which carries responses into the
    next step, `lcot_mega.trainer.partial`, and may sample no step ahead: depth 0)."""

    def __init__(self, depth: int, last_step: int, engine: RolloutEngine, bound: int | None = None) -> None:
        bound = depth if bound is None else bound
        if depth < 0 or bound < max(depth, 1):
            raise ValueError(f"need 0 <= depth <= bound and bound >= 1, got depth {depth}, bound {bound}")
        self.depth, self.bound, self.last_step, self.engine = depth, bound, last_step, engine
        self.pending: dict[int, Collected] = {}
        self.version = 0
        """The weights version the engine holds (the last sync; versions are step numbers)."""
        self._ordinal: dict[int, int] = {0: 0}
        """Recent versions -> how many syncs preceded them: staleness counts updates, and a skipped update (no
        sync) makes the next version number jump by 2 without a second update."""
        self.dropped_groups = 0
        """Groups dropped since the start of the run (stale, or made obsolete by a rollback)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self._running: Future | None = None
        self._started_at = 0.0

    def take(self, step: int, collect_fn: CollectFn) -> Collected:
        """The batch of `step`: the one sampled ahead, or sampled now (the first step, after a rollback); groups
        over the staleness bound are dropped; staleness metrics are added."""
        if self._running is not None:
            raise RuntimeError("take() while a batch is still being sampled ahead: join() it first")
        collected = self.pending.pop(step, None)
        if collected is None:
            collected = collect_fn(step)
        return self._bounded(collected)

    def start(self, step: int, collect_fn: CollectFn) -> None:
        """Sample, in the background and in step order, the batches of steps step+1 .. step+depth not yet pending."""
        todo = [j for j in range(step + 1, min(step + self.depth, self.last_step) + 1) if j not in self.pending]
        if not todo:
            return
        self._started_at = time.perf_counter()
        self._running = self._pool.submit(lambda: [(j, collect_fn(j)) for j in todo])

    def join(self) -> dict[str, float]:
        """Wait for the batches being sampled ahead; how long the actor waited for them and how long they took."""
        if self._running is None:
            return {"perf/rollout_wait_s": 0.0}
        t0 = time.perf_counter()
        try:
            batches = self._running.result()
        finally:
            self._running = None
        self.pending.update(batches)
        now = time.perf_counter()
        return {"perf/rollout_wait_s": now - t0, "perf/rollout_ahead_s": now - self._started_at}

    def synced(self, version: int) -> None:
        """The engine now holds `version` (a sync, a resume or a rollback)."""
        if version != self.version or version not in self._ordinal:
            self._ordinal[version] = max(self._ordinal.values(), default=0) + 1
        self.version = version
        oldest = self._ordinal[version] - self.bound - 1  # older ones are over the bound whatever their number
        self._ordinal = {v: n for v, n in self._ordinal.items() if n >= oldest}

    def age(self, weight_version: int) -> int:
        """Updates between the weights that sampled a token (`weight_version`) and the engine's current ones; the
        difference of version numbers (at least that many updates) for a version older than this keeps."""
        if weight_version in self._ordinal:
            return self._ordinal[self.version] - self._ordinal[weight_version]
        return self.version - weight_version

    def discard(self) -> int:
        """Drop every batch sampled ahead (a rollback made their weights obsolete); the groups dropped."""
        n = sum(len(c.batch.groups) for c in self.pending.values())
        self.pending.clear()
        self.dropped_groups += n
        return n

    def close(self) -> None:
        """Stop sampling ahead (abort what is in flight) and wait for the worker; safe to call twice."""
        if self._running is not None and not self._running.done():
            with suppress(Exception):
                self.engine.abort()
        if self._running is not None:
            with suppress(Exception):
                self._running.result()
            self._running = None
        self._pool.shutdown(wait=True)

    def _bounded(self, collected: Collected) -> Collected:
        groups, dropped, ages = [], 0, []
        for g in collected.batch.groups:
            group_ages = [self.age(s.weight_version) for s in g.samples if not s.offline]
            if group_ages and max(group_ages) > self.bound:
                dropped += 1
                continue
            groups.append(g)
            ages += group_ages
        self.dropped_groups += dropped
        metrics = {
            "rollout/staleness_mean": sum(ages) / len(ages) if ages else 0.0,
            "rollout/staleness_max": float(max(ages, default=0)),
            "rollout/stale_dropped_groups": float(dropped),
            "rollout/dropped_groups_total": float(self.dropped_groups),
        }
        return Collected(Batch(groups), collected.metrics | metrics)

    def state_dict(self) -> dict:
        """JSON: the batches sampled ahead (every field the update reads, floats exact), the version, the count."""
        if self._running is not None:
            raise RuntimeError("state_dict() while a batch is still being sampled ahead: join() it first")
        return {
            "pending": {str(step): _collected_to_json(c) for step, c in sorted(self.pending.items())},
            "version": self.version,
            "ordinal": {str(v): n for v, n in self._ordinal.items()},
            "dropped_groups": self.dropped_groups,
        }

    def load_state_dict(self, state: dict) -> None:
        self.pending = {int(step): _collected_from_json(c) for step, c in state.get("pending", {}).items()}
        self.version = int(state.get("version", 0))
        self._ordinal = {int(v): int(n) for v, n in state.get("ordinal", {"0": 0}).items()}
        self._ordinal.setdefault(self.version, max(self._ordinal.values(), default=0))
        self.dropped_groups = int(state.get("dropped_groups", 0))


def _collected_to_json(c: Collected) -> dict:
    return {"groups": [group_to_json(g) for g in c.batch.groups], "metrics": c.metrics}


def _collected_from_json(d: dict) -> Collected:
    return Collected(Batch([group_from_json(g) for g in d["groups"]]), dict(d["metrics"]))
