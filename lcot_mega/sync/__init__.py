"""Trainer -> rollout weight sync (Megatron shards -> HF tensors -> engines) and train/rollout consistency checks."""

from lcot_mega.sync.broadcast import BroadcastSync
from lcot_mega.sync.consistency import logprob_gap
from lcot_mega.sync.weight_sync import (
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
