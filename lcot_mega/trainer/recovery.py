"""What the driver remembers about guard decisions, and how it stops on a signal.

`Recovery` holds the state that outlives a step: rollbacks so far, the learning-rate scale they left, the
sampling re-seed counter, and which saved checkpoints still wait to be confirmed good (a checkpoint is marked
good only after `guards.good_after` following steps pass every guard: the weights it holds are judged by the
rollouts they produce, one step later). It is saved in every checkpoint and restored on resume.

`StopSignals` turns SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) into a flag the driver reads between
steps: the step in flight finishes, a checkpoint is written, the run exits cleanly and resumes later. A second
SIGINT interrupts at once (the checkpoint store keeps the previous checkpoint loadable either way).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from types import FrameType

from lcot_mega.config import GuardsConfig


@dataclass
class Recovery:
    cfg: GuardsConfig
    rollbacks: int = 0
    lr_scale: float = 1.0
    reseed: int = 0
    """Added to every sampling seed; bumped by a rollback (guards.rollback_reseed) so the run does not replay
    the rollouts that led to the failure."""
    pending_good: dict[int, int] = field(default_factory=dict)
    """Saved checkpoint step -> passing steps seen since it was saved."""

    def can_roll_back(self) -> bool:
        return self.rollbacks < self.cfg.max_rollbacks

    def saved(self, step: int) -> list[int]:
        """Checkpoint `step` was written after its step passed the guards; steps to mark good now."""
        self.pending_good[step] = 0
        return self._confirmed()

    def passed(self) -> list[int]:
        """A step passed every guard (ok/log/warn); checkpoints that are now confirmed good."""
        for step in self.pending_good:
            self.pending_good[step] += 1
        return self._confirmed()

    def _confirmed(self) -> list[int]:
        done = sorted(s for s, n in self.pending_good.items() if n >= self.cfg.good_after)
        for s in done:
            del self.pending_good[s]
        return done

    def rolled_back(self) -> None:
        """Back at the last good checkpoint: lower the LR, re-seed sampling, forget the abandoned checkpoints."""
        self.rollbacks += 1
        self.lr_scale *= self.cfg.rollback_lr_factor
        if self.cfg.rollback_reseed:
            self.reseed += 1
        self.pending_good.clear()  # every unconfirmed checkpoint is newer than the last good one

    def state_dict(self) -> dict:
        return {
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "reseed": self.reseed,
            "pending_good": {str(k): v for k, v in self.pending_good.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.reseed = int(state.get("reseed", 0))
        self.pending_good = {int(k): int(v) for k, v in state.get("pending_good", {}).items()}


class StopSignals:
    """Context manager: SIGTERM / SIGINT set `received` (the signal's name) instead of killing the run.

    Installed only in the main thread (Python delivers signals there); elsewhere it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the step
        if not self.received:
            name = signal.Signals(signum).name
            print(f"lcot-mega: {name} received; finishing this step, then saving a checkpoint", flush=True)
            self.received = name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
