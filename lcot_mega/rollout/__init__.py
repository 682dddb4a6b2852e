"""Rollout engines: the protocol every backend implements, token sampling, and the embedded transformers engine.

Backends: `embedded.EmbeddedEngine` (in-process, CPU-capable) and `http_client.SGLangHTTPEngine` (any server
speaking SGLang's HTTP API: real SGLang, or `server.RolloutServer` serving an embedded engine).
transformers is imported only when an engine is built.
"""

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.http_client import SGLangHTTPEngine
from lcot_mega.rollout.launcher import (
    ServerProcess,
    ServerStartError,
    ServerSupervisor,
    embedded_command,
    sglang_command,
)
from lcot_mega.rollout.pool import EnginePool, NoLiveEngineError, is_engine_failure
from lcot_mega.rollout.protocol import (
    MEMORY_TAGS,
    Completion,
    RolloutEngine,
    SamplingParams,
    check_memory_tags,
    to_samples,
)
from lcot_mega.rollout.sampling import check_sampling_args, process_logits, sample
from lcot_mega.rollout.server import RolloutServer, ServeConfig

__all__ = [
    "MEMORY_TAGS",
    "Completion",
    "EmbeddedEngine",
    "EnginePool",
    "NoLiveEngineError",
    "RolloutEngine",
    "RolloutServer",
    "SGLangHTTPEngine",
    "SamplingParams",
    "ServeConfig",
    "ServerProcess",
    "ServerStartError",
    "ServerSupervisor",
    "check_memory_tags",
    "check_sampling_args",
    "embedded_command",
    "is_engine_failure",
    "process_logits",
    "sample",
    "sglang_command",
    "to_samples",
]
