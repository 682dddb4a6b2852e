"""What the driver does with a guard verdict (docs/STABILITY.md): keep the step, skip it, roll back or halt.

`Watch` bundles the guards' side of a run: the monitors (`Guard`), what outlives a step (`Recovery`),
`guards.log`, and the run's checkpoint root as the driver sees it (good marks, the rollback pointer). A rollback
restores the last good checkpoint through the actor (weights, optimizer, schedule), lowers the learning rate,
re-seeds sampling and re-loads the engines; training then goes on with the step counter still rising.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcot_mega.checkpoint.store import CheckpointStore
from lcot_mega.cluster.runtime import Runtime
from lcot_mega.config import Config
from lcot_mega.guards import Guard, GuardLog, Verdict
from lcot_mega.trainer.recovery import Recovery
from lcot_mega.trainer.run_dir import RunDir


class Halted(RuntimeError):
    """A guard halted the run (docs/STABILITY.md); the state was saved first. The message is the report."""


@dataclass
class Watch:
    """The guards' side of the run: the monitors, the recovery state, guards.log and the good marks."""

    guard: Guard
    recovery: Recovery
    log: GuardLog
    store: CheckpointStore
    """The run's checkpoint root as the driver sees it: good marks and the rollback pointer."""

    @classmethod
    def open(cls, cfg: Config, run: RunDir) -> Watch:
        store = CheckpointStore(
            run.checkpoints, cfg.trainer.keep_last, keep_good=cfg.trainer.keep_good, clean_stale=False
        )
        return cls(Guard(cfg.guards), Recovery(cfg.guards), GuardLog(run.path), store)

    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict(), "recovery": self.recovery.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state.get("guard", {}))
        self.recovery.load_state_dict(state.get("recovery", {}))

    def mark_good(self, steps: list[int]) -> None:
        for step in steps:
            self.store.mark_good(step)


def passes(verdict: Verdict) -> bool:
    """The step counts as healthy: its values join the windows and it may confirm checkpoints good. A breach
    waiting out its patience may be the start of a collapse: it must not pull the median towards it, and a
    checkpoint written then (or confirmed by it) must not become a rollback target."""
    return verdict.keeps_update and not verdict.suspect


def respond(rt: Runtime, watch: Watch, step: int, metrics: dict[str, float], verdict: Verdict) -> str | None:
    """Act on the step's verdict: confirm good checkpoints, or roll back; the halt report when the run must stop."""
    watch.log.write(step, verdict)
    watch.guard.end_step(verdict)
    if verdict.action not in ("ok", "log"):
        print(f"lcot-mega: step {step}: guards: {verdict.action}: {verdict.reason()}", flush=True)
    if verdict.keeps_update:
        if passes(verdict):
            watch.guard.accept(metrics)
            watch.mark_good(watch.recovery.passed())
        return None
    if verdict.action == "skip":
        return None
    if verdict.action == "rollback":
        return roll_back(rt, watch, step)
    return f"guards halted the run at step {step}: {verdict.reason()}"


def roll_back(rt: Runtime, watch: Watch, step: int) -> str | None:
    """Restore the last good checkpoint (weights, optimizer, schedule), lower the LR, re-seed; None when done,
    else why the run must halt instead (no good checkpoint, or guards.max_rollbacks reached)."""
    good = watch.store.last_good()
    if good is None:
        return (
            f"guards asked for a rollback at step {step} but no checkpoint is marked good yet (checkpoints are"
            " written every trainer.save_every steps and marked good guards.good_after steps later)"
        )
    if not watch.recovery.can_roll_back():
        limit = watch.recovery.cfg.max_rollbacks
        return f"guards asked for a rollback at step {step}, after {limit} already (guards.max_rollbacks = {limit})"
    watch.store.rollback(good.step)
    watch.store.drop_newer_than(good.step)
    _, extra = rt.actor.load_checkpoint(str(good.path))
    watch.guard.load_state_dict(extra.get("watch", {}).get("guard", {}))
    watch.recovery.rolled_back()
    rt.actor.set_lr_scale(watch.recovery.lr_scale)
    rt.sync_weights(step)
    watch.log.event(
        step,
        f"rolled back to good checkpoint step {good.step} (rollback {watch.recovery.rollbacks} of at most"
        f" {watch.recovery.cfg.max_rollbacks}); learning rate x{watch.recovery.lr_scale:g}; sampling re-seed"
        f" {watch.recovery.reseed}",
    )
    print(f"lcot-mega: step {step}: rolled back to step {good.step}, lr x{watch.recovery.lr_scale:g}", flush=True)
    return None
