"""The driver: `lcot-mega train CONFIG`. One RL step is a short sequence of plain calls (DESIGN.md, "The step").

prompts -> rollout (+ reward, advantages, dynamic sampling) -> polarity selection -> actor update -> weight
sync -> log -> checkpoint / eval on schedule. Components never call each other; they meet here.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from lcot_mega.cluster.runtime import Runtime, build_runtime
from lcot_mega.config import Config, config_to_dict
from lcot_mega.evaluate import EvalResult, eval_params, evaluate
from lcot_mega.reward.grader import Grader
from lcot_mega.run_dir import RunDir
from lcot_mega.step.collect import collect, step_seed
from lcot_mega.step.update import select_for_update, to_train_batch
from lcot_mega.types import Prompt


@dataclass
class TrainResult:
    run_dir: Path
    last_step: int
    evals: dict[int, dict[str, EvalResult]]
    """Evaluations done in this invocation, by step."""

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
    from lcot_mega.observe import MetricsLogger, Progress

    run = RunDir.open(cfg, resume)
    with ExitStack() as stack:
        rt = stack.enter_context(build_runtime(cfg))
        grader = stack.enter_context(make_grader(cfg))
        stream, eval_sets = build_data(cfg.data, rt.tokenizer, cfg.trainer.seed)
        for report in stream.report:
            print(f"lcot-mega: {report.summary()}", flush=True)
        start = restore(rt, stream, run)
        progress = Progress(cfg.trainer.steps, start)
        log = stack.enter_context(
            MetricsLogger(
                run.path,
                cfg.logging,
                config_dict=config_to_dict(cfg),
                resume_step=start or None,
                extra_sinks=[progress],
            )
        )
        evals: dict[int, dict[str, EvalResult]] = {}
        if start == 0 and cfg.eval.at_start and eval_sets:
            evals[0] = run_evals(rt, grader, eval_sets, cfg, 0, run)
            log.log(0, _eval_metrics(evals[0]))
        for step in range(start + 1, cfg.trainer.steps + 1):
            metrics = run_step(rt, grader, stream.next_prompts, cfg, step)
            if eval_sets and cfg.trainer.eval_every and _due(step, cfg.trainer.eval_every, cfg.trainer.steps):
                evals[step] = run_evals(rt, grader, eval_sets, cfg, step, run)
                metrics |= _eval_metrics(evals[step])
            log.log(step, metrics | {"data/epoch": stream.progress})
            if _due(step, cfg.trainer.save_every, cfg.trainer.steps):
                rt.actor.save_checkpoint(step, {"data": stream.state_dict(), "weight_version": step})
        return TrainResult(run.path, max(start, cfg.trainer.steps), evals)


def run_step(rt: Runtime, grader: Grader, next_prompts, cfg: Config, step: int) -> dict[str, float]:
    """One RL step; returns its metrics (keys in docs/METRICS.md)."""
    t0 = time.perf_counter()
    collected = collect(rt.engine, next_prompts, grader, cfg, step, parallelism=cfg.cluster.num_engines)
    batch, metrics = select_for_update(collected.batch, cfg.algo, step_seed(cfg, step, salt=-1))
    colocated = cfg.cluster.mode == "colocated"
    if colocated:  # the actor needs the memory the engine holds (SGLang's release_memory_occupation)
        rt.engine.release_memory()
    t1 = time.perf_counter()
    if len(batch):
        metrics |= rt.actor.train_step(to_train_batch(batch, cfg.rollout.temperature))
    metrics["actor/skipped"] = float(not len(batch))
    t2 = time.perf_counter()
    if colocated:
        rt.engine.resume_memory()
    metrics |= rt.actor.sync_weights(step)
    t3 = time.perf_counter()
    metrics |= collected.metrics
    metrics |= {"perf/train_s": t2 - t1, "perf/sync_s": t3 - t2, "perf/step_s": t3 - t0}
    return metrics


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


def restore(rt: Runtime, stream, run: RunDir) -> int:
    """Load the newest checkpoint when resuming (weights, optimizer, data position); the step to continue from."""
    if not run.resuming:
        return 0
    step, extra = rt.actor.load_checkpoint()
    stream.load_state_dict(extra["data"])
    rt.actor.sync_weights(int(extra.get("weight_version", step)))
    print(f"lcot-mega: resumed {run.path} at step {step}", flush=True)
    return step


def make_grader(cfg: Config) -> Grader:
    r = cfg.reward
    return Grader(
        r.fn,
        num_workers=r.num_workers,
        timeout_s=r.timeout_s,
        require_think_close=r.require_think_close,
        fallbacks=r.fallbacks,
    )


def _eval_metrics(results: dict[str, EvalResult]) -> dict[str, float]:
    from lcot_mega.observe.keys import key_segment

    out: dict[str, float] = {}
    for name, result in results.items():
        result.source = key_segment(name)
        out |= result.metrics()
    return out


def _due(step: int, every: int, last: int) -> bool:
    """Scheduled work (eval, checkpoint) runs every `every` steps and always at the last step."""
    return step == last or (every > 0 and step % every == 0)
