"""The one adapter between lcot-mega's typed config and megatron-core's world (STYLE.md rule 6).

Everything that touches megatron-core's `TransformerConfig`, layer specs, `GPTModel` construction or
`parallel_state` goes through here; nothing else reads Megatron globals. On a CPU-only torch the
compatibility shim (`cpu_compat`) is enabled first and the local (non-Transformer-Engine) layer spec
is used; on GPU the Transformer Engine spec is used when TE imports.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lcot_mega.actor import cpu_compat
from lcot_mega.bridge.arch import ArchSpec
from lcot_mega.config import ActorConfig

KNOWN_HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # (message regex, category, module regex). Each is printed on every run and needs no action from the user:
    # without TE / apex megatron-core falls back to torch kernels we chose on purpose (the local layer spec).
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core\."),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, r"megatron\.core\."),
    # megatron-core's own default for cuda_graph_scope; CUDA graphs are off in every recipe.
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config"),
    # megatron-core's optimizer reads `.grad` of its views while the CPU shim forwards the call; the values it
    # needs live in main_grad, so the empty `.grad` it reads is the one it expects.
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor", UserWarning, r"lcot_mega\.actor\.cpu_compat"),
    # megatron-core 0.16 calls the torch 2.13 collectives under their old names; same operations.
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning, r""),
)
"""Library warnings a newcomer sees at every start and cannot act on (issue 16: one screen, only what the user can
act on). Filtered once, here, by message and module; anything else still shows."""


def quiet_known_warnings() -> None:
    import warnings

    for message, category, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


quiet_known_warnings()  # before the first megatron import: most of them fire at import time


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
    cp_rank: int = 0
    cp_size: int = 1
    ep_size: int = 1
    """Expert parallelism: how many ranks share each MoE layer's experts (ranks of the data-parallel group)."""
    etp_rank: int = 0
    etp_size: int = 1
    """Expert tensor parallelism: how many ranks split each expert (actor.expert_tensor_parallel, default the TP)."""


def te_available() -> bool:
    """Transformer Engine is importable and a GPU is present (it has no CPU path)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def attention_backend(cfg: ActorConfig) -> str:
    """'te' (Transformer Engine's layer spec), 'sdpa' or 'local' (megatron's local spec with our SDPA core
    attention or its own DotProductAttention), as `actor.attention` asks on this machine."""
    if cfg.attention == "auto":
        return "te" if te_available() else "sdpa"
    return cfg.attention


def params_dtype(cfg: ActorConfig) -> torch.dtype:
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def actor_config_errors(cfg: ActorConfig) -> list[str]:
    """Parallel settings that contradict each other on any machine (`trainer.preflight` runs these too)."""
    errors = []
    if cfg.virtual_pipeline is not None and cfg.pipeline_parallel < 2:
        errors.append("actor.virtual_pipeline needs actor.pipeline_parallel >= 2")
    if cfg.sequence_parallel and cfg.tensor_parallel == 1:
        errors.append("actor.sequence_parallel needs actor.tensor_parallel > 1")
    if cfg.recompute_layers > 1 and cfg.recompute != "full":
        errors.append(f"actor.recompute_layers = {cfg.recompute_layers} applies only with actor.recompute=full")
    if cfg.pack_sequences:
        needs = [
            (cfg.logits_chunk_tokens == 0, "actor.logits_chunk_tokens > 0 (the full-logits path is per padded row)"),
            (cfg.attention == "local", "actor.attention auto or sdpa (local's DotProductAttention has no THD)"),
            (cfg.virtual_pipeline is not None, "no actor.virtual_pipeline (its micro-batches share one shape)"),
        ]
        errors += [f"actor.pack_sequences needs {what}" for bad, what in needs if bad]
    errors += context_parallel_errors(cfg)
    if cfg.offload_activations and cfg.recompute != "none":
        errors.append("actor.offload_activations and actor.recompute exclude each other (megatron-core)")
    if cfg.offload_activations and cfg.pipeline_parallel > 1:
        errors.append("actor.offload_activations does not support actor.pipeline_parallel > 1 (megatron-core)")
    if cfg.attention != "auto" and cfg.fp8 is not None:
        errors.append(
            f"actor.fp8 needs Transformer Engine's layer spec, which actor.attention = {cfg.attention!r}"
            " turns off: set actor.attention=auto"
        )
    return errors


def context_parallel_errors(cfg: ActorConfig) -> list[str]:
    """What actor.context_parallel > 1 is not built for (`context_parallel` splits padded rows only)."""
    if cfg.context_parallel == 1:
        return []
    cp = f"actor.context_parallel = {cfg.context_parallel}"
    needs = [
        (cfg.pack_sequences, "actor.pack_sequences=false (packed rows are not split per sequence yet)"),
        (
            cfg.attention == "local",
            "actor.attention auto or sdpa (local's DotProductAttention has no context parallelism)",
        ),
    ]
    return [f"{cp} needs {what}" for bad, what in needs if bad]


def setup_errors(cfg: ActorConfig, world_size: int) -> list[str]:
    """What prevents `cfg` from running on this machine with `world_size` ranks (empty: it can run)."""
    errors = []
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel * cfg.context_parallel
    if world_size % model_parallel:
        errors.append(
            f"world size {world_size} is not divisible by actor.tensor_parallel * actor.pipeline_parallel"
            f" * actor.context_parallel = {cfg.tensor_parallel} * {cfg.pipeline_parallel} * {cfg.context_parallel}"
        )
    elif world_size % (
        cfg.expert_parallel * (etp := cfg.expert_tensor_parallel or cfg.tensor_parallel) * cfg.pipeline_parallel
    ):
        errors.append(
            f"actor.expert_parallel {cfg.expert_parallel} x expert tensor parallel {etp} x actor.pipeline_parallel"
            f" {cfg.pipeline_parallel} does not divide the {world_size} ranks (every rank holds experts)"
        )
    if cfg.fp8 is not None and not te_available():
        errors.append(f"actor.fp8 = {cfg.fp8!r} needs Transformer Engine on a GPU; set actor.fp8=null here")
    if cfg.offload_activations and not te_available():
        errors.append(
            "actor.offload_activations needs Transformer Engine on a GPU (megatron-core's CPU offloading);"
            " set it to false here"
        )
    return errors + actor_config_errors(cfg)


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
            context_parallel_size=cfg.context_parallel,
            expert_model_parallel_size=cfg.expert_parallel,
            expert_tensor_parallel_size=cfg.expert_tensor_parallel,
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
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
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
    kwargs.update(recompute_kwargs(cfg, arch))
    if cfg.context_parallel > 1:
        # Transformer Engine's attention: K/V blocks passed around the CP ring, overlapped with compute (megatron's
        # default). The sdpa attention all-gathers K/V instead (`sdpa_attention`) and ignores it.
        kwargs.update(cp_comm_type="p2p")
    kwargs.update(moe_kwargs(arch, cfg))
    config = TransformerConfig(
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
        context_parallel_size=cfg.context_parallel,
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
    # Micro-batches are padded to their own longest sequence, so pipeline stages exchange shapes first (set
    # after construction: __post_init__ rejects it with the default MoE token dispatcher, even without MoE).
    # Not under the interleaved schedule: with PP = 2 the previous and next stage are the same rank, and
    # megatron-core 0.16 posts the shape messages of both directions on one group in an order that pairs
    # them wrongly (the gradient's shape arrives as the activation's; batched p2p of equal shapes would
    # swap the tensors silently). There all micro-batches of a step share one shape
    # (`logprobs.micro_batches_for_this_rank`) and tensors go through the unbatched p2p path, which sends
    # the two directions over two different groups.
    config.variable_seq_lengths = cfg.virtual_pipeline is None
    config.batch_p2p_comm = cfg.virtual_pipeline is None
    return config


def moe_kwargs(arch: ArchSpec, cfg: ActorConfig) -> dict[str, Any]:
    """megatron-core `TransformerConfig` fields of a mixture-of-experts model ({} for a dense one).

    Routing as Qwen3-MoE's: with `norm_topk_prob` the top-k logits' softmax (= softmax over all experts, top-k,
    renormalized), else the softmax over all experts, top-k, not renormalized (`moe_router_pre_softmax`). Experts
    one after another (SequentialMLP) on CPU, TE's grouped GEMM on GPU; tokens dispatched by all-to-all."""
    if not arch.num_experts:
        if cfg.expert_parallel > 1:
            raise ActorSetupError(f"actor.expert_parallel {cfg.expert_parallel} needs a mixture-of-experts model")
        if cfg.routing_replay != "off":
            raise ActorSetupError(f"actor.routing_replay {cfg.routing_replay} needs a mixture-of-experts model")
        for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if getattr(cfg, key) > 0:
                raise ActorSetupError(f"actor.{key} {getattr(cfg, key)} needs a mixture-of-experts model")
        if cfg.expert_tensor_parallel is not None:
            raise ActorSetupError("actor.expert_tensor_parallel needs a mixture-of-experts model")
        return {}
    if arch.num_experts % cfg.expert_parallel:
        raise ActorSetupError(
            f"{arch.num_experts} experts cannot be split over actor.expert_parallel {cfg.expert_parallel}"
        )
    if cfg.tensor_parallel > 1 and not cfg.sequence_parallel:
        raise ActorSetupError(
            "a mixture of experts with actor.tensor_parallel > 1 needs actor.sequence_parallel=true (megatron-core)"
        )
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.experts_per_token,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_grouped_gemm=te_available(),
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_z_loss_coeff=cfg.moe_z_loss_coeff or None,
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn_hidden_size or None,
        moe_shared_expert_gate=bool(arch.shared_expert_ffn_hidden_size),
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=cfg.expert_parallel,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel,
    )


def recompute_kwargs(cfg: ActorConfig, arch: ArchSpec) -> dict[str, Any]:
    """megatron-core `TransformerConfig` fields for actor.recompute and actor.offload_activations."""
    kwargs: dict[str, Any] = {}
    if cfg.recompute == "full":
        kwargs.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=cfg.recompute_layers
        )
    elif cfg.recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if cfg.offload_activations:
        layers_per_stage = arch.num_layers // cfg.pipeline_parallel
        kwargs.update(
            cpu_offloading=True,
            cpu_offloading_num_layers=max(1, layers_per_stage - 1),  # megatron: fewer than the stage's layers
            cpu_offloading_activations=True,
            cpu_offloading_weights=False,
        )
    return kwargs


def layer_spec(arch: ArchSpec, cfg: ActorConfig):
    """Transformer Engine layer spec (`actor.attention` auto with TE on a GPU), else megatron-core's local spec,
    whose core attention is `SDPAttention` (sdpa: memory linear in the sequence) or its own `DotProductAttention`
    (local: stores [b, heads, s, s] probabilities)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    backend = attention_backend(cfg)
    experts = arch.num_experts or None
    if backend == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=experts is not None, qk_layernorm=arch.qk_norm
        )
    spec = specs.get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm, normalization="RMSNorm"
    )
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalRMSNorm
    if arch.qk_norm:
        layer.self_attention.submodules.q_layernorm = layer.self_attention.submodules.k_layernorm = LocalRMSNorm
    if backend == "sdpa":
        from lcot_mega.actor.sdpa_attention import SDPAttention

        attention = spec.submodules.self_attention
        attention.submodules = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    return spec


class LocalRMSNorm(torch.nn.RMSNorm):
    """The local spec's RMSNorm (megatron's `WrappedTorchNorm` builds the same `torch.nn.RMSNorm`, parameter for
    parameter) without its refusal of sequence parallelism: under it each tensor-parallel rank normalizes its own
    slice of the sequence, so the weight's gradient is partial, and marking it `sequence_parallel` makes megatron's
    `finalize_model_grads` all-reduce it over the TP group (left unmarked, TP2 + SP drifts from TP1 by 1e-2 in one
    step)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _block_spec(spec: Any, config: Any, vp_stage: int | None) -> Any:
    """The decoder block of `spec` layers with a `LocalRMSNorm` as its final norm (megatron's default there is
    `WrappedTorchNorm` without Transformer Engine), as megatron's own `get_gpt_decoder_block_spec` assembles it."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=LocalRMSNorm)


def build_model(arch: ArchSpec, cfg: ActorConfig) -> list[torch.nn.Module]:
    """This rank's `GPTModel` chunks (one per virtual pipeline stage); parallel state must be initialized."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, cfg)
    spec = layer_spec(arch, cfg)
    vocab = padded_vocab_size(arch.vocab_size, cfg.tensor_parallel)
    chunks = []
    for vp_stage in range(cfg.virtual_pipeline or 1):
        vp = vp_stage if cfg.virtual_pipeline else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec if attention_backend(cfg) == "te" else _block_spec(spec, config, vp),
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
        if model.post_process:
            model.output_layer.register_forward_hook(_contiguous_output_grad)
            from lcot_mega.actor.chunked_logits import let_output_layer_return_hidden_states

            let_output_layer_return_hidden_states(model)
        if cfg.precision == "bf16_autocast":
            _autocast_forward(model, torch.bfloat16)
        if arch.num_experts:
            from lcot_mega.actor.routing import install_taps

            _experts_in_their_own_optimizer(model)
            install_taps([model], arch.num_experts, pre_softmax=not arch.norm_topk_prob)
        chunks.append(model)
    return chunks


def _experts_in_their_own_optimizer(model: torch.nn.Module) -> None:
    """Mark every expert weight as expert-parallel (`allreduce = False`) also at actor.expert_parallel 1.

    megatron-core gives expert-parallel weights their own optimizer (a `ChainedOptimizer` of dense + experts) only
    when EP > 1, so a checkpoint saved at EP2 would hold two optimizer states and one at EP1 one, and neither would
    load into the other. Marked always, the chain is the same at every EP and dist-checkpointing reshards the
    experts' Adam state like their weights. At EP1 the experts' gradients are then reduced over the expert
    data-parallel group, which is the data-parallel group itself: the same sums, scaled the same."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def _autocast_forward(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run `model`'s forward under torch.autocast and hand back fp32 outputs (logits, or the hidden states a
    pipeline stage sends on): parameters and their gradients stay fp32 (actor.precision = bf16_autocast).

    `run_schedule` also holds autocast over the backward (`autocast_dtype`): megatron-core's linear layers are
    autograd Functions whose backward re-enters the forward's autocast state only on CUDA (`custom_bwd`), and
    on CPU would multiply a bf16 gradient by the saved fp32 weight.
    """
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=compute_device().type, dtype=dtype):
            out = inner(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out

    model.forward = forward
    model.lcot_autocast_dtype = dtype


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The `GPTModel` inside megatron-core's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def autocast_dtype(chunks: list[torch.nn.Module]) -> torch.dtype | None:
    """The bf16_autocast compute dtype of these (possibly DDP-wrapped) chunks, or None."""
    model = chunks[0]
    while hasattr(model, "module") and not hasattr(model, "lcot_autocast_dtype"):
        model = model.module
    return getattr(model, "lcot_autocast_dtype", None)


def _contiguous_output_grad(module: torch.nn.Module, inputs: tuple, outputs: tuple) -> None:
    """Make the logits' gradient contiguous before the output layer's backward sees it.

    GPTModel returns the [s, b, V] logits transposed to [b, s, V], so their gradient arrives as a strided view.
    The output layer's backward (`grad_output.matmul(weight)`) cannot fold a strided 3-D operand into one
    matrix product, and torch then expands the [V, h] weight to [s, V, h] and runs a batched product: on CPU
    that copy was 4-8 s of a 7 s SmolLM2 train step (docs/LOG.md). One copy of the gradient avoids it.
    """
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    if isinstance(logits, torch.Tensor) and logits.requires_grad:
        logits.register_hook(lambda grad: grad.contiguous())


# --------------------------------------------------------------------------------------------- training


def freeze_embeddings(chunks: list[torch.nn.Module]) -> int:
    """Turn off gradients of the word embeddings and the output layer (before `wrap_ddp`: DDP and the optimizer
    then hold no buffers or state for them); returns how many parameter tensors were frozen.

    The embedding's output is still marked as needing a gradient: megatron's reentrant activation checkpoint
    (actor.recompute) hands back outputs that need none when its input needs none, and no layer would train."""
    frozen = 0
    for chunk in chunks:
        if getattr(chunk, "pre_process", False):
            chunk.embedding.register_forward_hook(_output_requires_grad)
        for name, param in chunk.named_parameters():
            if "word_embeddings" in name or "output_layer" in name:
                param.requires_grad_(False)
                frozen += 1
    return frozen


def _output_requires_grad(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_() if torch.is_grad_enabled() and not output.requires_grad else output


def wrap_ddp(chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Wrap `chunks` in megatron-core DDP for the distributed optimizer, and hook them into the schedule.

    Gradients are reduced in fp32 (`grad_reduce_in_fp32`) and pre-scaled by 1 / DP size before a SUM
    collective (`average_in_collective=False`: gloo has no AVG). NaN/Inf gradients are not DDP's to catch
    (`check_for_nan_in_grad` would raise, on the ranks that see them only): `train_step`'s gate skips an update
    whose gradient norm is nonfinite, on every rank. The schedule then calls `finalize_model_grads` after the last
    backward (DP reduce-scatter, tied-embedding all-reduce across the first and last pipeline stages).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,
    )
    config = chunks[0].config
    wrapped = [
        # only the first chunk is bucketed (megatron-core's own choice for virtual pipeline stages)
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(chunks: list[torch.nn.Module], cfg: ActorConfig):
    """megatron-core's distributed Adam over DDP-wrapped `chunks` (fp32 main weights, also under bf16).

    Without Transformer Engine or apex megatron-core steps `torch.optim.AdamW`; weight decay is skipped for
    biases and norms (megatron-core's default grouping). The returned `ChainedOptimizer` always computes the
    gradient norm; `grad_clip = 0` only disables the clipping.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = params_dtype(cfg)
    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        params_dtype=dtype,
        use_distributed_optimizer=True,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, cfg: ActorConfig):
    """megatron-core `OptimizerParamScheduler`: linear warmup from 0, then constant, linear or cosine decay.

    Its step count is the number of optimizer steps taken; the caller advances it BEFORE each optimizer
    step, so the k-th update (1-based) uses lr(k): warmup reaches `cfg.lr` at update `warmup_steps`, and no
    update is spent at lr 0.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = cfg.lr_decay_steps if cfg.lr_schedule != "constant" else cfg.warmup_steps + 1
    if decay_steps is None or decay_steps <= cfg.warmup_steps:
        raise ActorSetupError(
            f"actor.lr_schedule = {cfg.lr_schedule!r} needs actor.lr_decay_steps > actor.warmup_steps"
            f" = {cfg.warmup_steps} (got {cfg.lr_decay_steps})"
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )


def scale_schedule(scheduler, cfg: ActorConfig, scale: float) -> None:
    """Peak and minimum LR of `scheduler` := cfg.lr * scale, cfg.min_lr * scale; the current LR recomputed.

    megatron-core reads them per param group first (`get_lr`: param_group['max_lr'], set from the optimizer
    config) and from the scheduler second (which `load_state_dict` overwrites with the checkpoint's), so both
    are set. The warmup starts at 0, so every LR of the schedule scales by exactly `scale`.
    """
    scheduler.max_lr, scheduler.min_lr = cfg.lr * scale, cfg.min_lr * scale
    for group in scheduler.optimizer.param_groups:
        group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    scheduler.step(increment=0)


def forward_backward_func():
    """The pipeline schedule for the current layout (no pipelining, 1F1B, or interleaved 1F1B)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


def compute_device() -> torch.device:
    """Where the model computes: this rank's current GPU, or the CPU (under the gloo shim)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def tensor_parallel_group() -> torch.distributed.ProcessGroup:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def expert_parallel_group() -> torch.distributed.ProcessGroup:
    """The ranks that hold the other experts of this rank's MoE layers (size 1 without expert parallelism)."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_group()


def expert_tensor_parallel_group() -> torch.distributed.ProcessGroup:
    """The ranks that split each of this rank's experts (megatron-core's default: the tensor-parallel size)."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_group()


def data_parallel_group() -> torch.distributed.ProcessGroup:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def sequence_split():
    """This rank's `context_parallel.SequenceSplit` (size 1 without context parallelism)."""
    from megatron.core import parallel_state as ps

    from lcot_mega.actor.context_parallel import SequenceSplit

    size = ps.get_context_parallel_world_size()
    if size == 1:
        return SequenceSplit()
    return SequenceSplit(size, ps.get_context_parallel_rank(), ps.get_context_parallel_group())


def is_first_replica() -> bool:
    """Data-parallel and context-parallel rank 0: the copy of the model that exports or writes once."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    """This rank runs the last pipeline stage (the one with the output layer), any virtual stage."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)
