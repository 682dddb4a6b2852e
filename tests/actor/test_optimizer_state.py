"""The one-rank optimizer checkpoint state is megatron-core's own `fully_reshardable` state, built without copies.

Reference: megatron-core's `sharded_param_state_fully_reshardable` on the same optimizer (same keys, shapes,
metadata and values). The zero-copy state must share storage with the optimizer's live tensors, and a
checkpoint saved with it must load back into a fresh actor's optimizer with equal state.
"""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf
from helpers.train_batches import random_train_batch

from lcot_mega.config import ActorConfig, AlgoConfig

pytest.importorskip("megatron.core")

SETTINGS = dict(lr=1e-3, micro_batch_tokens=24, logits_chunk_tokens=5)


def _meta(sh) -> dict:
    """Every field of a ShardedTensor / ShardedTensorFactory but its data (functions by name)."""
    from dataclasses import fields

    values = {f.name: getattr(sh, f.name) for f in fields(sh) if f.name != "data"}
    return {k: getattr(v, "__qualname__", v) if callable(v) else v for k, v in values.items()} | {"type": type(sh)}


def _flat(param_state: dict) -> dict[str, object]:
    return {sh.key: sh for entry in param_state.values() for sh in entry.values()}


def _live(actor) -> dict[int, torch.Tensor]:
    """data_ptr -> tensor of every main parameter and Adam moment the optimizer holds."""
    from lcot_mega.actor.checkpoint import _torch_optimizers

    live = {}
    for opt in _torch_optimizers(actor.optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                for t in [p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]:
                    live[t.data_ptr()] = t
    return live


def _worker(rank: int, world: int, hf_dir: str, precision: str, tmp: str) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor import checkpoint as mc
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.optimizer_state import _distributed_optimizers, zero_copy_param_state
    from lcot_mega.bridge.arch import arch_from_hf_config

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    cfg = ActorConfig(precision=precision, **SETTINGS)
    actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    for step in range(2):
        assert actor.train_step(random_train_batch(step))["actor/update_ok"] == 1.0
    (opt,) = _distributed_optimizers(actor.optimizer)
    model_sd = mc.model_sharded_state_dict(actor.chunks)
    ours = zero_copy_param_state(opt, model_sd)
    theirs = opt.sharded_param_state_fully_reshardable(model_sd, False, dict(mc.OPTIMIZER_METADATA))
    live = _live(actor)
    shares = [sh.data.data_ptr() in live for sh in _flat(ours).values()]
    out = {
        "ours": {k: (_meta(sh), sh.data.clone()) for k, sh in _flat(ours).items()},
        "theirs": {k: (_meta(sh), sh.data.clone()) for k, sh in _flat(theirs).items()},
        "order": ([sorted(e) for e in ours.values()], [sorted(e) for e in theirs.values()]),
        "shares_storage": shares,
    }
    saved_states = {p: t.clone() for p, t in live.items()}

    def gathered(*args, **kwargs):
        raise AssertionError("the save gathered the optimizer state")

    opt.get_parameter_state_dp_zero = gathered  # a one-rank save must not build megatron's world buffers
    mc.save(actor.chunks, f"{tmp}/ckpt", 2, optimizer=actor.optimizer)
    del opt.get_parameter_state_dp_zero
    ma.destroy_parallel()

    fresh = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    fresh.train_step(random_train_batch(7))  # other state, so equality proves the load
    mc.load(fresh.chunks, f"{tmp}/ckpt", optimizer=fresh.optimizer)
    before = sorted(saved_states.values(), key=lambda t: (t.numel(), t.sum().item()))
    after = sorted(_live(fresh).values(), key=lambda t: (t.numel(), t.sum().item()))
    same = len(before) == len(after)
    out["reloaded_equal"] = same and all(torch.equal(a, b) for a, b in zip(before, after, strict=same))
    ma.destroy_parallel()
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_copy_state_equals_megatrons_and_reloads(tmp_path, precision):
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    (out,) = run_gloo(_worker, 1, str(hf), precision, str(tmp_path))
    assert out["ours"].keys() == out["theirs"].keys() and len(out["ours"]) > 0
    assert out["order"][0] == out["order"][1]
    for key, (meta, data) in out["ours"].items():
        their_meta, their_data = out["theirs"][key]
        assert meta == their_meta, key
        assert torch.equal(data, their_data), key
    assert all(out["shares_storage"])  # each is the optimizer's own tensor (fp32: the main param is the model's)
    assert out["reloaded_equal"]


def _dp2_worker(rank: int, world: int, hf_dir: str) -> bool | None:
    from transformers import AutoConfig

    from lcot_mega.actor import checkpoint as mc
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.optimizer_state import _distributed_optimizers, zero_copy_param_state
    from lcot_mega.bridge.arch import arch_from_hf_config

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(**SETTINGS), AlgoConfig(), hf_dir)
    actor.train_step(random_train_batch(0))
    (opt,) = _distributed_optimizers(actor.optimizer)
    declined = zero_copy_param_state(opt, mc.model_sharded_state_dict(actor.chunks)) is None
    ma.destroy_parallel()
    return declined


def test_declines_with_two_data_parallel_ranks(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    assert run_gloo(_dp2_worker, 2, str(hf)) == [True, True]
