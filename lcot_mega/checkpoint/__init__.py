"""Checkpoints: the on-disk store (pure Python) and Megatron dist-checkpointing on top of it.

`lcot_mega.checkpoint.megatron_ckpt` (model, optimizer, scheduler, RNG) and `lcot_mega.checkpoint.convert`
(HF <-> Megatron) import megatron-core and torch; import them explicitly.
"""

from lcot_mega.checkpoint.store import (
    Checkpoint,
    CheckpointStore,
    CheckpointStoreError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NoCheckpointError,
    atomic_checkpoint_dir,
    step_dir_name,
    verify_checkpoint_dir,
)

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "CheckpointStoreError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NoCheckpointError",
    "atomic_checkpoint_dir",
    "step_dir_name",
    "verify_checkpoint_dir",
]
