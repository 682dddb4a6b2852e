"""The on-disk checkpoint store (pure Python): atomic step directories, a latest pointer, good marks.

Megatron dist-checkpointing on top of it lives with the actor (`lcot_mega.actor.checkpoint`); the HF <->
Megatron converter with the bridge (`lcot_mega.bridge.convert`).
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
