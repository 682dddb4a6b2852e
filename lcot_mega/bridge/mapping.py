"""Hugging Face <-> Megatron-core parameter names and layouts for Llama / Qwen2 / Qwen3 / Qwen3-MoE.

One map serves the converter tools and the live weight sync (STYLE.md rule 3). A Megatron parameter
is described by a `Rule`: which HF tensors it is made of and how it is laid out. Sharding is done in
HF space: a tensor-parallel rank reads its slice of each HF tensor (`hf_slice`) and fuses the slices
(`fuse`); export splits a rank's local tensor back into HF slices (`split`) and concatenates the
slices of all TP ranks (`concat_tp`). Fused layouts (megatron-core `SelfAttention`, `MLP`):

- `linear_qkv`: per query group g, its `heads_per_group` query heads, then its key head, then its
  value head, each `head_dim` rows: [ng * (hpg + 2) * hd, H]. A TP rank holds ng / tp whole groups.
- `linear_fc1`: [gate; up], each ffn rows; a TP rank holds [gate slice; up slice].

Both the local spec names (`input_layernorm`, `pre_mlp_layernorm`) and the Transformer Engine spec
names (norms fused into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`) are mapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lcot_mega.bridge.arch import ArchSpec

REPLICATED, COLUMN, ROW, VOCAB, QKV, GATE_UP = "replicated", "column", "row", "vocab", "qkv", "gate_up"

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron suffix inside a layer -> (layout, HF suffixes inside `model.layers.{i}.`)
_LAYER_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": (REPLICATED, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": (REPLICATED, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        QKV,
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    "self_attention.linear_qkv.bias": (
        QKV,
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
    "self_attention.q_layernorm.weight": (REPLICATED, ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": (REPLICATED, ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": (ROW, ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": (REPLICATED, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": (REPLICATED, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": (GATE_UP, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (ROW, ("mlp.down_proj.weight",)),
    "mlp.router.weight": (REPLICATED, ("mlp.gate.weight",)),
    "mlp.shared_experts.linear_fc1.weight": (
        GATE_UP,
        ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
    ),
    "mlp.shared_experts.linear_fc2.weight": (ROW, ("mlp.shared_expert.down_proj.weight",)),
    "mlp.shared_experts.gate_weight": (REPLICATED, ("mlp.shared_expert_gate.weight",)),
}
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
"""An expert's MLP in a MoE layer (megatron-core's SequentialMLP), by its *global* expert index
(`hf_load.named_params_with_layers` renames each rank's local indices): HF `mlp.experts.{e}.*_proj.weight`."""
_GLOBAL_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": (VOCAB, ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": (REPLICATED, ("model.norm.weight",)),
    "output_layer.weight": (VOCAB, ("lm_head.weight",)),
}


class MappingError(KeyError):
    """A parameter name the bridge does not know (an architecture feature it does not map)."""


@dataclass(frozen=True)
class Rule:
    """How one Megatron parameter is made of HF tensors."""

    layout: str
    hf_names: tuple[str, ...]


def rule_for(mcore_name: str, global_layer: int | None, arch: ArchSpec) -> Rule:
    """The rule of a Megatron parameter (`decoder.layers.{j}.…` names need the layer's global index)."""
    m = _LAYER.match(mcore_name)
    if m:
        expert = _EXPERT.match(m.group(2))
        if expert:
            e = int(expert.group(1))
            if expert.group(2) == "linear_fc1":
                layout, suffixes = GATE_UP, (f"mlp.experts.{e}.gate_proj.weight", f"mlp.experts.{e}.up_proj.weight")
            else:
                layout, suffixes = ROW, (f"mlp.experts.{e}.down_proj.weight",)
        else:
            layout, suffixes = _lookup(_LAYER_RULES, m.group(2), mcore_name)
        layer = int(m.group(1)) if global_layer is None else global_layer
        return Rule(layout, tuple(f"model.layers.{layer}.{s}" for s in suffixes))
    layout, names = _lookup(_GLOBAL_RULES, mcore_name, mcore_name)
    if mcore_name == "output_layer.weight" and arch.tie_word_embeddings:
        names = ("model.embed_tokens.weight",)  # tied: the last PP stage keeps its own copy of the embedding
    return Rule(layout, names)


def _lookup(table: dict, key: str, full: str) -> tuple[str, tuple[str, ...]]:
    if key not in table:
        raise MappingError(f"no HF mapping for Megatron parameter {full!r}")
    return table[key]


def hf_slice(rule: Rule, index: int, full_shape: tuple[int, ...], tp_rank: int, tp_size: int, arch: ArchSpec) -> slice:
    """Rows (or, for ROW layouts, columns) of HF tensor `rule.hf_names[index]` that `tp_rank` holds."""
    if rule.layout == REPLICATED or tp_size == 1:
        return slice(None)
    if rule.layout == QKV:
        if arch.num_kv_heads % tp_size:
            raise ValueError(f"{arch.num_kv_heads} key/value heads cannot be split over tensor_parallel={tp_size}")
        groups = arch.num_kv_heads // tp_size
        rows = groups * arch.head_dim * (arch.heads_per_group if index == 0 else 1)
        return slice(tp_rank * rows, (tp_rank + 1) * rows)
    dim = 1 if rule.layout == ROW else 0
    size = -(-full_shape[dim] // tp_size)  # VOCAB rounds up; the last rank is padded with zero rows
    return slice(tp_rank * size, (tp_rank + 1) * size)


def shard_dim(rule: Rule) -> int:
    return 1 if rule.layout == ROW else 0


def fuse(rule: Rule, pieces: list[torch.Tensor], arch: ArchSpec, local_rows: int | None = None) -> torch.Tensor:
    """One Megatron (local) tensor from this rank's HF slices; `local_rows` pads a VOCAB shard."""
    if rule.layout == QKV:
        q, k, v = pieces
        hd = arch.head_dim
        groups = k.shape[0] // hd
        tail = q.shape[1:]
        q = q.reshape(groups, arch.heads_per_group * hd, *tail)
        fused = torch.cat([q, k.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)], dim=1)
        return fused.reshape(-1, *tail)
    if rule.layout == GATE_UP:
        return torch.cat(pieces, dim=0)
    (t,) = pieces
    if rule.layout == VOCAB and local_rows is not None and t.shape[0] < local_rows:
        pad = t.new_zeros(local_rows - t.shape[0], *t.shape[1:])
        t = torch.cat([t, pad], dim=0)
    return t


def split(rule: Rule, local: torch.Tensor, arch: ArchSpec) -> list[torch.Tensor]:
    """Inverse of `fuse`: this rank's HF slices from its Megatron (local) tensor (VOCAB padding kept)."""
    if rule.layout == QKV:
        hd, hpg = arch.head_dim, arch.heads_per_group
        tail = local.shape[1:]
        grouped = local.reshape(-1, (hpg + 2) * hd, *tail)
        q, k, v = torch.split(grouped, [hpg * hd, hd, hd], dim=1)
        return [x.reshape(-1, *tail) for x in (q, k, v)]
    if rule.layout == GATE_UP:
        return list(torch.chunk(local, 2, dim=0))
    return [local]


def concat_tp(rule: Rule, per_rank: list[torch.Tensor], hf_rows: int | None = None) -> torch.Tensor:
    """Full HF tensor from the slices of every TP rank (`hf_rows` trims VOCAB padding)."""
    if rule.layout == REPLICATED:
        return per_rank[0]
    full = torch.cat(per_rank, dim=shard_dim(rule))
    if rule.layout == VOCAB and hf_rows is not None:
        full = full[:hf_rows]
    return full


def concat_tp_into(rule: Rule, per_rank: list[torch.Tensor], out: torch.Tensor, only: int | None = None) -> bool:
    """`concat_tp` written straight into `out` (an engine's parameter: no intermediate full tensor; a dtype cast
    happens in the copy); False, with `out` untouched, when the slices do not make `out`'s shape (VOCAB padding
    beyond `out`'s rows is dropped, as `hf_rows` does). `only`: write rank `only`'s slice alone (a replicated
    tensor: rank 0 writes it), so that every TP rank writes its own in parallel; the other slices are read for
    their shapes only (meta tensors will do) and the answer is the same for every `only`."""
    if rule.layout == REPLICATED:
        if per_rank[0].shape != out.shape:
            return False
        if only in (None, 0):
            out.copy_(per_rank[0])
        return True
    dim = shard_dim(rule)
    rest = [s for d, s in enumerate(out.shape) if d != dim]
    if any(t.dim() != out.dim() or [s for d, s in enumerate(t.shape) if d != dim] != rest for t in per_rank):
        return False
    total, rows = sum(t.shape[dim] for t in per_rank), out.shape[dim]
    if total < rows or (total > rows and rule.layout != VOCAB):
        return False
    offset = 0
    for r, t in enumerate(per_rank):
        n = min(t.shape[dim], rows - offset)
        if n > 0 and only in (None, r):
            out.narrow(dim, offset, n).copy_(t.narrow(dim, 0, n))
        offset += n
    return True


def hf_tensor_names(arch: ArchSpec) -> list[str]:
    """Every tensor name of the HF checkpoint of `arch` (tied: no `lm_head.weight`), embedding first."""
    attn = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    if arch.qkv_bias:
        attn += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if arch.qk_norm:
        attn += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    mlp = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    if arch.num_experts:
        per_expert = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        mlp = ["mlp.gate.weight"] + [f"mlp.experts.{e}.{p}" for e in range(arch.num_experts) for p in per_expert]
        if arch.shared_expert_ffn_hidden_size:
            mlp += [f"mlp.shared_expert.{p}" for p in per_expert] + ["mlp.shared_expert_gate.weight"]
    layer = ["input_layernorm.weight", *attn, "self_attn.o_proj.weight", "post_attention_layernorm.weight", *mlp]
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{s}" for i in range(arch.num_layers) for s in layer]
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names
