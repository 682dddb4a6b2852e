"""Actor set-up refuses what cannot run here, naming the key to change."""

from __future__ import annotations

import pytest
import torch

from lcot_mega.actor.megatron_adapter import padded_vocab_size, params_dtype, setup_errors
from lcot_mega.bridge.arch import arch_from_hf_config
from lcot_mega.config import ActorConfig

ON_CPU = not torch.cuda.is_available()


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU refusals")
def test_gpu_only_features_are_refused_on_cpu_with_the_key_to_change():
    errors = setup_errors(ActorConfig(fp8="e4m3", sequence_parallel=True, tensor_parallel=2, precision="bf16"), 2)
    text = "\n".join(errors)
    assert "actor.fp8 = 'e4m3' needs Transformer Engine" in text
    assert "sequence_parallel" not in text  # it runs on CPU (tests/actor/test_sequence_parallel.py)
    assert "bf16" not in text  # bf16 runs on CPU (tests/actor/test_bf16_cpu.py)


def test_layout_must_fit_the_world():
    assert (
        "not divisible by actor.tensor_parallel * actor.pipeline_parallel * actor.context_parallel = 2 * 2 * 1"
        in setup_errors(ActorConfig(tensor_parallel=2, pipeline_parallel=2), 6)[0]
    )
    assert setup_errors(ActorConfig(tensor_parallel=2, pipeline_parallel=2), 8) == []
    assert "virtual_pipeline needs actor.pipeline_parallel >= 2" in setup_errors(ActorConfig(virtual_pipeline=2), 1)[0]


def test_packing_needs_the_chunked_head_sdpa_or_te_and_no_virtual_pipeline():
    assert setup_errors(ActorConfig(pack_sequences=True), 1) == []
    bad = ActorConfig(
        pack_sequences=True, logits_chunk_tokens=0, attention="local", pipeline_parallel=2, virtual_pipeline=2
    )
    text = "\n".join(setup_errors(bad, 2))
    assert "pack_sequences needs actor.logits_chunk_tokens > 0" in text
    assert "pack_sequences needs actor.attention auto or sdpa" in text
    assert "pack_sequences needs no actor.virtual_pipeline" in text


def test_precision_and_vocab_padding():
    assert params_dtype(ActorConfig(precision="fp32")) == torch.float32
    if ON_CPU:
        assert params_dtype(ActorConfig()) == torch.float32
    assert padded_vocab_size(97, 2) == 98 and padded_vocab_size(96, 2) == 96 and padded_vocab_size(5, 8) == 8


def test_arch_reads_the_family_features():
    base = dict(num_attention_heads=4, hidden_size=64, intermediate_size=112, num_hidden_layers=2, vocab_size=96)
    llama = arch_from_hf_config({"model_type": "llama", "num_key_value_heads": 2, **base})
    assert (llama.qkv_bias, llama.qk_norm, llama.head_dim, llama.heads_per_group) == (False, False, 16, 2)
    assert arch_from_hf_config({"model_type": "qwen2", **base}).qkv_bias
    qwen3 = arch_from_hf_config({"model_type": "qwen3", "head_dim": 32, **base})
    assert qwen3.qk_norm and qwen3.head_dim == 32
    scaled = arch_from_hf_config(
        {
            "model_type": "llama",
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0},
            **base,
        }
    )
    assert (scaled.rope_theta, scaled.rope_scaling_factor) == (500000.0, 32.0)


def test_context_parallel_must_fit_the_world_and_refuses_what_it_does_not_split():
    assert setup_errors(ActorConfig(context_parallel=2, tensor_parallel=2), 8) == []
    assert (
        "not divisible by actor.tensor_parallel * actor.pipeline_parallel * actor.context_parallel = 2 * 1 * 2"
        in setup_errors(ActorConfig(context_parallel=2, tensor_parallel=2), 6)[0]
    )
    bad = ActorConfig(
        context_parallel=2, pack_sequences=True, attention="local", pipeline_parallel=2, virtual_pipeline=2
    )
    text = "\n".join(setup_errors(bad, 4))
    assert "actor.context_parallel = 2 needs actor.pack_sequences=false" in text
    assert "actor.context_parallel = 2 needs actor.attention auto or sdpa" in text
    assert (
        "context_parallel = 2 needs no actor.virtual_pipeline" not in text
    )  # it splits like the rest (test_train_step)


def test_context_parallel_reaches_megatron_config():
    from lcot_mega.actor.megatron_adapter import transformer_config

    arch = arch_from_hf_config(
        {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 112}
        | {"num_hidden_layers": 2, "vocab_size": 96}
    )
    config = transformer_config(arch, ActorConfig(context_parallel=2))
    assert (config.context_parallel_size, config.cp_comm_type) == (2, "p2p")  # TE's ring; sdpa all-gathers instead
    assert transformer_config(arch, ActorConfig()).context_parallel_size == 1
