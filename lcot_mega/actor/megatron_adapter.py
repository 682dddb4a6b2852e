"""The one adapter between lcot-mega's typed config and megatron-core's world (STYLE.md rule 6).

Everything that touches megatron-core's `TransformerConfig`, layer specs, `GPTModel` construction or
`parallel_state` goes through here; nothing else reads Megatron globals. On a CPU-only torch the
compatibility shim (`cpu_compat`) is enabled first and the local (non-Transformer-Engine) layer spec
is used; on GPU the Transformer Engine spec is used when TE imports.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lcot_mega.actor import cpu_compat
from lcot_mega.bridge.arch import ArchSpec
from lcot_mega.config import ActorConfig


class ActorSetupError(ValueError):
    """The requested actor layout or precision cannot run here; the message says what to change."""


@dataclass(frozen=True)
class ModelLayout:
    """Where this rank sits, as megatron-core's parallel state reports it."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vpp_size: int | None


def te_available() -> bool:
    """Transformer Engine is importable and a GPU is present (it has no CPU path)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def params_dtype(cfg: ActorConfig) -> torch.dtype:
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def setup_errors(cfg: ActorConfig, world_size: int) -> list[str]:
    """What prevents `cfg` from running on this machine with `world_size` ranks (empty: it can run)."""
    errors = []
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel
    if world_size % model_parallel:
        errors.append(
            f"world size {world_size} is not divisible by actor.tensor_parallel * actor.pipeline_parallel"
            f" = {cfg.tensor_parallel} * {cfg.pipeline_parallel}"
        )
    if cfg.virtual_pipeline is not None and cfg.pipeline_parallel < 2:
        errors.append("actor.virtual_pipeline needs actor.pipeline_parallel >= 2")
    if cfg.fp8 is not None and not te_available():
        errors.append(f"actor.fp8 = {cfg.fp8!r} needs Transformer Engine on a GPU; set actor.fp8=null here")
    if cfg.sequence_parallel and not te_available():
        errors.append("actor.sequence_parallel needs Transformer Engine (or apex) on a GPU; set it to false here")
    if cfg.sequence_parallel and cfg.tensor_parallel == 1:
        errors.append("actor.sequence_parallel needs actor.tensor_parallel > 1")
    if cfg.precision == "bf16" and not torch.cuda.is_available():
        errors.append("actor.precision = 'bf16' is GPU only here; use 'auto' or 'fp32' on CPU")
    return errors


def init_parallel(cfg: ActorConfig, seed: int) -> ModelLayout:
    """Initialize megatron-core's parallel state on the already initialized default process group."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        raise ActorSetupError("torch.distributed must be initialized before the actor (gloo on CPU, nccl on GPU)")
    errors = setup_errors(cfg, torch.distributed.get_world_size())
    if errors:
        raise ActorSetupError("; ".join(errors))
    cpu_compat.enable()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=cfg.pipeline_parallel,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline,
        )
    model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> ModelLayout:
    from megatron.core import parallel_state as ps

    return ModelLayout(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        vpp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Vocabulary rounded up to a multiple of the TP size (each rank holds an equal slice)."""
    return -(-vocab_size // tp_size) * tp_size


def transformer_config(arch: ArchSpec, cfg: ActorConfig):
    """megatron-core `TransformerConfig` for `arch` under the actor settings `cfg`."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    kwargs = {}
    if cfg.fp8 is not None:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,  # RL on a pretrained policy: dropout would make log-probs stochastic
        attention_dropout=0.0,
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        # The fused kernels below are CUDA (TE/apex) only.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        **kwargs,
    )


def layer_spec(arch: ArchSpec):
    """Transformer Engine layer spec on GPU when TE imports, else megatron-core's local spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if te_available():
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def build_model(arch: ArchSpec, cfg: ActorConfig) -> list[torch.nn.Module]:
    """This rank's `GPTModel` chunks (one per virtual pipeline stage); parallel state must be initialized."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, cfg)
    spec = layer_spec(arch)
    vocab = padded_vocab_size(arch.vocab_size, cfg.tensor_parallel)
    chunks = []
    for vp_stage in range(cfg.virtual_pipeline or 1):
        vp = vp_stage if cfg.virtual_pipeline else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=vp,
        )
        chunks.append(model)
    return chunks
