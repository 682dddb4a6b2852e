"""Rollout engines: the protocol every backend implements, token sampling, and the embedded transformers engine.

Backends: `embedded.EmbeddedEngine` (in-process, CPU-capable); SGLang and vLLM servers speak the same protocol
from their own modules. transformers is imported only when an engine is built.
"""

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import (
    MEMORY_TAGS,
    Completion,
    RolloutEngine,
    SamplingParams,
    check_memory_tags,
    to_samples,
)
from lcot_mega.rollout.sampling import check_sampling_args, process_logits, sample

__all__ = [
    "MEMORY_TAGS",
    "Completion",
    "EmbeddedEngine",
    "RolloutEngine",
    "SamplingParams",
    "check_memory_tags",
    "check_sampling_args",
    "process_logits",
    "sample",
    "to_samples",
]
