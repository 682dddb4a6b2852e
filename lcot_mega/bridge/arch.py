"""What the bridge and the actor need to know about a Hugging Face decoder: one frozen record per model.

Supported: dense Llama, Qwen2 and Qwen3 (qk-norm) families, and Qwen3-MoE with every layer sparse. Anything else
fails here with the list of supported `model_type`s, before a model is built or a weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")


class UnsupportedModelError(ValueError):
    """The HF config describes an architecture (or a feature of one) the bridge cannot map."""


@dataclass(frozen=True)
class ArchSpec:
    """Shape and features of a dense decoder, read from its HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on the q, k and v projections (Qwen2; Llama with attention_bias)."""
    qk_norm: bool
    """RMSNorm over head_dim on queries and keys (Qwen3)."""
    rope_scaling_factor: float | None = None
    """Llama-3 style RoPE frequency scaling (low 1, high 4, original context 8192), or None."""
    num_experts: int = 0
    """Routed experts per layer (mixture of experts: every layer's MLP); 0 for a dense model."""
    experts_per_token: int = 0
    """Top-k experts each token is routed to."""
    moe_ffn_hidden_size: int = 0
    """Hidden size of each expert's gated MLP."""
    norm_topk_prob: bool = True
    """Routing weights: softmax over all experts, top-k, renormalized over the k (True, as Qwen3-30B-A3B's config
    sets it; the same as a softmax over the k chosen logits) or not (False)."""
    shared_expert_ffn_hidden_size: int = 0
    """Qwen2-MoE: hidden size of the shared expert every token also goes through, its output scaled by a sigmoid
    gate (`shared_expert_gate`); 0 for none."""

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    return default if value is None else value


def _rope(cfg: Any) -> tuple[float, float | None]:
    """(theta, llama3 scaling factor or None) from `rope_parameters` (transformers 5) or the 4.x fields."""
    params = _get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {}
    theta = params.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind == "llama3" and all(float(params.get(k, v)) == v for k, v in expected.items()):
        return float(theta), float(params["factor"])
    raise UnsupportedModelError(
        f"RoPE scaling {params} is not supported: only the default RoPE and llama3 scaling with "
        f"low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192 (megatron-core's fixed values)"
    )


def arch_from_hf_config(cfg: Any) -> ArchSpec:
    """Read an `ArchSpec` from a transformers `PretrainedConfig` (or its dict form)."""
    model_type = _get(cfg, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if _get(cfg, "use_sliding_window", False):
        raise UnsupportedModelError(f"{model_type} with use_sliding_window=True is not supported")
    if _get(cfg, "mlp_bias", False):
        raise UnsupportedModelError(f"{model_type} with mlp_bias=True is not supported")
    if _get(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {_get(cfg, 'hidden_act')!r} is not supported (only silu / SwiGLU)")
    heads = int(_get(cfg, "num_attention_heads"))
    hidden = int(_get(cfg, "hidden_size"))
    theta, scaling = _rope(cfg)
    moe = _moe_fields(cfg, model_type)
    return ArchSpec(
        model_type=model_type,
        vocab_size=int(_get(cfg, "vocab_size")),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(cfg, "intermediate_size")),
        num_layers=int(_get(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", heads)),
        head_dim=int(_get(cfg, "head_dim", hidden // heads)),
        norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(_get(cfg, "max_position_embeddings", 4096)),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(_get(cfg, "attention_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        rope_scaling_factor=scaling,
        **moe,
    )


def _moe_fields(cfg: Any, model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE or Qwen2-MoE config ({} for a dense model)."""
    if model_type not in ("qwen3_moe", "qwen2_moe"):
        return {}
    layers = int(_get(cfg, "num_hidden_layers"))
    step, dense = int(_get(cfg, "decoder_sparse_step", 1)), list(_get(cfg, "mlp_only_layers", []))
    if step != 1 or dense:
        sparse = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
        raise UnsupportedModelError(
            f"{model_type} with dense layers (decoder_sparse_step {step}, mlp_only_layers {dense}: sparse layers"
            f" {sparse}) is not supported yet: only every layer a mixture of experts"
        )
    return dict(
        num_experts=int(_get(cfg, "num_experts") or _get(cfg, "num_local_experts")),  # transformers 5 saves the latter
        experts_per_token=int(_get(cfg, "num_experts_per_tok")),
        moe_ffn_hidden_size=int(_get(cfg, "moe_intermediate_size")),
        norm_topk_prob=bool(_get(cfg, "norm_topk_prob", False)),
        shared_expert_ffn_hidden_size=int(_get(cfg, "shared_expert_intermediate_size", 0)),
    )
