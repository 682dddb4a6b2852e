"""Build the run's actor and rollout engine for `cluster.mode`; the driver never looks inside either.

local: one process, no Ray: the actor is one gloo rank and the embedded engine lives beside it, loaded in
place after every step (the quick start). colocated / disaggregated: Ray places the actor ranks and the
engines (`lcot_mega.cluster.ray_runtime`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lcot_mega.cluster.actor_group import ActorGroup, ActorRank, LocalActorGroup
from lcot_mega.config import Config
from lcot_mega.rollout.protocol import RolloutEngine

ROLLOUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    """What the driver trains with: the actor, the engine (one, or a pool behind the same protocol), teardown."""

    actor: ActorGroup
    engine: RolloutEngine
    tokenizer: object
    """The model's tokenizer (chat template, decoding), loaded in the driver process."""
    closers: list[Callable[[], None]] = field(default_factory=list)

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

    return build_ray_runtime(cfg)


def _local_runtime(cfg: Config) -> Runtime:
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
