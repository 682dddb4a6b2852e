"""Shared fixtures of the Ray runtime tests: a sharp tiny Llama with a character tokenizer, and its configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_model_dir

from lcot_mega.config import ActorConfig, ClusterConfig, Config, ModelConfig, TrainerConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def ray_config(model_dir, tmp_path) -> Callable[..., Config]:
    """`ray_config(tensor_parallel=1, **cluster)`: the tiny model with fp32 engines (log-probs agree with the
    actor to ~1e-5), a large learning rate (one step visibly moves the weights) and this test's run dir."""

    def make(tensor_parallel: int = 1, **cluster) -> Config:
        return Config(
            model=ModelConfig(path=str(model_dir), dtype="float32"),
            actor=ActorConfig(tensor_parallel=tensor_parallel, lr=1e-3, micro_batch_tokens=1024),
            trainer=TrainerConfig(run_dir=str(tmp_path / "run"), seed=3),
            cluster=ClusterConfig(**cluster),
        )

    return make


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray instance for a module's tests, sized for two actor ranks and two served engines (a runtime
    reuses it and leaves it running)."""
    from lcot_mega.cluster.ray_runtime import start_ray

    stop = start_ray(ClusterConfig(mode="disaggregated", actor_ranks=2, num_engines=2))
    yield
    if stop is not None:
        stop()
