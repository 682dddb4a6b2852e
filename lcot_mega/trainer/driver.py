"""The driver: `lcot-mega train CONFIG`. One RL step is a short sequence of plain calls (DESIGN.md, "The step").

prompts -> rollout (+ reward, advantages, dynamic sampling) -> polarity selection -> guards -> actor update
(gated by the guards' bounds) -> guards -> weight sync -> log -> checkpoint / eval on schedule. A guard verdict
may skip the update, roll back to the last good checkpoint or halt the run (docs/STABILITY.md). Components
never call each other; they meet here.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from lcot_mega.cluster.runtime import Runtime, build_runtime
from lcot_mega.config import Config
from lcot_mega.evaluation.core import EvalResult, eval_params, evaluate
from lcot_mega.guards import Verdict
from lcot_mega.reward.grader import Grader, grader_for
from lcot_mega.trainer.ahead import RolloutAhead
from lcot_mega.trainer.collect import collect, step_seed
from lcot_mega.trainer.faults import inject_faults
from lcot_mega.trainer.inject import OfflineInjector
from lcot_mega.trainer.partial import PartialRollout
from lcot_mega.trainer.recovery import StopSignals
from lcot_mega.trainer.respond import Halted, Watch, passes, respond
from lcot_mega.trainer.run_dir import RunDir
from lcot_mega.trainer.update import select_for_update, to_train_batch
from lcot_mega.types import Prompt


@dataclass
class TrainResult:
    run_dir: Path
    last_step: int
    evals: dict[int, dict[str, EvalResult]]
    """Evaluations done in this invocation, by step."""
    stopped_by: str | None = None
    """The signal (SIGTERM, SIGINT) that ended the run early, after a checkpoint; None when it ran to the end."""

    def eval_summary(self) -> list[str]:
        """One line per eval set: held-out accuracy at the first and last evaluation, with standard errors."""
        if not self.evals:
            return []
        first, last = min(self.evals), max(self.evals)
        lines = []
        for name, a in self.evals[first].items():
            b = self.evals[last][name]
            change = f" -> step {last} {b.accuracy:.1%} +- {b.stderr:.1%}" if last != first else ""
            size = f"{len(a.correct)} problems x {a.k}"
            lines.append(f"held-out {name} ({size}): step {first} {a.accuracy:.1%} +- {a.stderr:.1%}{change}")
        return lines


def train(cfg: Config, *, resume: bool | None = None) -> TrainResult:
    """Train `cfg.trainer.steps` steps; `resume` None continues a run directory that has a checkpoint."""
    from lcot_mega.data import build_data
    from lcot_mega.observe import Progress
    from lcot_mega.trainer.preflight import check_before_training

    check_before_training(cfg)
    run = RunDir.open(cfg, resume)
    with ExitStack() as stack:
        rt = stack.enter_context(build_runtime(cfg))
        grader = stack.enter_context(grader_for(cfg.reward))
        stream, eval_sets = build_data(cfg.data, rt.tokenizer, cfg.trainer.seed)
        for report in stream.report:
            print(f"lcot-mega: {report.summary()}", flush=True)
        injector = OfflineInjector(stream.solutions, rt.tokenizer, cfg) if cfg.algo.injection.enabled else None
        ahead, carry = rollout_state(cfg, rt)
        if ahead is not None:
            stack.callback(ahead.close)  # before the runtime closes: nothing may sample on a closed engine
        # unchanged unless the config asks for fault drills
        rt, step_fn = inject_faults(cfg, rt, partial(run_step, injector=injector, ahead=ahead, carry=carry))
        watch = Watch.open(cfg, run)
        stack.callback(watch.log.close)
        start = restore(rt, stream, run, watch, ahead, carry)
        signals = stack.enter_context(StopSignals())
        log = stack.enter_context(run.metrics_logger(cfg, start, Progress(cfg.trainer.steps, start)))
        evals: dict[int, dict[str, EvalResult]] = {}
        if start == 0 and cfg.eval.at_start and eval_sets:
            evals[0] = run_evals(rt, grader, eval_sets, cfg, 0, run)
            log.log(0, _eval_metrics(evals[0]))
        step = start
        while step < cfg.trainer.steps and not signals.received:
            step += 1
            metrics, verdict = step_fn(rt, grader, stream.next_prompts, cfg, step, watch)
            halt = respond(rt, watch, step, metrics, verdict)
            if ahead is not None and verdict.action == "rollback" and not halt:
                dropped = ahead.discard() + (carry.discard() if carry is not None else 0)
                metrics["rollout/rollback_dropped_groups"] = float(dropped)
                ahead.synced(step)
            if not halt and eval_sets and _due(step, cfg.trainer.eval_every, cfg.trainer.steps, off_when_zero=True):
                evals[step] = run_evals(rt, grader, eval_sets, cfg, step, run)
                metrics |= _eval_metrics(evals[step])
            decision = verdict.metrics() | ({"guard/action": "halt", "guard/reason": halt} if halt else {})
            log.log(step, metrics | decision | _watch_metrics(watch) | {"data/epoch": stream.progress})
            if halt:
                watch.log.event(step, f"halted: {halt}")
                path = save(rt, stream, watch, step, cfg, passed=False, ahead=ahead, carry=carry)
                raise Halted(f"{halt}. State saved in {path}; see {run.path / 'guards.log'}")
            if _due(step, cfg.trainer.save_every, cfg.trainer.steps) or signals.received:
                save(rt, stream, watch, step, cfg, passed=passes(verdict), ahead=ahead, carry=carry)
        if signals.received:
            print(f"lcot-mega: stopped by {signals.received} after step {step}; the same command resumes", flush=True)
        return TrainResult(run.path, step, evals, signals.received)


def rollout_state(cfg: Config, rt: Runtime) -> tuple[RolloutAhead | None, PartialRollout | None]:
    """What the rollout keeps between steps: the batches sampled ahead (`trainer.max_staleness` = k > 0) and the
    responses a partial rollout carries (`rollout.partial`). A carried response's oldest token is one update older
    than a fresh one, so with partial rollout the engine samples k - 1 steps ahead: every token stays within k."""
    k = cfg.trainer.max_staleness
    if k == 0:
        return None, None
    carry = None
    if cfg.rollout.partial:
        carry = PartialRollout(cfg, lambda ids: rt.tokenizer.decode(ids, skip_special_tokens=True))
    return RolloutAhead(k - (carry is not None), cfg.trainer.steps, rt.engine, bound=k), carry


def run_step(
    rt: Runtime,
    grader: Grader,
    next_prompts,
    cfg: Config,
    step: int,
    watch: Watch,
    *,
    injector: OfflineInjector | None = None,
    ahead: RolloutAhead | None = None,
    carry: PartialRollout | None = None,
) -> tuple[dict, Verdict]:
    """One RL step; its metrics (keys in docs/METRICS.md) and the guards' verdict on it. `injector`: offline
    solutions for hard groups (`algo.injection`); `ahead`: the batches sampled ahead of the actor
    (`trainer.max_staleness` > 0), None for the synchronous loop; `carry`: the responses a partial rollout
    carries between steps (`rollout.partial`)."""
    t0 = time.perf_counter()
    collect_fn = partial(  # the step's batch: collect_fn(step)
        collect if carry is None else carry.collect,
        rt.engine,
        next_prompts,
        grader,
        cfg,
        parallelism=cfg.cluster.num_engines,
        reseed=watch.recovery.reseed,
        injector=injector,
    )
    if ahead is None:
        collected = collect_fn(step)
    else:  # this step's batch, sampled during an earlier step; the engine goes on to sample the next ones
        collected = ahead.take(step, collect_fn)
        ahead.start(step, collect_fn)
    batch, metrics = select_for_update(collected.batch, cfg.algo, step_seed(cfg, step, salt=-1))
    metrics |= collected.metrics | rt.engine_metrics()
    if not len(batch):
        print(f"lcot-mega: step {step}: {_nothing_to_train(metrics)}", flush=True)
    verdict = watch.guard.check(step, metrics)  # rollout monitors first: a degenerate batch is never trained on
    t1 = time.perf_counter()
    updated = False
    if len(batch) and verdict.keeps_update:
        update = replace(to_train_batch(batch, cfg.rollout.temperature), update_bounds=watch.guard.update_bounds())
        metrics |= train_on(rt, update)
        updated = bool(metrics.get("actor/update_ok", 1.0))
        verdict = watch.guard.check(step, metrics)
    metrics["actor/skipped"] = float(not updated)
    if ahead is not None:
        metrics |= ahead.join()  # the engine holds the previous weights until the batches ahead are sampled
    t2 = time.perf_counter()
    if updated:
        metrics |= rt.sync_weights(step)
        if ahead is not None:
            ahead.synced(step)
    metrics |= {
        "perf/train_s": t2 - t1,
        "perf/sync_s": time.perf_counter() - t2,
        "perf/step_s": time.perf_counter() - t0,
    }
    return metrics, verdict


def _nothing_to_train(metrics: dict[str, float]) -> str:
    """Why a step has no update (actor/skipped = 1): selection left no sample, e.g. every kept one was truncated."""
    masked = int(metrics.get("select/masked_truncated", 0))
    why = f", {masked} truncated ones masked out by algo.mask_truncated" if masked else ""
    return f"no sample left to train on after selection{why}; the update is skipped"


def train_on(rt: Runtime, update) -> dict[str, float]:
    """The actor update; engines that share the actor's devices hand their memory over meanwhile."""
    if rt.release_engine_memory:  # SGLang's release_memory_occupation
        rt.engine.release_memory()
    try:
        return rt.actor.train_step(update)
    finally:
        if rt.release_engine_memory:
            rt.engine.resume_memory()


def save(
    rt: Runtime,
    stream,
    watch: Watch,
    step: int,
    cfg: Config,
    *,
    passed: bool,
    ahead: RolloutAhead | None = None,
    carry: PartialRollout | None = None,
) -> str:
    """Checkpoint the run at `step` (actor state, data position, guard state, the batches sampled ahead, the
    responses a partial rollout carries); it becomes good once confirmed."""
    extra = {"data": stream.state_dict(), "weight_version": step, "watch": watch.state_dict()}
    if ahead is not None:
        extra["ahead"] = ahead.state_dict()
    if carry is not None:
        extra["partial"] = carry.state_dict()
    path = rt.actor.save_checkpoint(step, extra)
    if passed:
        watch.mark_good(watch.recovery.saved(step))
    return path


def run_evals(
    rt: Runtime, grader: Grader, eval_sets: dict[str, list[Prompt]], cfg: Config, step: int, run: RunDir
) -> dict[str, EvalResult]:
    """Evaluate every held-out set with the current weights; per-problem results go under `run/eval`."""
    results = {}
    for name, prompts in eval_sets.items():
        result = evaluate(rt.engine, grader, name, prompts, eval_params(cfg, step_seed(cfg, step, salt=-2)))
        result.save(run.eval_path(name, step))
        results[name] = result
    return results


def restore(
    rt: Runtime,
    stream,
    run: RunDir,
    watch: Watch,
    ahead: RolloutAhead | None = None,
    carry: PartialRollout | None = None,
) -> int:
    """Load the newest valid checkpoint when resuming (weights, optimizer, data position, guard state, LR scale,
    the batches sampled ahead, the carried responses); the step to continue from. A corrupt newest checkpoint is
    skipped with a warning (the store falls back)."""
    if not run.resuming:
        return 0
    step, extra = rt.actor.load_checkpoint()
    stream.load_state_dict(extra["data"])
    watch.load_state_dict(extra.get("watch", {}))
    if watch.recovery.lr_scale != 1.0:
        rt.actor.set_lr_scale(watch.recovery.lr_scale)
    version = int(extra.get("weight_version", step))
    rt.sync_weights(version)
    if ahead is not None:
        ahead.load_state_dict(extra.get("ahead", {}))
        ahead.synced(version)
    elif extra.get("ahead", {}).get("pending"):  # saved by a run with trainer.max_staleness > 0
        groups = sum(len(c["groups"]) for c in extra["ahead"]["pending"].values())
        print(
            f"lcot-mega: warning: the checkpoint holds {groups} groups sampled ahead of the actor; with"
            " trainer.max_staleness = 0 they are dropped (resume with the run's max_staleness to train them)",
            flush=True,
        )
    if carry is not None:
        carry.load_state_dict(extra.get("partial", {}))
    elif (state := extra.get("partial", {})).get("open") or state.get("ready"):  # saved with rollout.partial
        groups = len(state.get("open", [])) + len(state.get("ready", []))
        print(
            f"lcot-mega: warning: the checkpoint holds {groups} groups of a partial rollout carried to the next"
            " step; without rollout.partial they are dropped (resume with rollout.partial=true to train them)",
            flush=True,
        )
    print(f"lcot-mega: resumed {run.path} at step {step}", flush=True)
    return step


def _watch_metrics(watch: Watch) -> dict[str, float]:
    return {"guard/rollbacks": float(watch.recovery.rollbacks), "guard/lr_scale": watch.recovery.lr_scale}


def _eval_metrics(results: dict[str, EvalResult]) -> dict[str, float]:
    from lcot_mega.observe.keys import key_segment

    out: dict[str, float] = {}
    for name, result in results.items():
        result.source = key_segment(name)
        out |= result.metrics()
    return out


def _due(step: int, every: int, last: int, *, off_when_zero: bool = False) -> bool:
    """Scheduled work (eval, checkpoint) runs every `every` steps and at the last step; `every` = 0 means only at
    the last step, or never with `off_when_zero` (trainer.eval_every = 0)."""
    if off_when_zero and every == 0:
        return False
    return step == last or (every > 0 and step % every == 0)
