"""A rollout engine scripted per prompt (which of its G samples are correct), for the collection and injection
tests: the pattern of informative and zero-advantage groups is exact, and grading still goes through the real
isolated grader."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from lcot_mega.rollout.protocol import Completion, SamplingParams
from lcot_mega.types import Prompt, SampleStatus

G = 4
PATTERNS = {"all": "1111", "none": "0000", "mixed": "1100", "one": "1000"}


class ScriptedEngine:
    """Answers prompt k with G responses whose correctness follows PATTERNS[prompt kind]; optional delay per call
    (calls holding a `slow_kinds` prompt take `slow_s`) and an abort that makes in-flight calls return ABORTED samples,
    like the real engines. `fast_waits_for_slow`: a fast call returns only once a slow one is running (so a test
    of aborting in-flight work does not depend on how soon a loaded machine starts the slow call's thread)."""

    def __init__(
        self,
        kinds: dict[tuple[int, ...], str],
        slow_kinds: tuple[str, ...] = (),
        slow_s: float = 30.0,
        fast_waits_for_slow: bool = False,
    ) -> None:
        self.kinds, self.slow_kinds, self.slow_s = kinds, slow_kinds, slow_s
        self.fast_waits_for_slow = fast_waits_for_slow
        self.calls: list[int] = []
        self.aborts = 0
        self._abort = threading.Event()
        self._slow_running = threading.Event()

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append(len(prompt_ids))
        slow = any(self.kinds[tuple(ids)] in self.slow_kinds for ids in prompt_ids)
        if slow:
            self._slow_running.set()
        elif self.fast_waits_for_slow:
            assert self._slow_running.wait(30), "the slow call never started"
        deadline = time.monotonic() + (self.slow_s if slow else 0.0)
        while time.monotonic() < deadline and not self._abort.is_set():
            time.sleep(0.01)
        status = SampleStatus.ABORTED if self._abort.is_set() else SampleStatus.COMPLETED
        out = []
        for ids in prompt_ids:
            pattern = PATTERNS[self.kinds[tuple(ids)]]
            out.append(
                [Completion([7, 8], [-0.5, -0.5], status, text=f"\\boxed{{{bit}}}") for bit in pattern[: params.n]]
            )
        return out

    def abort(self) -> None:
        self.aborts += 1
        self._abort.set()


def scripted_prompts(kinds: list[str]) -> tuple[list[Prompt], dict[tuple[int, ...], str]]:
    prompts = [Prompt(f"p{i}", f"problem {i}", "1", token_ids=(i + 1,)) for i in range(len(kinds))]
    return prompts, {p.token_ids: k for p, k in zip(prompts, kinds, strict=True)}


def feeder(prompts: list[Prompt]):
    state = {"pos": 0, "asked": []}

    def next_prompts(k: int) -> list[Prompt]:
        state["asked"].append(k)
        out = prompts[state["pos"] : state["pos"] + k]
        state["pos"] += k
        return out

    return next_prompts, state
