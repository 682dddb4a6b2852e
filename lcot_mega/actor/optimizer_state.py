"""The distributed optimizer's checkpoint state without megatron-core's gather buffers, where one rank holds it all.

megatron-core's `DistributedOptimizer.sharded_param_state_fully_reshardable` (0.16) builds the
`fully_reshardable` optimizer state (per model parameter: `param`, `exp_avg`, `exp_avg_sq`, each of the
parameter's shape, so any TP/PP/DP layout loads it) by copying every shard into contiguous local buffers,
all-gathering them into fp32 world buffers and slicing those: three full copies of the fp32 optimizer state
at once, and the slices are views that the torch_dist writer clones once more before writing. Measured on
the quick start (SmolLM2-135M, one process): +3.65 GB while the state dict is built, +1.2 GB while it is
written, on top of a 2.2 GB trainer (docs/LOG.md, session 8).

When the optimizer's data-parallel group has one rank, every model parameter's main parameter and Adam
moments already live whole in that rank's own tensors. `zero_copy_param_state` then returns the same
structure (keys, shapes, metadata, values) as megatron's function, built on reshaped views of those live
tensors: nothing is copied or gathered, and the writer does not clone them (each is its storage whole).
Elsewhere it declines (None) and megatron's own function runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
_PREFIX = "optimizer.state"


def _distributed_optimizers(optimizer: Any) -> list[Any]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _live_states(opt: Any, model_param: torch.nn.Parameter) -> dict[str, torch.Tensor] | None:
    """This parameter's main parameter and Adam moments if they hold all of it in fp32; None otherwise."""
    tensors = opt._get_main_param_and_optimizer_states(model_param)
    if any(key not in tensors for key in _STATE_KEYS):
        return None  # Adam's state not made yet: megatron's path zero-fills it
    for key in _STATE_KEYS:
        t = tensors[key]
        if t.dtype != torch.float32 or t.numel() != model_param.numel() or not t.is_contiguous():
            return None
    return {key: tensors[key].detach() for key in _STATE_KEYS}


def zero_copy_param_state(opt: Any, model_sharded_state_dict: dict) -> dict | None:
    """megatron's `fully_reshardable` parameter state of `opt` built on its live tensors, or None where that does
    not apply (data-parallel size above one, a precision-aware optimizer, a parameter split over shards)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    if opt.data_parallel_group.size() != 1 or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return None
    tensors_only, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    metadata_of = {sh.data: sh for sh in nested_values(tensors_only)}
    state: dict[int, dict] = {}
    for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
        if len(gbuf_range_maps) != 1:
            return None
        buffer = opt.buffers[gbuf_idx]
        for model_param, (start, end, _) in buffer.param_index_map.items():  # megatron's order: param_idx
            meta = metadata_of.get(model_param)
            live = _live_states(opt, model_param)
            if meta is None or meta.flattened_range is not None or live is None or end - start != model_param.numel():
                return None
            entry = {}
            for key, tensor in live.items():
                data = tensor.view(meta.data.shape)
                name = f"{_PREFIX}.{key}.{meta.key}"
                kwargs = dict(key=name, data=data, dtype=data.dtype, replica_id=meta.replica_id)
                if isinstance(meta, ShardedTensorFactory):
                    kwargs.pop("dtype")
                entry[key] = replace(meta, **kwargs)
                entry[key].validate_metadata_integrity()
            state[len(state)] = entry
    return state


@contextlib.contextmanager
def saving_without_copies(optimizer: Any) -> Iterator[None]:
    """Within the block, `optimizer.sharded_state_dict(..., is_loading=False)` of a fully_reshardable save takes
    `zero_copy_param_state` where it applies (megatron's own function elsewhere and for loading)."""
    patched = []
    for opt in _distributed_optimizers(optimizer):
        original = opt.sharded_param_state_fully_reshardable

        def build(model_sd, is_loading=False, metadata=None, _opt=opt, _original=original):
            state = None if is_loading else zero_copy_param_state(_opt, model_sd)
            return state if state is not None else _original(model_sd, is_loading, metadata)

        opt.sharded_param_state_fully_reshardable = build  # the instance attribute shadows the method
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt.sharded_param_state_fully_reshardable
