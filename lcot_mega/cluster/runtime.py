"""Build the run's actor and rollout engine for `cluster.mode`; the driver never looks inside either.

local: one process, no Ray: the actor is one gloo rank and the embedded engine lives beside it, loaded in place after
every step (the quick start). With `rollout.served` (or `rollout.engine: sglang`) the engines are instead
`cluster.num_engines` server processes speaking SGLang's HTTP API (`lcot-mega serve`, or SGLang itself), behind an
`EnginePool` kept by `cluster.served.ServedEngines`: a server that dies or stops answering (silent for
`rollout.request_timeout_s` and failing a /health probe) has its requests re-sent to the others, is restarted on the
same URL (SIGKILL first: a hung server ignores SIGTERM) and gets the actor's current weights before it takes
requests again. colocated / disaggregated: Ray places the actor ranks and the engines
(`lcot_mega.cluster.ray_runtime`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lcot_mega.cluster.actor_group import ActorGroup, ActorRank, local_actor
from lcot_mega.cluster.served import ServedEngines, ThroughPool
from lcot_mega.config import Config
from lcot_mega.rollout.protocol import RolloutEngine

ROLLOUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SERVER_START_TIMEOUT_S = 600.0
"""How long a rollout server may take to answer /health (SGLang loads the model and captures CUDA graphs)."""
SGLANG_GPU_SHARE = 0.5
"""Share of a GPU's memory the SGLang servers on it may hold (`--mem-fraction-static`, split between the servers
that share the GPU); the rest is the actor's, whose weights and optimizer stay on the GPU while they generate."""


@dataclass
class Runtime:
    """What the driver trains with: the actor, the engine (one, or a pool behind the same protocol), teardown."""

    actor: ActorGroup
    engine: RolloutEngine
    tokenizer: object
    """The model's tokenizer (chat template, decoding), loaded in the driver process."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    served: ServedEngines | None = None
    """The served engines' keeper (local served and disaggregated modes); None for engines the actor loads in
    place (local in-process, colocated)."""
    release_engine_memory: bool = False
    """The engines share the actor's GPU memory: release it (`engine.release_memory()`) while the actor trains
    and resume it before the weight sync."""

    @property
    def servers(self) -> Any:
        """The served engines' processes (`ServerSupervisor` or `ServedEngineGroup`), or None."""
        return None if self.served is None else self.served.servers

    def sync_weights(self, version: int) -> dict[str, float]:
        """Load the actor's current weights into the rollout engines as `version`; sync metrics."""
        if self.served is not None:
            return self.served.sync(version)
        return self.actor.sync_weights(version)

    def engine_metrics(self) -> dict[str, float]:
        """Served engines' failures, failovers, restarts and live count (`ServedEngines.metrics`); empty for
        in-process engines."""
        return {} if self.served is None else self.served.metrics()

    def close(self) -> None:
        """Shut down the engine, the actor and whatever the mode started; safe to call twice."""
        while self.closers:
            try:
                self.closers.pop()()
            except Exception as e:  # teardown must go on; the first error is not worth a leaked process
                print(f"lcot-mega: teardown: {type(e).__name__}: {e}")

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def build_runtime(cfg: Config) -> Runtime:
    """The actor and engine of `cfg.cluster.mode`, weights in sync at version 0 (the initial policy)."""
    if cfg.cluster.mode == "local":
        return _local_runtime(cfg)
    from lcot_mega.cluster.ray_runtime import build_ray_runtime

    runtime = build_ray_runtime(cfg)
    runtime.release_engine_memory = cfg.cluster.mode == "colocated"  # the engine lives in actor rank 0's process
    return runtime


def is_served(cfg: Config) -> bool:
    """Whether the rollout engines run as server processes (SGLang always does)."""
    return cfg.rollout.served or cfg.rollout.engine == "sglang"


def _local_runtime(cfg: Config) -> Runtime:
    if is_served(cfg):
        return _served_runtime(cfg)
    if cfg.rollout.engine == "vllm":  # vLLM's in-process LLM; its engine core and worker are child processes
        from lcot_mega.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(cfg.model.path, dtype=ROLLOUT_DTYPES[cfg.model.dtype], seed=cfg.trainer.seed)
    else:
        from lcot_mega.rollout.embedded import EmbeddedEngine

        engine = EmbeddedEngine(cfg.model.path, dtype=ROLLOUT_DTYPES[cfg.model.dtype], seed=cfg.trainer.seed)
    runtime = Runtime(actor=None, engine=engine, tokenizer=engine.tokenizer or load_tokenizer(cfg))  # type: ignore[arg-type]
    runtime.closers.append(engine.shutdown)
    try:
        runtime.actor = local_actor(lambda: ActorRank(cfg, engines=[engine]))
    except BaseException:
        runtime.close()
        raise
    runtime.closers.append(runtime.actor.shutdown)
    return runtime


# ---------------------------------------------------------------------------------------------- served engines


def server_command(cfg: Config, model_path: str | Path | None = None) -> Callable[[int, int], list[str]]:
    """(server index, port) -> the command line of rollout server i: SGLang, or `lcot-mega serve`, serving
    `model_path` (default `cfg.model.path`; the block-FP8 copy with `rollout.weight_dtype: fp8`)."""
    from lcot_mega.rollout.launcher import embedded_command, sglang_command

    model_path = model_path or cfg.model.path
    if cfg.rollout.engine != "sglang":
        return lambda i, port: embedded_command(model_path, port, dtype=cfg.model.dtype)
    tp = max(1, int(cfg.cluster.gpus_per_engine))
    gpus = max(1, torch.cuda.device_count())
    per_gpu = max(1, math.ceil(cfg.cluster.num_engines * tp / gpus))

    def command(i: int, port: int) -> list[str]:
        extra = ["--dtype", cfg.model.dtype, "--base-gpu-id", str((i * tp) % gpus)]
        if cfg.model.trust_remote_code:
            extra.append("--trust-remote-code")
        if cfg.actor.routing_replay == "rollout":  # the server-level switch of return_routed_experts
            extra.append("--enable-return-routed-experts")
        return sglang_command(
            model_path, port, tp_size=tp, mem_fraction_static=SGLANG_GPU_SHARE / per_gpu,
            random_seed=cfg.trainer.seed + i, enable_memory_saver=True, extra_args=extra,
        )  # fmt: skip

    return command


def _server_env(cfg: Config) -> dict[str, str]:
    """CPU servers split the cores (they generate at the same time; the actor waits meanwhile)."""
    if cfg.rollout.engine == "sglang":
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"OMP_NUM_THREADS": str(max(1, cores // cfg.cluster.num_engines))}


def start_served_engines(cfg: Config, log_dir: Path) -> ServedEngines:
    """`cluster.num_engines` supervised servers of `cfg.model.path` and their keeper, its `EnginePool` started: a
    server that dies or hangs is restarted on its URL and, once the keeper has an actor, pushed the actor's
    current weights before it takes requests again (without one, as in `lcot-mega eval`, its own weights are the
    right ones)."""
    from lcot_mega.rollout.launcher import ServerSupervisor

    timeout = cfg.rollout.request_timeout_s
    servers = ServerSupervisor(
        server_command(cfg, _served_model(cfg, log_dir)), cfg.cluster.num_engines, log_dir, SERVER_START_TIMEOUT_S,
        env=_server_env(cfg),
    )  # fmt: skip
    print(f"lcot-mega: {cfg.cluster.num_engines} rollout server(s) at {', '.join(servers.urls)}; logs in {log_dir}")

    def restart(i: int) -> RolloutEngine:
        servers.restart(i, grace_s=0.0)  # SIGKILL at once: a hung (stopped) server never handles SIGTERM
        return servers.client(i, retries=0, timeout_s=timeout)

    served = ServedEngines(servers, restart, ThroughPool())
    try:
        served.start_pool(servers.clients(retries=0, timeout_s=timeout), SERVER_START_TIMEOUT_S)
    except BaseException:
        servers.shutdown()
        raise
    return served


def _served_model(cfg: Config, log_dir: Path) -> Path:
    """What the servers load: the model, or with `rollout.weight_dtype: fp8` a block-FP8 copy of it written once
    beside the logs (SGLang builds block-FP8 layers only from an FP8-serialized checkpoint; docs/FP8.md)."""
    if cfg.rollout.weight_dtype != "fp8":
        return Path(cfg.model.path)
    from lcot_mega.weight_sync.fp8 import save_fp8_checkpoint

    out = log_dir.parent / "fp8-model"
    if not (out / "config.json").is_file():
        save_fp8_checkpoint(cfg.model.path, out)
    return out


def _served_runtime(cfg: Config) -> Runtime:
    """`cluster.num_engines` supervised servers behind a pool that restarts and re-syncs a failed one."""
    runtime = Runtime(actor=None, engine=None, tokenizer=load_tokenizer(cfg))  # type: ignore[arg-type]
    runtime.release_engine_memory = cfg.rollout.engine == "sglang"  # SGLang shares the actor's GPU
    served = start_served_engines(cfg, Path(cfg.trainer.run_dir) / "logs")
    runtime.served, runtime.engine = served, served.pool
    runtime.closers.append(served.shutdown)
    try:
        served.actor = runtime.actor = local_actor(lambda: ActorRank(cfg, engines=[served.pool]))
        runtime.closers.insert(0, runtime.actor.shutdown)  # closers run last-first: the actor after the servers
    except BaseException:
        runtime.close()
        raise
    return runtime
