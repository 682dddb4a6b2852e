"""Sequence parallelism on the local spec (CPU, gloo): at TP2 each rank holds half of every sequence outside attention
and the MLPs. Log-probs equal transformers', and one Adam step gives the model TP1 gives (the norms' partial
gradients all-reduced over TP), padded or packed; a mixture of experts runs at TP2 only this way."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf, response_logprobs

pytest.importorskip("megatron.core")

SEQUENCES = [([1, 5, 9, 13], [20, 30, 40, 50, 60]), ([2, 6, 10], [70, 80, 11, 12]), ([7], [3, 4, 5, 6, 8, 9])]
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, initializer_range=0.2)


def _step(rank: int, world: int, hf_dir: str, tp: int, settings: dict) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.bridge.hf_export import iter_hf_tensors
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    cfg = ActorConfig(tensor_parallel=tp, sequence_parallel=tp > 1, lr=1e-2, **settings)
    actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    before = actor.compute_logprobs(SEQUENCES)
    exported = dict(iter_hf_tensors(actor.chunks, arch))
    saved = load_file(f"{hf_dir}/model.safetensors")
    export = sorted(exported) == sorted(saved) and all(torch.equal(exported[n], saved[n]) for n in saved)
    metrics = actor.train_step(TrainBatch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES], [1.0, -1.0, 0.5]))
    return {"before": before, "after": actor.compute_logprobs(SEQUENCES), "metrics": metrics, "export": export}


def _reference(hf_dir: str) -> list[torch.Tensor]:
    return response_logprobs(hf_dir, SEQUENCES)


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], atol: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g.double(), w.double(), atol=atol), (g.double() - w.double()).abs().max()


@pytest.mark.parametrize(
    ("family", "settings"),
    [
        pytest.param("qwen3", {}, id="dense"),
        pytest.param("qwen3", {"pack_sequences": True}, id="dense-packed", marks=pytest.mark.slow),  # as moe-packed
        pytest.param("qwen3_moe", {}, id="moe", marks=pytest.mark.slow),  # moe-packed covers it and packing
        pytest.param("qwen3_moe", {"pack_sequences": True}, id="moe-packed"),
    ],
)
def test_tp2_with_sequence_parallelism_equals_transformers_and_one_rank(tmp_path, family, settings):
    hf_dir = str(make_tiny_hf(tmp_path, family, **(MOE if family == "qwen3_moe" else {})))
    (single,) = run_gloo(_step, 1, hf_dir, 1, settings)
    want = _reference(hf_dir)
    _assert_close(single["before"], want, 1e-4)
    moved = max((a - b).abs().max() for a, b in zip(single["after"], single["before"], strict=True))
    assert moved > 1e-2  # the step changed the model: the equality below is not of two untouched models
    for out in run_gloo(_step, 2, hf_dir, 2, settings):
        assert out["export"] is True  # the HF tensors back, bit for bit
        _assert_close(out["before"], want, 1e-4)
        _assert_close(out["after"], single["after"], 2e-5)
        assert out["metrics"]["actor/grad_norm"] == pytest.approx(single["metrics"]["actor/grad_norm"], rel=1e-5)


@pytest.mark.parametrize("ep", [pytest.param(1, marks=pytest.mark.slow), 2])  # EP2 folds the two parallelisms
def test_experts_whole_on_each_tp_rank_with_expert_tensor_parallel_1(tmp_path, ep):
    """actor.expert_tensor_parallel=1 at TP2: attention split over two ranks, experts not split; with EP2 the same
    two ranks hold different experts instead (megatron's parallel folding), with EP1 each holds all of them. The
    experts load, export and train whole."""
    hf_dir = str(make_tiny_hf(tmp_path, "qwen3_moe", **MOE))
    (single,) = run_gloo(_step, 1, hf_dir, 1, {})
    for out in run_gloo(_step, 2, hf_dir, 2, {"expert_tensor_parallel": 1, "expert_parallel": ep}):
        assert out["export"] is True
        _assert_close(out["before"], _reference(hf_dir), 1e-4)
        _assert_close(out["after"], single["after"], 2e-5)


@pytest.mark.slow
def test_moe_at_tp2_and_ep2_with_sequence_parallelism(tmp_path):
    """Four ranks: TP2 (experts split over the TP group too) x EP2; the dispatcher's all-gather of unequal parts
    over gloo (cpu_compat pads it) is on this path."""
    hf_dir = str(make_tiny_hf(tmp_path, "qwen3_moe", **MOE))
    (single,) = run_gloo(_step, 1, hf_dir, 1, {})
    for out in run_gloo(_step, 4, hf_dir, 2, {"expert_parallel": 2}):
        _assert_close(out["before"], _reference(hf_dir), 1e-4)
        _assert_close(out["after"], single["after"], 2e-5)


def test_a_moe_at_tp2_without_sequence_parallelism_is_refused(tmp_path):
    from lcot_mega.actor.megatron_adapter import ActorSetupError, moe_kwargs
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig

    arch = arch_from_hf_config(
        {"model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 32}
    )  # fmt: skip
    with pytest.raises(ActorSetupError, match=r"needs actor\.sequence_parallel=true"):
        moe_kwargs(arch, ActorConfig(tensor_parallel=2))
    assert moe_kwargs(arch, ActorConfig(tensor_parallel=2, sequence_parallel=True))["num_moe_experts"] == 4
