"""The training prompt stream: epochs over the training prompts, reshuffled each epoch, resumable exactly.

The order of epoch e is a permutation seeded by (seed, e) alone, so any process that holds the same prompts
and the same (epoch, position) continues with the same prompts: a resumed run sees what an uninterrupted run
would have seen.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from lcot_mega.data.problems import SourceReport
from lcot_mega.types import Prompt


class PromptStream:
    """Hands out training prompts k at a time, epoch after epoch; `state_dict` records where it stands."""

    def __init__(
        self,
        prompts: Sequence[Prompt],
        *,
        seed: int,
        shuffle: bool = True,
        solutions: Mapping[str, str] | None = None,
        report: Sequence[SourceReport] = (),
    ) -> None:
        self._prompts = tuple(prompts)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self.report = list(report)
        """What the builder loaded, held out and skipped, per source, train and eval."""
        self._solutions = dict(solutions or {})
        self._fingerprint = _fingerprint(self._prompts)
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def prompts(self) -> tuple[Prompt, ...]:
        """All training prompts in source order (not the epoch order)."""
        return self._prompts

    @property
    def progress(self) -> float:
        """Epochs completed, fractional (for logging)."""
        return self.epoch + (self.position / len(self._prompts) if self._prompts else 0.0)

    @property
    def solutions(self) -> Mapping[str, str]:
        """Offline correct solutions by prompt uid (read-only), for the training prompts whose source has one."""
        return MappingProxyType(self._solutions)

    def solution(self, uid: str) -> str | None:
        """The offline correct solution of a training prompt, when its source has one (for injection)."""
        return self._solutions.get(uid)

    def next_prompts(self, k: int) -> list[Prompt]:
        """The next k prompts; an epoch that runs out continues into the next, freshly shuffled one."""
        if k < 0:
            raise ValueError(f"next_prompts(k) needs k >= 0, got {k}")
        if k and not self._prompts:
            raise ValueError("no training prompts: set data.train to at least one source")
        out: list[Prompt] = []
        while len(out) < k:
            order = self._epoch_order()
            take = min(k - len(out), len(order) - self.position)
            out.extend(self._prompts[i] for i in order[self.position : self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain values (JSON-safe): where the stream stands, and what it was built from."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "size": len(self._prompts),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where `state` stood (its epoch, position, seed and shuffle); the prompts must be the same."""
        missing = [k for k in ("epoch", "position", "seed", "shuffle", "size", "fingerprint") if k not in state]
        if missing:
            raise ValueError(f"prompt stream state lacks {', '.join(missing)}")
        if state["size"] != len(self._prompts) or state["fingerprint"] != self._fingerprint:
            raise ValueError(
                f"the training prompts differ from the checkpoint's ({len(self._prompts)} now, {state['size']} then,"
                " or the same count with other content): data.*, the tokenizer or trainer.seed changed since the"
                " checkpoint, so resuming could not continue its prompt order"
            )
        if not 0 <= state["position"] < max(len(self._prompts), 1) or state["epoch"] < 0:
            raise ValueError(f"prompt stream state out of range: epoch {state['epoch']}, position {state['position']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._order = None

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(len(self._prompts)))
            if self.shuffle:
                # A string seed is hashed with SHA-512 by `random`: the same permutation in every process.
                random.Random(f"lcot-mega:{self.seed}:{self.epoch}").shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]


def _fingerprint(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.uid}\0{p.answer}\0{p.text}\0{len(p.token_ids)}\0".encode())
    return h.hexdigest()[:16]
