"""Fault injection (`debug.inject`, docs/STABILITY.md "Fault injection"): real faults in real runs, for drills.

`inject_faults` is the only way in. With no fault asked for, it returns the runtime and the step function as
they are, so a production run carries no trace of this module. Otherwise a `FaultInjector` wraps them:
- the step function: before the step's rollout, a served engine is SIGKILLed ("kill") or SIGSTOPped ("hang")
  once it has requests in flight, or the driver gets SIGTERM;
- the actor (`FaultyActor`: the same ranks behind the same lock): in a NaN-gradient step the gradient flowing
  back from every model chunk's output is NaN, so every parameter's gradient really is NaN (the loss itself
  stays finite: the policy loss refuses NaN inputs); an entropy-collapse step sharpens the policy after its
  update (the final norm's weight times `collapse_scale`: a real policy whose entropy collapses); a save-fault
  step arms every rank's checkpoint store so the write crashes the process ("crash") or fails with ENOSPC
  ("disk_full") once its payload is written, before the commit.
The rank-side pieces are module-level functions sent through `ActorGroup.apply`.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.checkpoint import store as store_mod
from lcot_mega.cluster.actor_group import ActorGroup, ActorRank
from lcot_mega.cluster.runtime import Runtime
from lcot_mega.config import Config
from lcot_mega.config.schema import InjectConfig

StepFn = Callable[..., Any]
"""`trainer.driver.run_step`'s shape: (rt, grader, next_prompts, cfg, step, watch) -> (metrics, verdict)."""

ENGINE_FAULTS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}
"""A served engine that dies; one that stops answering."""


def inject_faults(cfg: Config, rt: Runtime, run_step: StepFn) -> tuple[Runtime, StepFn]:
    """(`rt`, `run_step`) unchanged when `cfg.debug.inject` names no step; else both wrapped (module docstring)."""
    inject = cfg.debug.inject
    if not any_fault(inject):
        return rt, run_step
    injector = FaultInjector(inject, rt)
    return injector.runtime, injector.wrap_step(run_step)


def any_fault(inject: InjectConfig) -> bool:
    return any(isinstance(v, list) and v for v in vars(inject).values())


class FaultInjector:
    """Knows the step in flight and strikes where `inject` says (module docstring)."""

    def __init__(self, inject: InjectConfig, rt: Runtime) -> None:
        if (inject.kill_engine_at_step or inject.hang_engine_at_step) and rt.servers is None:
            raise ValueError(
                "debug.inject.kill_engine_at_step / hang_engine_at_step need served engines: rollout.served=true or"
                " rollout.engine=sglang in cluster.mode=local, or cluster.mode=disaggregated"
            )
        self.inject = inject
        self.step = 0
        self.runtime = replace(rt, actor=FaultyActor(rt.actor, self))

    def wrap_step(self, run_step: StepFn) -> StepFn:
        def step_with_faults(rt: Runtime, grader: Any, next_prompts: Any, cfg: Config, step: int, watch: Any) -> Any:
            self.step = step
            self._before_rollout(rt, step)
            return run_step(rt, grader, next_prompts, cfg, step, watch)

        return step_with_faults

    def _before_rollout(self, rt: Runtime, step: int) -> None:
        if step in self.inject.kill_engine_at_step:
            fire_engine_fault(rt, "kill")
        if step in self.inject.hang_engine_at_step:
            fire_engine_fault(rt, "hang")
        if step in self.inject.sigterm_at_step:  # delivered at once: the handler sets a flag, the step runs to its end
            os.kill(os.getpid(), signal.SIGTERM)


class FaultyActor(ActorGroup):
    """The run's actor (same ranks, same lock) with the update and checkpoint faults of `injector`'s steps."""

    def __init__(self, actor: ActorGroup, injector: FaultInjector) -> None:
        super().__init__(actor.ranks)
        self.lock = actor.lock  # one lock with the served engines' keeper, which holds the unwrapped group
        self.injector = injector

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        inject, step = self.injector.inject, self.injector.step
        if step not in inject.nan_grad_at_step:
            metrics = super().train_step(batch)
        else:
            self.apply(nan_gradients_rank, True)
            try:
                metrics = super().train_step(batch)
            finally:
                self.apply(nan_gradients_rank, False)
        if step in inject.entropy_collapse_at_step:
            self.apply(sharpen_rank, inject.collapse_scale)
        return metrics

    def save_checkpoint(self, step: int, extra: dict) -> str:
        inject = self.injector.inject
        for kind, steps in (("crash", inject.crash_in_save_at_step), ("disk_full", inject.disk_full_at_step)):
            if step in steps:
                self.apply(arm_save_fault, kind)
        return super().save_checkpoint(step, extra)


# ------------------------------------------------------------------------------------------ rank side

_NAN_HOOKS: dict[int, list[Any]] = {}
"""id(MegatronActor) -> its forward hooks while NaN forwards are on (per process)."""


def _nan_backward(module: torch.nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(lambda grad: grad * float("nan"))


def set_nan_gradients(actor: Any, on: bool) -> None:
    """While on, the gradient flowing back from each of a `MegatronActor`'s model chunks is NaN, so every
    parameter's gradient is (on every pipeline stage, and for micro-batches without rows too); forward values,
    log-probs and the loss stay as they were."""
    for handle in _NAN_HOOKS.pop(id(actor), []):
        handle.remove()
    if on:
        _NAN_HOOKS[id(actor)] = [chunk.register_forward_hook(_nan_backward) for chunk in actor.chunks]


@contextmanager
def nan_gradients(actor: Any) -> Iterator[None]:
    """`set_nan_gradients` on for the block."""
    set_nan_gradients(actor, True)
    try:
        yield
    finally:
        set_nan_gradients(actor, False)


def nan_gradients_rank(rank: ActorRank, on: bool) -> None:
    set_nan_gradients(rank.actor, on)


@torch.no_grad()
def sharpen(actor: Any, scale: float) -> None:
    """Multiply a `MegatronActor`'s final norm weight by `scale` in place: its logits scale by `scale`, a real
    policy whose per-token entropy collapses. The weight is replicated over TP and lives on the last pipeline
    stage; under bf16 the optimizer's fp32 copy is scaled too, or the next step would restore it. Call on every
    rank."""
    for chunk in actor.chunks:
        model = chunk.module
        if model.post_process:
            weight = model.decoder.final_layernorm.weight
            weight.mul_(scale)
            main = getattr(weight, "main_param", None)  # distributed optimizer: fp32 shard of a bf16 weight
            if main is not None and main.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
                main.mul_(scale)


def sharpen_rank(rank: ActorRank, scale: float) -> None:
    sharpen(rank.actor, scale)


def _crash(tmp: Path) -> None:
    print(f"lcot-mega: debug.inject: crashing while writing {tmp}", flush=True)
    os._exit(137)  # a node lost mid-write: payload on disk, no manifest


def _disk_full(tmp: Path) -> None:
    """A disk filled by the payload, failing as it does under megatron-core: torch's zip writer raises
    `RuntimeError("... unexpected pos ...")` with no errno (writing to /dev/full gives exactly that), and the
    filesystem has no room left (the store's free-space probe reads 0 until `arm_save_fault` restores it)."""
    store_mod.free_bytes = lambda path: 0
    if not os.path.exists("/dev/full"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    torch.save(torch.zeros(1024), "/dev/full")


SAVE_FAULTS: dict[str, Callable[[Path], None]] = {"crash": _crash, "disk_full": _disk_full}


def arm_save_fault(rank: ActorRank, kind: str) -> None:
    """The next checkpoint write of `rank` fails (`SAVE_FAULTS[kind]`) once its payload is written, before the
    commit; one shot."""
    fault, store = SAVE_FAULTS[kind], rank.store
    real, real_free = store.writing, store_mod.free_bytes

    @contextmanager
    def failing_once(step: int) -> Iterator[Path]:
        del store.writing  # back to the class's own method
        try:
            with real(step) as tmp:
                yield tmp
                fault(tmp)
        finally:
            store_mod.free_bytes = real_free

    store.writing = failing_once


# ------------------------------------------------------------------------------------------ engines


def fire_engine_fault(
    rt: Runtime, kind: str, engine: int = 0, delay_s: float = 0.05, busy_timeout_s: float = 30.0
) -> threading.Thread:
    """SIGKILL ("kill") or SIGSTOP ("hang") served engine `engine`'s process, from a thread, once that engine has
    requests in flight (or `busy_timeout_s` passed) and `delay_s` later, so a call right before a rollout hits it
    mid-generation. Returns the thread (join it to wait for it)."""
    if kind not in ENGINE_FAULTS:
        raise ValueError(f"fault kind must be one of {sorted(ENGINE_FAULTS)}, got {kind!r}")
    if rt.servers is None:
        raise RuntimeError(
            "engine faults need served engines: rollout.served=true or rollout.engine=sglang in cluster.mode=local,"
            " or cluster.mode=disaggregated"
        )
    proc, pool = rt.servers.processes[engine], rt.engine

    def fire() -> None:
        end = time.monotonic() + busy_timeout_s
        while pool.loads()[engine] == 0 and time.monotonic() < end:
            time.sleep(0.002)
        time.sleep(delay_s)
        print(f"lcot-mega: debug.inject: {kind} rollout server {engine} (pid {proc.pid})", flush=True)
        proc.signal(ENGINE_FAULTS[kind])

    thread = threading.Thread(target=fire, name=f"inject-{kind}-{engine}", daemon=True)
    thread.start()
    return thread
