"""Trainer -> rollout weight sync (Megatron shards -> HF tensors -> engines) and train/rollout consistency checks."""

from lcot_mega.weight_sync.broadcast import BroadcastSync
from lcot_mega.weight_sync.consistency import logprob_gap
from lcot_mega.weight_sync.push import (
    ProbeCheck,
    SyncReport,
    WeightSyncError,
    WeightTransport,
    sync_weights,
    verify_weights,
)

__all__ = [
    "BroadcastSync",
    "ProbeCheck",
    "SyncReport",
    "WeightSyncError",
    "WeightTransport",
    "logprob_gap",
    "sync_weights",
    "verify_weights",
]
