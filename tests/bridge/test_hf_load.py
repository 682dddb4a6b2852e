"""HF safetensors loaded into Megatron-core give the transformers model's logits, in every layout."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import FAMILIES, VOCAB, hf_logits, make_tiny_hf

from lcot_mega.bridge.arch import UnsupportedModelError, arch_from_hf_config
from lcot_mega.bridge.hf_load import CheckpointError, safetensors_index

pytest.importorskip("megatron.core")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# 120 positions and sharp attention (initializer_range 0.2): RoPE scaling then moves logits by ~0.85,
# so a wrong frequency table cannot pass the 1e-4 bound.
INPUT_IDS = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(0))
SHARP = {"initializer_range": 0.2}


def _megatron_logits(rank: int, world: int, hf_dirs: list[str], tp: int) -> list[torch.Tensor]:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.hf_load import load_hf_weights
    from lcot_mega.config import ActorConfig

    cfg = ActorConfig(tensor_parallel=tp)
    layout = ma.init_parallel(cfg, seed=1)
    out = []
    for hf_dir in hf_dirs:
        arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
        chunks = ma.build_model(arch, cfg)
        load_hf_weights(chunks, hf_dir, arch, layout.tp_rank, layout.tp_size)
        with torch.no_grad():
            logits = chunks[0](INPUT_IDS, torch.arange(INPUT_IDS.shape[1]).unsqueeze(0), None)  # [B, S, V/tp]
            out.append(gather_from_tensor_model_parallel_region(logits)[..., :VOCAB])
    return out


@pytest.mark.parametrize(("world", "tp"), [(1, 1), (2, 2), (2, 1)], ids=["tp1", "tp2", "dp2"])
def test_megatron_logits_equal_transformers(tmp_path, world, tp):
    # one run per layout covers every family (a gloo launch costs seconds); qwen3 also checks tied embeddings
    dirs = [make_tiny_hf(tmp_path / f, f, tie=f == "qwen3", **SHARP) for f in FAMILIES]
    dirs.append(make_tiny_hf(tmp_path / "llama3-rope", "llama", rope_parameters=LLAMA3_ROPE, **SHARP))
    expected = [hf_logits(d, INPUT_IDS) for d in dirs]
    for per_rank in run_gloo(_megatron_logits, world, [str(d) for d in dirs], tp):
        for family, logits, ref in zip([*FAMILIES, "llama3-rope"], per_rank, expected, strict=True):
            assert (logits - ref).abs().max().item() < 1e-4, family


def test_unsupported_architecture_is_named_with_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        arch_from_hf_config({"model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="RoPE scaling"):
        arch_from_hf_config(
            {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64, "rope_scaling": {"rope_type": "yarn"}}
        )


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pickled \.bin weights only"):
        safetensors_index(tmp_path)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        safetensors_index(tmp_path / "empty")


def test_expert_names_are_global_for_both_of_megatrons_expert_modules():
    """SequentialMLP names a rank's experts `local_experts.{j}.linear_fc1.weight`, Transformer Engine's grouped GEMM
    `linear_fc1.weight{j}`; both become the global index (this rank holds experts 4..7) in SequentialMLP's form,
    which the mapping reads."""
    from lcot_mega.bridge.hf_load import global_expert_name

    local = [4, 5, 6, 7]
    assert global_expert_name("decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight", local) == (
        "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight"
    )
    assert global_expert_name("decoder.layers.3.mlp.experts.linear_fc1.weight2", local) == (
        "decoder.layers.3.mlp.experts.local_experts.6.linear_fc1.weight"
    )
    assert global_expert_name("decoder.layers.3.mlp.router.weight", local) == "decoder.layers.3.mlp.router.weight"
