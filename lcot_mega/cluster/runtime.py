"""Build the run's actor and rollout engine for `cluster.mode`; the driver never looks inside either.

local: one process, no Ray: the actor is one gloo rank and the embedded engine lives beside it, loaded in
place after every step (the quick start). With `rollout.served` (or `rollout.engine: sglang`) the engines are
instead `cluster.num_engines` server processes speaking SGLang's HTTP API (`lcot-mega serve`, or SGLang itself),
behind an `EnginePool`: a server that dies or stops answering within `rollout.request_timeout_s` has its requests
re-sent to the others, is restarted on the same URL (SIGKILL first: a hung server ignores SIGTERM) and gets the
actor's current weights before it takes requests again. colocated / disaggregated: Ray places the actor ranks and
the engines (`lcot_mega.cluster.ray_runtime`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lcot_mega.cluster.actor_group import ActorGroup, ActorRank, LocalActorGroup
from lcot_mega.config import Config
from lcot_mega.rollout.protocol import RolloutEngine

ROLLOUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SERVER_START_TIMEOUT_S = 600.0
"""How long a rollout server may take to answer /health (SGLang loads the model and captures CUDA graphs)."""
SGLANG_GPU_SHARE = 0.5
"""Share of a GPU's memory the SGLang servers on it may hold (`--mem-fraction-static`, split between the servers
that share the GPU); the rest is the actor's, whose weights and optimizer stay on the GPU while they generate."""
FAULTS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}
"""`Runtime.inject_engine_fault` kinds: a server that dies, a server that stops answering."""


@dataclass
class Runtime:
    """What the driver trains with: the actor, the engine (one, or a pool behind the same protocol), teardown."""

    actor: ActorGroup
    engine: RolloutEngine
    tokenizer: object
    """The model's tokenizer (chat template, decoding), loaded in the driver process."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    servers: Any = None
    """The served engines' keeper: a `ServerSupervisor` in local mode (`rollout.served` or SGLang), a
    `ServedEngineGroup` in disaggregated mode; None for in-process engines."""
    release_engine_memory: bool = False
    """The engines share the actor's GPU memory: release it (`engine.release_memory()`) while the actor trains
    and resume it before the weight sync."""

    def inject_engine_fault(
        self, kind: str, engine: int = 0, delay_s: float = 0.05, busy_timeout_s: float = 30.0
    ) -> threading.Thread:
        """Fault drill (`debug.inject`): "kill" SIGKILLs served engine `engine`'s process group, "hang" SIGSTOPs it.
        Fired from a thread once that engine has requests in flight (or `busy_timeout_s` passed), `delay_s` later,
        so a call right before a rollout hits it mid-generation. Returns the thread (join it to wait for it)."""
        if kind not in FAULTS:
            raise ValueError(f"fault kind must be one of {sorted(FAULTS)}, got {kind!r}")
        if self.servers is None:
            raise RuntimeError(
                "engine faults need served engines: rollout.served=true or rollout.engine=sglang in cluster.mode=local,"
                " or cluster.mode=disaggregated"
            )
        proc, pool = self.servers.processes[engine], self.engine

        def fire() -> None:
            end = time.monotonic() + busy_timeout_s
            while pool.loads()[engine] == 0 and time.monotonic() < end:
                time.sleep(0.002)
            time.sleep(delay_s)
            print(f"lcot-mega: debug.inject: {kind} rollout server {engine} (pid {proc.pid})", flush=True)
            proc.signal(FAULTS[kind])

        thread = threading.Thread(target=fire, name=f"inject-{kind}-{engine}", daemon=True)
        thread.start()
        return thread

    def engine_metrics(self) -> dict[str, float]:
        """Served engines since the last call: `rollout/engine_failures` (engines found dead or hung),
        `rollout/engine_failovers` (requests re-sent to another engine), `rollout/engine_restarts` (restarted and
        re-synced engines that rejoined), and `rollout/engines_live` now. Empty for in-process engines."""
        if self.servers is None:
            return {}
        counts = self.engine.take_counters()
        return {
            "rollout/engine_failures": float(counts["failures"]),
            "rollout/engine_failovers": float(counts["failovers"]),
            "rollout/engine_restarts": float(counts["restarts"]),
            "rollout/engines_live": float(len(self.engine.live())),
        }

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
        runtime.actor = LocalActorGroup(lambda: ActorRank(cfg, engines=[engine]))
    except BaseException:
        runtime.close()
        raise
    runtime.closers.append(runtime.actor.shutdown)
    return runtime


# ---------------------------------------------------------------------------------------------- served engines


class GuardedActorGroup:
    """The local actor, every call that may change its weights (train_step, load_checkpoint, any other method)
    made under `lock`, which a pool recovery also holds while it reads the weights (`resync`, another thread): a
    restarted server never gets a half-applied optimizer step. `sync_weights` and the reads run unlocked:
    `sync_weights` waits for the pool's weight lock, which a recovery holds while it waits for this one."""

    UNLOCKED = frozenset({"compute_logprobs", "sync_weights", "save_checkpoint", "latest_checkpoint"})

    def __init__(self, group: LocalActorGroup) -> None:
        self.group = group
        self.lock = threading.RLock()

    @property
    def rank(self) -> ActorRank:
        return self.group.rank

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.group, name)
        if name in self.UNLOCKED or not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return attr(*args, **kwargs)

        return locked


def push_current_weights(actor: GuardedActorGroup, engine: RolloutEngine, version: int) -> None:
    """Load the actor's weights as they are now into `engine` as `version` (one engine, no collective: local mode
    has one rank, so tensor parallelism is 1 and the HF tensors are read straight from the parameters)."""
    from lcot_mega.bridge.hf_export import DEFAULT_BUCKET_BYTES, iter_hf_buckets
    from lcot_mega.weight_sync.push import engine_buckets

    with actor.lock:
        rank = actor.rank
        buckets = iter_hf_buckets(rank.actor.chunks, rank.actor.arch, rank.bucket_bytes or DEFAULT_BUCKET_BYTES)
        for bucket in engine_buckets(buckets, rank.cfg.rollout.weight_dtype):  # a restarted FP8 server wants FP8
            engine.update_weights(bucket, version)
        engine.update_weights((), version)
        engine.flush_cache()


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


def start_served_engines(
    cfg: Config, log_dir: Path, resync: Callable[[RolloutEngine, int], None] | None = None
) -> tuple[Any, Any]:
    """`cluster.num_engines` supervised servers of `cfg.model.path` and an `EnginePool` over them; a server that
    dies or hangs is restarted on its URL and handed to `resync(engine, weight_version)` (None: its own weights
    are the right ones, as in `lcot-mega eval`) before it takes requests again. Returns (supervisor, pool)."""
    from lcot_mega.rollout.launcher import ServerSupervisor
    from lcot_mega.rollout.pool import EnginePool

    timeout = cfg.rollout.request_timeout_s
    servers = ServerSupervisor(
        server_command(cfg, _served_model(cfg, log_dir)), cfg.cluster.num_engines, log_dir, SERVER_START_TIMEOUT_S,
        env=_server_env(cfg),
    )  # fmt: skip
    print(f"lcot-mega: {cfg.cluster.num_engines} rollout server(s) at {', '.join(servers.urls)}; logs in {log_dir}")

    def on_dead(i: int) -> RolloutEngine:
        print(f"lcot-mega: rollout server {i} failed ({pool.last_errors[i]!r}); restarting it", flush=True)
        servers.restart(i, grace_s=0.0)  # SIGKILL at once: a hung (stopped) server never handles SIGTERM
        return servers.client(i, retries=0, timeout_s=timeout)

    def resync_one(i: int, engine: RolloutEngine) -> None:
        if resync is not None:
            resync(engine, pool.version)
        print(f"lcot-mega: rollout server {i} restarted with weight version {pool.version}", flush=True)

    try:
        pool = EnginePool(
            servers.clients(retries=0, timeout_s=timeout), on_dead=on_dead, resync=resync_one,
            recovery_wait_s=SERVER_START_TIMEOUT_S,
        )  # fmt: skip
    except BaseException:
        servers.shutdown()
        raise
    return servers, pool


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
    """`cluster.num_engines` supervised servers behind an `EnginePool` that restarts and re-syncs a failed one."""
    runtime = Runtime(actor=None, engine=None, tokenizer=load_tokenizer(cfg))  # type: ignore[arg-type]
    runtime.release_engine_memory = cfg.rollout.engine == "sglang"  # SGLang shares the actor's GPU

    def resync(engine: RolloutEngine, version: int) -> None:
        if runtime.actor is not None:  # before the actor exists the servers hold the model's own weights
            push_current_weights(runtime.actor, engine, version)

    servers, pool = start_served_engines(cfg, Path(cfg.trainer.run_dir) / "logs", resync)
    runtime.servers, runtime.engine = servers, pool
    runtime.closers += [servers.shutdown, pool.shutdown]  # popped last-first: the pool goes first, so no recovery
    # starts once teardown began
    try:
        runtime.actor = GuardedActorGroup(LocalActorGroup(lambda: ActorRank(cfg, engines=[pool])))
        runtime.closers.insert(1, runtime.actor.shutdown)  # after the pool, before the servers
    except BaseException:
        runtime.close()
        raise
    return runtime
