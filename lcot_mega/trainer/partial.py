"""Partial rollout (`rollout.partial`): responses are sampled in windows of a fixed token budget; a step trains the
first groups to finish, and the unfinished ones keep their tokens and continue in the next step's sampling under
the newer weights, so the longest response of a batch no longer sets the step time.

Kimi k1.5 (Kimi Team 2025, sec. 2.6.2) caps the tokens a response may add per iteration and continues long ones in
later iterations; slime and AReaL keep interrupted responses the same way. Here the cut is counted in tokens
(`rollout.partial_window`), never in seconds: the same run cuts the same responses at the same tokens, and a
resumed run samples what an uninterrupted one would. A response is continued by sending prompt + its tokens so far
as the context, which every engine serves (embedded, `lcot-mega serve`, SGLang, vLLM) without a pause/continue
API; its KV cache is rebuilt under the new weights. A stop string split across two windows is found on the
decoded response and the tokens after it are cut, as the engine would have.

Every token keeps the version that sampled it (`Sample.token_versions`) and its log-prob under that version, which
is what the off-policy corrections read (`algo.off_policy`). A group is sampled in at most `MAX_SPAN` = 2
collections (steps' samplings): carried once, it must finish in the next one, where its oldest token is one update
older than a fresh one; the driver therefore samples `trainer.max_staleness` - 1 steps ahead. A step's batch is
the first `trainer.prompts_per_step` finished groups in the order their prompts were drawn; finished groups beyond
it wait for the next step (`ready`), once.

Every group drawn is trained once, dropped with a counted reason (aborted, not informative under dynamic sampling,
over its span, a rollback), or still open or ready in `state_dict()`, which goes into the checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from lcot_mega.config import Config
from lcot_mega.reward.grader import Grader
from lcot_mega.rollout.protocol import Completion, RolloutEngine
from lcot_mega.trainer.collect import Collected, DynamicSampler, sampling_params, set_advantages, step_seed
from lcot_mega.trainer.serialize import group_from_json, group_to_json, prompt_from_json, prompt_to_json
from lcot_mega.types import Batch, Group, Prompt, Sample, SampleStatus

if TYPE_CHECKING:
    import torch

    from lcot_mega.trainer.inject import OfflineInjector

METRIC_KEYS = (
    "rollout/windows",
    "rollout/carried_in_groups",
    "rollout/open_groups",
    "rollout/ready_groups",
    "rollout/span_dropped_groups",
    "rollout/multi_version_frac",
    "rollout/generated_tokens",
)
"""What a partial rollout adds to the step's metrics (docs/METRICS.md)."""
MAX_SPAN = 2
"""Collections a group may be sampled in: the one that drew it and the next."""


def window_tokens(cfg: Config) -> int:
    """Tokens a response may add per window: `rollout.partial_window`, or max_new_tokens // 4 when it is 0."""
    return cfg.rollout.partial_window or max(1, cfg.rollout.max_new_tokens // 4)


@dataclass
class OpenResponse:
    """One response being sampled: its tokens so far, their log-probs and versions, and how it ended (None: open)."""

    ids: list[int]
    logprobs: list[float]
    versions: list[int]
    status: SampleStatus | None = None
    matched: str | int | None = None
    text: str = ""
    """The engine's text, for a response sampled in one call; a continued one is decoded whole at the end."""
    continued: bool = False
    routed: torch.Tensor | None = None
    """A mixture of experts' routed experts (`Completion.routed_experts`) of the latest window, which re-ran the
    prompt and every earlier token: it covers the whole response so far. Not kept in the JSON state (a response
    resumed from a checkpoint trains with the actor's own routing)."""

    def extend(self, c: Completion, limit: int) -> None:
        """Append a window's completion; the response ends on a stop, at `limit` tokens, or when aborted."""
        self.ids += c.token_ids
        self.logprobs += c.logprobs
        self.versions += [c.weight_version] * len(c.token_ids)
        self.routed = c.routed_experts
        self.matched, self.text = c.matched_stop, c.text
        if c.finish is SampleStatus.TRUNCATED:  # the window's budget, or the response's
            self.status = SampleStatus.TRUNCATED if len(self.ids) >= limit else None
        else:
            self.status = c.finish

    def cut(self, n: int, stop: str) -> None:
        """Keep the first `n` tokens: a stop string ends there."""
        if self.routed is not None:  # one row per token the engine ran: drop the cut tokens' rows
            self.routed = self.routed[: self.routed.shape[0] - max(len(self.ids) - n, 0)]
        del self.ids[n:], self.logprobs[n:], self.versions[n:]
        self.status, self.matched = SampleStatus.COMPLETED, stop


@dataclass
class OpenGroup:
    """A drawn prompt whose group is being sampled."""

    prompt: Prompt
    order: int
    """Draw order: batches are filled by it."""
    span: int = 1
    """Collections it has been sampled in."""
    samples: list[OpenResponse] = field(default_factory=list)
    """Empty until its first window."""

    @property
    def aborted(self) -> bool:
        return any(s.status is SampleStatus.ABORTED for s in self.samples)

    @property
    def done(self) -> bool:
        return bool(self.samples) and all(s.status is not None for s in self.samples)


class PartialRollout:
    """The responses carried between steps (open groups, finished surplus) and the collection that continues them;
    `collect` has `trainer.collect.collect`'s signature."""

    def __init__(self, cfg: Config, decode: Callable[[list[int]], str]) -> None:
        self.window = window_tokens(cfg)
        self.decode = decode
        """Token ids -> text without special tokens (the tokenizer's), for responses continued across windows."""
        self.open: list[OpenGroup] = []
        self.ready: list[tuple[int, int, Group]] = []
        """(draw order, span, group): finished groups that did not fit their step's batch."""
        self.drawn = 0
        self.dropped_groups = 0
        """Finished groups dropped over their span, and groups a rollback dropped, since the start of the run."""

    def collect(
        self,
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
        """Continue the carried responses, start new groups as the batch needs, and return the first
        `trainer.prompts_per_step` finished groups (see the module docstring)."""
        sampler = _PartialSampler(
            self, engine, grader, cfg, step, reseed=reseed, parallelism=parallelism, injector=injector
        )
        return sampler.run(next_prompts)

    def discard(self) -> int:
        """Drop every carried group (a rollback made the weights that sampled them obsolete); how many."""
        n = len(self.open) + len(self.ready)
        self.open, self.ready = [], []
        self.dropped_groups += n
        return n

    def state_dict(self) -> dict:
        """JSON: the open groups (tokens, log-probs, versions, floats exact), the finished surplus, the counters."""
        return {
            "open": [_open_group_to_json(o) for o in self.open],
            "ready": [{"order": i, "span": span, "group": group_to_json(g)} for i, span, g in self.ready],
            "drawn": self.drawn,
            "dropped_groups": self.dropped_groups,
        }

    def load_state_dict(self, state: dict) -> None:
        self.open = [_open_group_from_json(o) for o in state.get("open", [])]
        self.ready = [(int(r["order"]), int(r["span"]), group_from_json(r["group"])) for r in state.get("ready", [])]
        self.drawn = int(state.get("drawn", 0))
        self.dropped_groups = int(state.get("dropped_groups", 0))

    def draw(self, prompt: Prompt) -> OpenGroup:
        """A new group for `prompt`, next in draw order."""
        self.drawn += 1
        return OpenGroup(prompt, self.drawn)

    def finish(self, o: OpenGroup) -> Group:
        """The `Group` of a finished open group: texts decoded whole, the oldest version as `weight_version`."""
        samples = []
        for s in o.samples:
            text = self._text(s) if s.continued else s.text
            mixed = len(set(s.versions)) > 1
            samples.append(
                Sample(
                    o.prompt,
                    list(s.ids),
                    text,
                    list(s.logprobs),
                    s.status,
                    min(s.versions, default=0),
                    token_versions=list(s.versions) if mixed else None,
                    routed_experts=s.routed,
                )
            )
        return Group(o.prompt, samples)

    def _text(self, s: OpenResponse) -> str:
        ids = s.ids[:-1] if isinstance(s.matched, int) else s.ids
        text = self.decode(ids)
        if isinstance(s.matched, str) and (cut := text.find(s.matched)) >= 0:
            text = text[:cut]
        return text

    def split_stop(self, s: OpenResponse, stops: Sequence[str]) -> None:
        """End a continued response on a stop string that the window boundary hid from the engine (its first half
        in one window, the rest in the next): keep the tokens up to the one that completes it."""
        text = self.decode(s.ids)
        hits = [(text.find(stop), stop) for stop in stops if stop in text]
        if not hits:
            return
        stop = min(hits)[1]
        lo, hi = 1, len(s.ids)  # the shortest prefix whose text holds the stop: decoding grows with the prefix
        while lo < hi:
            mid = (lo + hi) // 2
            if stop in self.decode(s.ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        s.cut(lo, stop)


class _PartialSampler(DynamicSampler):
    """One collection of a partial rollout: dynamic sampling (when on) over groups that finish window by window."""

    def __init__(self, state: PartialRollout, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.state = state
        self.order: dict[int, tuple[int, int]] = {}  # id(group) -> (draw order, span)
        self.windows = self.generated = self.carried_in = 0

    def run(self, next_prompts: Callable[[int], list[Prompt]]) -> Collected:
        start = time.perf_counter()
        st = self.state
        for i, span, g in st.ready:  # finished last time, beyond that batch: first in draw order now
            self.kept.append(g)
            self.order[id(g)] = (i, span + 1)
        active, st.ready, st.open = st.open, [], []
        for o in active:
            o.span += 1
        self.carried_in = len(active) + len(self.kept)
        max_rounds = 1 if self.ds.mode == "off" else self.ds.max_rounds
        with ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="rollout") as pool:
            while True:
                must = sum(o.span >= MAX_SPAN for o in active)
                if self.full and not must:
                    break
                if not self.full and self.tally.rounds < max_rounds:
                    want = self._in_flight() - len(active) - len(self.kept)
                    if want > 0:
                        active += [st.draw(p) for p in next_prompts(want)]
                        self.tally.rounds += 1
                if not active:
                    break
                self._window(pool, active)
                finished = [o for o in active if o.done]
                active = [o for o in active if not o.done]
                self.tally.aborted += sum(o.aborted for o in finished)
                groups = []
                for o in finished:
                    if not o.aborted:
                        groups.append(st.finish(o))
                        self.order[id(groups[-1])] = (o.order, o.span)
                self._absorb(groups)
        if any(o.span >= MAX_SPAN for o in active):
            raise AssertionError("a carried group left its second collection unfinished")
        st.open = active
        self.kept.sort(key=lambda g: self.order[id(g)][0])
        batch = self._final_batch()
        surplus = self.kept[len(batch.groups) :] if len(self.kept) > len(batch.groups) else []
        over = 0
        for g in surplus:
            i, span = self.order[id(g)]
            if span < MAX_SPAN:
                st.ready.append((i, span, g))
            else:
                over += 1
        st.dropped_groups += over
        set_advantages(batch, self.cfg)
        seconds = time.perf_counter() - start
        metrics = self.tally.metrics(batch, self.target, seconds)
        return Collected(batch, metrics | self._partial_metrics(batch, over, seconds))

    def _in_flight(self) -> int:
        """Groups to hold in flight or finished and untrained when a round draws: the batch times the
        oversubscription, so that carried groups run beside new ones and the engine's batch stays full."""
        factor = self.cfg.rollout.partial_oversubscribe * (1.0 if self.ds.mode == "off" else self.ds.oversample)
        return math.ceil(self.target * factor)

    def _window(self, pool: ThreadPoolExecutor, active: list[OpenGroup]) -> None:
        """Every open response adds up to `window` tokens. New and continued responses go in the same calls, one
        sample per request, so the engine decodes the long tail together with the new groups' first tokens (the
        batch stays full: the point of partial rollout); one call per remaining budget (a response's last window
        may be shorter), each spread over the engines."""
        cfg, limit, window = self.cfg, self.cfg.rollout.max_new_tokens, self.state.window
        salt = 7_000_000 + self.windows * 1000 + self.reseed * 1_000_003
        self.windows += 1
        budgets: dict[int, list[tuple[OpenGroup, OpenResponse]]] = {}
        for o in active:
            if not o.samples:  # a new group: its G responses
                o.samples = [OpenResponse([], [], []) for _ in range(cfg.rollout.n_samples)]
            for s in o.samples:
                if s.status is None:
                    budgets.setdefault(min(window, limit - len(s.ids)), []).append((o, s))
        params = sampling_params(cfg, 0)
        calls = []
        for budget, items in sorted(budgets.items()):
            for part in _split(items, self.parallelism):
                seed = step_seed(cfg, self.step, salt + len(calls))
                contexts = [o.prompt.token_ids + tuple(s.ids) for o, s in part]
                calls.append(
                    (
                        part,
                        pool.submit(
                            self.engine.generate, contexts, replace(params, max_new_tokens=budget, n=1, seed=seed)
                        ),
                    )
                )
        for part, future in calls:
            for (_, s), completions in zip(part, future.result(), strict=True):
                continuing = bool(s.ids)
                s.extend(completions[0], limit)
                s.continued |= continuing
                self.generated += len(completions[0].token_ids)
                if continuing and cfg.rollout.stop and s.status is not SampleStatus.ABORTED:
                    self.state.split_stop(s, cfg.rollout.stop)

    def _partial_metrics(self, batch: Batch, over: int, seconds: float) -> dict[str, float]:
        mixed = sum(s.token_versions is not None for s in batch.samples)
        return {
            "rollout/windows": float(self.windows),
            "rollout/carried_in_groups": float(self.carried_in),
            "rollout/open_groups": float(len(self.state.open)),
            "rollout/ready_groups": float(len(self.state.ready)),
            "rollout/span_dropped_groups": float(over),
            "rollout/multi_version_frac": mixed / max(len(batch), 1),
            "rollout/generated_tokens": float(self.generated),
            "perf/rollout_tok_s": self.generated / seconds if seconds > 0 else 0.0,
        }


def _split(items: list, parts: int) -> list[list]:
    """`items` in at most `parts` consecutive chunks (one generate call per engine)."""
    if not items:
        return []
    size = max(1, math.ceil(len(items) / parts))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _open_group_to_json(o: OpenGroup) -> dict:
    samples = [
        {
            "ids": s.ids,
            "logprobs": s.logprobs,
            "versions": s.versions,
            "status": None if s.status is None else s.status.value,
            "matched": s.matched,
            "text": s.text,
            "continued": s.continued,
        }
        for s in o.samples
    ]
    return {"prompt": prompt_to_json(o.prompt), "order": o.order, "span": o.span, "samples": samples}


def _open_group_from_json(d: dict) -> OpenGroup:
    samples = [
        OpenResponse(
            list(s["ids"]),
            list(s["logprobs"]),
            list(s["versions"]),
            None if s["status"] is None else SampleStatus(s["status"]),
            s["matched"],
            s["text"],
            bool(s["continued"]),
        )
        for s in d["samples"]
    ]
    return OpenGroup(prompt_from_json(d["prompt"]), int(d["order"]), int(d["span"]), samples)
