"""Megatron dist-checkpoints: reshard on load (TP=2 -> TP=1 / PP=2) and resume training identically.

Two gloo launches of 2 processes cover everything (a launch costs seconds): the first saves, the second is
a fresh process group that loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import TINY_SHAPE, VOCAB

pytest.importorskip("megatron.core")

ARCH = dict(TINY_SHAPE, model_type="llama")
INPUT_IDS = torch.tensor([[5, 17, 3, 88, 42, 7, 61, 0, 95, 23, 11, 70], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
LR = 1e-3


def _setup(tp: int = 1, pp: int = 1, seed: int = 1, **arch_overrides):
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig

    ma.destroy_parallel()
    cfg = ActorConfig(tensor_parallel=tp, pipeline_parallel=pp)
    ma.init_parallel(cfg, seed=seed)
    return ma.build_model(arch_from_hf_config({**ARCH, **arch_overrides}), cfg)


def _logits(chunks, ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [B, S, V] on the last pipeline stage (None elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1]).unsqueeze(0)

    def forward_step(data, model):
        out = model(next(data), pos, None)
        return out, lambda o, non_loss_data=True: gather_from_tensor_model_parallel_region(o)[..., :VOCAB]

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([ids]),
            model=chunks,
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    return out[0] if out else None


def _trainer(seed: int):
    """DP=2 GPTModel with megatron DDP, the distributed optimizer (torch AdamW) and a warmup schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunks = _setup(seed=seed)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = [DistributedDataParallel(c.config, ddp_config, c) for c in chunks]
    opt_config = OptimizerConfig(optimizer="adam", lr=LR, min_lr=0.0, weight_decay=0.01, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = OptimizerParamScheduler(optimizer, 0.0, LR, 0.0, 3, 10, "linear", 0.01, 0.01, 10, "constant")
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: range) -> list[float]:
    """Steps of a stand-in loss (mean squared logit) on batches that depend on the step and DP rank only."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + ps.get_data_parallel_rank())
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model[0](ids, torch.arange(12).unsqueeze(0), None).pow(2).mean()
        loss.backward()
        finalize_model_grads(model)
        assert optimizer.step()[0]
        scheduler.step(1)
        losses.append(loss.item())
    return losses


def _save_phase(rank: int, world: int, tmp: str) -> dict:
    from lcot_mega.actor import checkpoint as mc

    chunks = _setup(tp=2)
    out = {"logits": _logits(chunks, INPUT_IDS)}
    mc.save(chunks, f"{tmp}/tp2", 5, extra={"note": "saved at tp2"})

    model, optimizer, scheduler = _trainer(seed=1)
    store = mc.dist_store(f"{tmp}/run", keep_last=2)
    mc.save(model, store, 0, optimizer=optimizer, scheduler=scheduler)  # a fresh optimizer has no `step` yet
    _train(model, optimizer, scheduler, range(2))
    mc.save(model, store, 2, optimizer=optimizer, scheduler=scheduler, extra={"consumed": 2})
    out["rand_after_save"] = torch.rand(3)
    out["reference"] = _train(model, optimizer, scheduler, range(2, 4))
    out["steps_on_disk"] = store.steps()
    return out


def _load_phase(rank: int, world: int, tmp: str) -> dict:
    from lcot_mega.actor import checkpoint as mc

    out = {}
    chunks = _setup(tp=1, seed=7)  # TP=1, DP=2; another init, so equal logits prove the load
    info = mc.load(chunks, f"{tmp}/tp2")
    out["tp1"] = (_logits(chunks, INPUT_IDS), info["step"], info["extra"], info["rng_restored"])
    chunks = _setup(pp=2, seed=7)
    mc.load(chunks, f"{tmp}/tp2")
    out["pp2"] = _logits(chunks, INPUT_IDS)

    model, optimizer, scheduler = _trainer(seed=3)
    info = mc.load(model, f"{tmp}/run", optimizer=optimizer, scheduler=scheduler)  # the root: newest valid
    steps = [s["step"] for o in mc._torch_optimizers(optimizer) for s in o.state.values()]
    out["resume"] = (info["step"], info["extra"], info["rng_restored"], torch.rand(3))
    out["step_tensors"] = (len(steps), len({id(s) for s in steps}), {s.item() for s in steps})
    out["resumed"] = _train(model, optimizer, scheduler, range(2, 4))

    wrong = _setup(seed=7, hidden_size=32, intermediate_size=56)
    with pytest.raises(mc.CheckpointMismatchError, match="hidden_size: checkpoint 64, model 32") as e:
        mc.load(wrong, f"{tmp}/tp2")
    out["mismatch"] = str(e.value)
    return out


def test_save_reshard_load_and_resume_identically(tmp_path):
    saved = run_gloo(_save_phase, 2, str(tmp_path))
    loaded = run_gloo(_load_phase, 2, str(tmp_path))
    reference = saved[0]["logits"]
    assert torch.equal(reference, saved[1]["logits"])
    assert saved[0]["steps_on_disk"] == [0, 2]
    for rank in range(2):
        logits, step, extra, rng_restored = loaded[rank]["tp1"]
        assert (logits - reference).abs().max().item() < 1e-6
        assert (step, extra, rng_restored) == (5, {"note": "saved at tp2"}, False)  # other layout: RNG kept
    assert loaded[0]["pp2"] is None  # first stage
    assert (loaded[1]["pp2"] - reference).abs().max().item() < 1e-6

    for rank in range(2):
        step, extra, rng_restored, rand = loaded[rank]["resume"]
        assert (step, extra, rng_restored) == (2, {"consumed": 2}, True)
        assert torch.equal(rand, saved[rank]["rand_after_save"])
        assert loaded[rank]["resumed"] == saved[rank]["reference"]
        n, distinct, values = loaded[rank]["step_tensors"]
        assert n > 1 and distinct == n and values == {2.0}  # each param its own `step`, at the saved count


def _virtual_pipeline_phase(rank: int, world: int, tmp: str, hf_dir: str) -> torch.Tensor | None:
    from lcot_mega.actor import checkpoint as mc
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.bridge.hf_load import load_hf_weights
    from lcot_mega.config import ActorConfig

    arch = arch_from_hf_config(json.loads((Path(hf_dir) / "config.json").read_text()))
    cfg = ActorConfig(pipeline_parallel=2, virtual_pipeline=2)
    ma.init_parallel(cfg, seed=1)
    chunks = ma.build_model(arch, cfg)  # 4 layers: one per (stage, virtual stage)
    load_hf_weights(chunks, hf_dir, arch, 0, 1)
    mc.save(chunks, f"{tmp}/vpp", 1)
    ma.destroy_parallel()
    chunks = _setup(seed=7)  # TP=1 DP=2: one chunk holds all 4 layers
    mc.load(chunks, f"{tmp}/vpp")
    return _logits(chunks, INPUT_IDS)


@pytest.mark.slow
def test_virtual_pipeline_chunks_save_and_load_into_one_chunk(tmp_path):
    from helpers.tiny_models import hf_logits, make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    reference = hf_logits(hf, INPUT_IDS)
    for logits in run_gloo(_virtual_pipeline_phase, 2, str(tmp_path), str(hf)):
        assert (logits - reference).abs().max().item() < 1e-4


class _Evil:
    """Unpickling it would run a command: what a tampered checkpoint could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickles_in_a_checkpoint_are_checked_before_megatron_reads_them(tmp_path):
    import io
    import pickle

    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    from lcot_mega.actor.checkpoint import UnsafeCheckpointError, check_pickles_safe

    def dcp_dir(name: str, obj: object) -> Path:
        """A torch_dist directory as megatron writes one: a tensor and a ShardedObject's bytes."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        state = {"w": torch.ones(3), "obj": buf}
        planner = MCoreSavePlanner(flatten_state_dict=False)
        dcp.save(state, checkpoint_id=str(tmp_path / name), planner=planner, no_dist=True)
        return tmp_path / name

    marker = tmp_path / "pwned"
    check_pickles_safe(dcp_dir("benign", [None]))  # what megatron's `_extra_state` objects hold
    with pytest.raises(UnsafeCheckpointError, match="object obj is not a plain-tensor pickle"):
        check_pickles_safe(dcp_dir("evil_object", _Evil(marker)))

    evil_common = dcp_dir("evil_common", [None])
    torch.save({"x": _Evil(marker)}, evil_common / "common.pt")
    with pytest.raises(UnsafeCheckpointError, match="cannot read its metadata safely"):
        check_pickles_safe(evil_common)

    evil_meta = dcp_dir("evil_meta", [None])
    (evil_meta / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
        check_pickles_safe(evil_meta)
    assert not marker.exists()
