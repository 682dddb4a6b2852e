"""Trainer -> rollout weight sync (Megatron shards -> HF tensors -> engines) and train/rollout consistency checks."""

from lcot_mega.sync.consistency import logprob_gap
from lcot_mega.sync.weight_sync import ProbeCheck, SyncReport, WeightSyncError, sync_weights, verify_weights

__all__ = [
    "ProbeCheck",
    "SyncReport",
    "WeightSyncError",
    "logprob_gap",
    "sync_weights",
    "verify_weights",
]
