"""`lcot-mega sft CONFIG`: supervised fine-tuning on the Megatron actor, the cold start of the study.

Each step takes `sft.batch_size` examples (`EpochSampler`: seeded epochs, position saved in every checkpoint) and
makes one optimizer step on the cross entropy of their response tokens (`TrainBatch.sft`: the prompt is context
only), with the actor's micro-batching, packing, recompute, precision and LR schedule. The held-out loss is logged
every `trainer.eval_every` steps and at the end; checkpoints follow `trainer.save_every` and resume exactly like
`lcot-mega train` (the run directory decides). The last step writes `<run_dir>/hf`, a Hugging Face directory that
`lcot-mega train model.path=<run_dir>/hf` starts RL from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcot_mega.config import Config, ConfigError, config_to_dict, validation_errors
from lcot_mega.sft.data import EpochSampler, SftExample, load_sft_data, total_steps

HF_DIR = "hf"
RL_ONLY_SECTIONS = ("data", "rollout", "reward", "algo", "guards", "eval", "debug")
"""Config sections `lcot-mega sft` does not read: they must keep their defaults, so none is silently ignored."""
PROGRESS_KEYS = ("sft/loss", "sft/eval_loss", "sft/step_s")


@dataclass
class SftResult:
    run_dir: Path
    last_step: int
    total_steps: int
    hf_dir: Path | None
    """The exported model (written at the last step); None when the run stopped early."""
    eval_losses: dict[int, float]
    """Held-out loss by step, for the evaluations of this invocation."""
    stopped_by: str | None = None


def sft_config_errors(cfg: Config) -> list[str]:
    """Every reason `cfg` cannot run `lcot-mega sft`, each naming the key to change; empty when it can."""
    from lcot_mega.trainer.preflight import _cluster_errors

    errors = validation_errors(cfg)
    if errors:
        return errors
    if not cfg.model.path or not (Path(cfg.model.path) / "config.json").is_file():
        errors.append(f"model.path = {cfg.model.path!r} is not a Hugging Face model directory (no config.json)")
    if not cfg.sft.train:
        errors.append("sft.train is empty: name .jsonl/.json/.parquet files of (prompt, response) or messages rows")
    for path in [*cfg.sft.train, *cfg.sft.eval]:
        if not Path(path).is_file():
            errors.append(f"sft data file {path!r} does not exist")
    if cfg.cluster.mode not in ("local", "colocated"):
        errors.append(
            f"cluster.mode = {cfg.cluster.mode!r}: lcot-mega sft runs in cluster.mode=local (one actor rank) or"
            " colocated (cluster.actor_ranks Ray ranks; SFT starts no rollout engine, so there is nothing to"
            " disaggregate)"
        )
    errors += _cluster_errors(cfg)
    if cfg.trainer.max_staleness != 0:
        errors.append(f"trainer.max_staleness = {cfg.trainer.max_staleness}: lcot-mega sft samples nothing (RL only)")
    if cfg.trainer.keep_good != 1:
        errors.append(
            f"trainer.keep_good = {cfg.trainer.keep_good}: lcot-mega sft has no guards to mark a checkpoint good"
        )
    if cfg.actor.updates_per_batch != 1:
        errors.append(
            f"actor.updates_per_batch = {cfg.actor.updates_per_batch}: an SFT step is one optimizer step on"
            " sft.batch_size rows; set the batch size instead"
        )
    defaults = config_to_dict(Config())
    ours = config_to_dict(cfg)
    for section in RL_ONLY_SECTIONS:
        changed = sorted(_changed_keys(ours[section], defaults[section], section))
        if changed:
            errors.append(
                f"{', '.join(changed)}: lcot-mega sft does not read the {section} section (RL only); drop these keys"
                " from the SFT config"
            )
    return errors


def _changed_keys(ours: Any, default: Any, prefix: str) -> list[str]:
    if isinstance(ours, dict) and isinstance(default, dict):
        return [k for key in ours for k in _changed_keys(ours[key], default.get(key), f"{prefix}.{key}")]
    return [] if ours == default else [prefix]


def check_sft_config(cfg: Config) -> None:
    errors = sft_config_errors(cfg)
    if errors:
        raise ConfigError(errors)


def sft(cfg: Config, *, resume: bool | None = None) -> SftResult:
    """Fine-tune `cfg.model.path` on `cfg.sft`; `resume` None continues a run directory that has a checkpoint."""
    from lcot_mega.cluster.runtime import load_tokenizer
    from lcot_mega.observe import Progress
    from lcot_mega.trainer.recovery import StopSignals
    from lcot_mega.trainer.run_dir import RunDir, RunDirError

    check_sft_config(cfg)
    data = load_sft_data(cfg.sft, load_tokenizer(cfg), cfg.trainer.seed)  # bad data fails before the actor builds
    for line in data.report:
        print(f"lcot-mega sft: {line}", flush=True)
    steps = total_steps(len(data.train), cfg.sft)
    sampler = EpochSampler(len(data.train), cfg.trainer.seed)
    run = RunDir.open(cfg, resume)
    with ExitStack() as stack:
        actor = stack.enter_context(sft_actor(cfg))
        start = 0
        if run.resuming:
            start, extra = actor.load_checkpoint()
            sampler.load_state_dict(extra["sft"])
            print(f"lcot-mega sft: resumed {run.path} at step {start}", flush=True)
        if start > steps:
            raise RunDirError(f"{run.path} is at step {start}, past this run's {steps} steps: pick another --run-dir")
        signals = stack.enter_context(StopSignals())
        log = stack.enter_context(run.metrics_logger(cfg, start, Progress(steps, start, keys=PROGRESS_KEYS)))
        evals: dict[int, float] = {}
        if start == 0 and data.eval and cfg.trainer.eval_every > 0:
            evals[0] = held_out_loss(actor, data.eval)
            log.log(0, {"sft/eval_loss": evals[0]})
        step = start
        while step < steps and not signals.received:
            step += 1
            metrics = train_one_step(actor, [data.train[i] for i in sampler.next_batch(cfg.sft.batch_size)])
            metrics["sft/epoch"] = sampler.progress
            if data.eval and _due(step, cfg.trainer.eval_every, steps):
                evals[step] = metrics["sft/eval_loss"] = held_out_loss(actor, data.eval)
            log.log(step, metrics)
            if step == steps or signals.received or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                actor.save_checkpoint(step, {"sft": sampler.state_dict()})
        hf_dir = None
        if step == steps:
            hf_dir = Path(actor.apply(export_hf, str(run.path / HF_DIR)))
            print(f"lcot-mega sft: the fine-tuned model is in {hf_dir}", flush=True)
        elif signals.received:
            print(f"lcot-mega sft: stopped by {signals.received} after step {step}; the same command resumes")
        return SftResult(run.path, step, steps, hf_dir, evals, signals.received)


@contextmanager
def sft_actor(cfg: Config) -> Iterator[Any]:
    """The actor SFT trains: one rank in this process (cluster.mode local), or `cluster.actor_ranks` Ray ranks
    (colocated: the placement of `lcot-mega train`'s colocated mode, without the engine rank 0 would hold there).
    Stopped, with what it started, on exit."""
    from lcot_mega.cluster.actor_group import ActorGroup, ActorRank, local_actor

    if cfg.cluster.mode == "local":
        actor = local_actor(lambda: ActorRank(cfg))
        try:
            yield actor
        finally:
            actor.shutdown()
        return
    from lcot_mega.cluster.ray_group import RayRanks
    from lcot_mega.cluster.ray_runtime import check_cluster_fits, start_ray

    stop_ray = start_ray(cfg.cluster)
    try:
        check_cluster_fits(cfg)
        actor = ActorGroup(RayRanks(cfg))
        try:
            yield actor
        finally:
            actor.shutdown()
    finally:
        if stop_ray is not None:
            stop_ray()


def train_one_step(actor: Any, examples: list[SftExample]) -> dict[str, float]:
    """One optimizer step on the examples' response-token cross entropy; the step's metrics (docs/METRICS.md)."""
    from lcot_mega.actor.train_step import TrainBatch

    t0 = time.perf_counter()
    out = actor.train_step(TrainBatch.sft([e.prompt_ids for e in examples], [e.response_ids for e in examples]))
    seconds = time.perf_counter() - t0
    tokens = out["actor/response_tokens"]
    keep = ("actor/grad_norm", "actor/lr", "actor/entropy", "actor/update_ok", "actor/micro_batches")
    return {k: out[k] for k in keep} | {
        "sft/loss": out["actor/loss"],
        "sft/tokens": tokens,
        "sft/step_s": seconds,
        "sft/tokens_per_s": sum(e.tokens for e in examples) / seconds,
    }


def held_out_loss(actor: Any, examples: list[SftExample], batch: int = 64) -> float:
    """Mean cross entropy over every response token of `examples` (nats per token), from the actor's log-probs."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        part = examples[i : i + batch]
        logprobs = actor.compute_logprobs([(e.prompt_ids, e.response_ids) for e in part], 1.0)
        total -= float(sum(lp.double().sum() for lp in logprobs))
        count += sum(len(e.response_ids) for e in part)
    return total / count if count else math.nan


def export_hf(rank: Any, out_dir: str) -> str | None:
    """On every actor rank (`ActorGroup.apply`): the current weights as a Hugging Face directory at `out_dir`."""
    from transformers import AutoConfig

    from lcot_mega.bridge.hf_export import save_hf_checkpoint

    hf_config = AutoConfig.from_pretrained(rank.hf_dir, trust_remote_code=rank.cfg.model.trust_remote_code)
    path = save_hf_checkpoint(rank.actor.chunks, rank.actor.arch, out_dir, hf_config, tokenizer_dir=rank.hf_dir)
    return None if path is None else str(path)


def _due(step: int, every: int, last: int) -> bool:
    """Evaluate every `every` steps and at the last one; never with `every` = 0 (trainer.eval_every)."""
    return every > 0 and (step % every == 0 or step == last)


__all__ = [
    "SftResult",
    "check_sft_config",
    "held_out_loss",
    "sft",
    "sft_actor",
    "sft_config_errors",
    "train_one_step",
]
