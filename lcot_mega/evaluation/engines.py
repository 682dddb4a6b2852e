"""What `lcot-mega eval` samples from: the model (an HF directory, or a Megatron checkpoint converted through the
bridge) behind an embedded engine, supervised servers (`lcot-mega serve` on CPU, SGLang on GPUs), or servers that
are already running."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from lcot_mega.config import Config
from lcot_mega.rollout.protocol import RolloutEngine

ENGINES = ("embedded", "served", "sglang")


class ModelError(ValueError):
    """MODEL names nothing that can be evaluated; the message says what was expected."""


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


@contextlib.contextmanager
def resolved_model(model: str | Path, work_dir: Path) -> Iterator[Path]:
    """An HF directory for `model`: the directory itself, or a Megatron checkpoint (a checkpoint directory, a
    checkpoint root, or a run directory: its newest valid checkpoint) converted into `work_dir`, removed after."""
    from lcot_mega.checkpoint.store import CheckpointStoreError

    path = Path(model)
    if not path.exists():
        raise ModelError(f"model {path} does not exist")
    if is_hf_dir(path):
        yield path
        return
    source = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    from lcot_mega.bridge.convert import ConversionError, mcore_to_hf

    try:
        say = lambda msg: print(f"lcot-mega eval: {msg}", file=sys.stderr)  # noqa: E731
        try:
            out = mcore_to_hf(source, work_dir / "model-hf", overwrite=True, progress=say)
        except (CheckpointStoreError, ConversionError) as e:
            raise ModelError(
                f"model {path} is neither a Hugging Face directory (no config.json) nor a readable Megatron"
                f" checkpoint: {e}"
            ) from None
        yield out
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


@contextlib.contextmanager
def opened_engine(
    cfg: Config, kind: str, urls: Sequence[str], log_dir: Path, api_key: str | None = None
) -> Iterator[RolloutEngine]:
    """The engine of `kind` on `cfg.model.path` (or a pool over running servers at `urls`), shut down on exit
    (servers it did not start are left running)."""
    from lcot_mega.cluster.runtime import ROLLOUT_DTYPES, start_served_engines
    from lcot_mega.rollout.pool import EnginePool

    if urls:
        from lcot_mega.rollout.http_client import SGLangHTTPEngine

        engines = [SGLangHTTPEngine(u, api_key, timeout_s=cfg.rollout.request_timeout_s) for u in urls]
        unhealthy = [u for u, e in zip(urls, engines, strict=True) if not e.health()]
        if unhealthy:
            raise ModelError(f"rollout server(s) not answering /health: {', '.join(unhealthy)}")
        pool = EnginePool(engines)
        try:
            yield pool
        finally:
            pool.shutdown()
        return
    if kind == "embedded":
        from lcot_mega.rollout.embedded import EmbeddedEngine

        engine = EmbeddedEngine(cfg.model.path, dtype=ROLLOUT_DTYPES[cfg.model.dtype])
        try:
            yield engine
        finally:
            engine.shutdown()
        return
    if kind not in ENGINES:
        raise ModelError(f"--engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    cfg.rollout.engine = "sglang" if kind == "sglang" else "embedded"
    served = start_served_engines(cfg, log_dir)
    try:
        yield served.pool
    finally:
        served.shutdown()
