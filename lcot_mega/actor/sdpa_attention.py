"""Core attention for megatron-core's local layer spec in O(s) memory (issue 17).

megatron-core's `DotProductAttention` materializes the [b, heads, s, s] scores and probabilities and keeps the
probabilities for backward: one 8k-token SmolLM2-135M sequence needs ~70 GB for them. This module is a drop-in
replacement for the local spec's `core_attention` (same constructor and forward signature, same [s, b, heads, d]
inputs and [s, b, heads * d] output) built on `torch.nn.functional.scaled_dot_product_attention`, whose fused
kernels (flash attention, Dao et al. 2022, on CPU and GPU) never store the [s, s] matrix and recompute it in
backward. What it cannot compute exactly like `DotProductAttention` it refuses, naming what to change.

Under context parallelism (actor.context_parallel, which `DotProductAttention` does not support) each rank holds
two chunks of every row's queries, keys and values; keys and values are all-gathered over the CP group and each
query chunk attends to the prefix of the sequence it may see (`SDPAttention._attend_context_parallel`).

Attention dropout is applied in training, but torch's CPU flash kernel has no dropout: with dropout > 0 on CPU,
SDPA falls back to its math kernel, which stores [s, s] again (measured: 542 MiB instead of 28 MiB for 8 heads
at s = 2048). The actor trains with attention dropout 0 (`megatron_adapter.transformer_config`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from lcot_mega.actor.context_parallel import gather_keys_values, rank_chunks


class SDPAttentionUnsupported(NotImplementedError):
    """A setting `SDPAttention` does not implement; the message says which key to change."""


class SDPAttention(MegatronModule):
    """Causal (or masked) softmax attention of megatron-core's local spec through fused SDPA kernels.

    Heads are this tensor-parallel rank's partition (num_attention_heads / tp, num_query_groups / tp); grouped
    query attention (Ainslie et al. 2023) shares each key/value head with consecutive query heads, as
    `DotProductAttention`'s `repeat_interleave` does.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        _refuse_unsupported_config(config, layer_number)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp_size = pg_collection.tp.size()
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        divide(self.num_attention_heads_per_partition, self.num_query_groups_per_partition)  # GQA needs whole groups
        # DotProductAttention divides the scale by the layer number (apply_query_key_layer_scaling) and its softmax
        # multiplies it back in fp32: the net scale is this one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask None or bool (True = masked out,
        megatron's convention) broadcastable to [b, np, sq, sk] -> context [sq, b, np * hn]. A query whose keys
        are all masked gets no defined output here (DotProductAttention averages them uniformly).

        Packed (THD) input, as megatron's `Attention` hands it with `packed_seq_params`: query [t, np, hn],
        key/value [t, ng, hn] holding the sequences end to end -> [t, np, hn], each sequence attending causally
        within itself (one SDPA call per sequence: no [t, t] block-diagonal mask is formed)."""
        if packed_seq_params is not None:
            return self._attend_packed(query, key, value, attention_mask, attention_bias, packed_seq_params)
        if attention_bias is not None:
            raise SDPAttentionUnsupported("attention_bias is not supported by actor.attention = 'sdpa'")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if self.cp_group is not None:
            return self._attend_context_parallel(query, key, value, attention_mask, mask_type)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        kwargs = self._mask_kwargs(attention_mask, mask_type, q.size(2), k.size(2))
        with self._dropout_rng() as dropout_p:
            context = self._attend(q, k, v, dropout_p, kwargs)
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [b, np, sq, hn] -> [sq, b, np * hn]

    def _attend_context_parallel(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mask_type: AttnMaskType,
    ) -> torch.Tensor:
        """Causal attention of this CP rank's two query chunks (`context_parallel.rank_chunks`) against the keys
        and values of the whole sequence, all-gathered over the CP group (Llama 3's context parallelism,
        Grattafiori et al. 2024, sec. 3.3.2). query [2c, b, np, hn], key/value [2c, b, ng, hn] -> [2c, b, np * hn].

        Query chunk i (global positions i*c .. i*c + c - 1) sees keys 0 .. i*c + c - 1, each query a prefix of
        them: an explicit [c, (i + 1) c] boolean mask, since SDPA's `is_causal` aligns a non-square mask to the
        top left (query 0 would see key 0 only). The mask is shared over batch and heads."""
        if attention_mask is not None or mask_type != AttnMaskType.causal:
            raise SDPAttentionUnsupported("context parallelism needs causal self-attention without attention_mask")
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        key, value = (gather_keys_values(t, self.cp_group) for t in (key, value))  # [s, b, ng, hn], s = 2c * cp
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s or 2c, hn]
        c = query.size(0) // 2
        parts = []
        with self._dropout_rng() as dropout_p:
            for j, i in enumerate(rank_chunks(cp_size, cp_rank)):
                end = (i + 1) * c
                positions = torch.arange(i * c, end, device=q.device)  # [c] of the queries
                mask = torch.arange(end, device=q.device) <= positions.unsqueeze(-1)  # [c, end], True = attend
                qj = q[:, :, j * c : (j + 1) * c]
                parts.append(self._attend(qj, k[:, :, :end], v[:, :, :end], dropout_p, {"attn_mask": mask}))
        context = torch.cat(parts, dim=2)  # [b, np, 2c, hn]
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)

    @contextlib.contextmanager
    def _dropout_rng(self) -> Iterator[float]:
        """The dropout probability to use now; under dropout, the RNG stream of DotProductAttention's dropout."""
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                yield dropout_p
        else:
            yield dropout_p

    def _attend_packed(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attention_bias: torch.Tensor | None,
        params: PackedSeqParams,
    ) -> torch.Tensor:
        if params.qkv_format != "thd":
            raise SDPAttentionUnsupported(f"packed qkv_format {params.qkv_format!r} is not supported; use 'thd'")
        if attention_mask is not None or attention_bias is not None:
            raise SDPAttentionUnsupported("packed sequences take no attention_mask or attention_bias")
        if self.attn_mask_type != AttnMaskType.causal:
            raise SDPAttentionUnsupported(f"packed sequences need causal self-attention, not {self.attn_mask_type}")
        bounds = params.cu_seqlens_q
        padded = [p for p in (params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded) if p is not None]
        if not torch.equal(bounds, params.cu_seqlens_kv) or any(not torch.equal(bounds, p) for p in padded):
            raise SDPAttentionUnsupported("packed self-attention needs equal query/key bounds and no padding")
        parts = []
        with self._dropout_rng() as dropout_p:
            edges = bounds.tolist()
            for start, end in itertools.pairwise(edges):
                q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, h, L, hn]
                causal = {"is_causal": True} if end - start > 1 else {}
                parts.append(self._attend(q, k, v, dropout_p, causal)[0].transpose(0, 1))  # [L, np, hn]
        return torch.cat(parts)  # [t, np, hn]; megatron's Attention reshapes it to [t, 1, np * hn]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, kwargs: dict):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout_p,
            scale=self.softmax_scale,
            enable_gqa=self.num_query_groups_per_partition < self.num_attention_heads_per_partition,
            **kwargs,
        )

    @staticmethod
    def _mask_kwargs(attention_mask: torch.Tensor | None, mask_type: AttnMaskType, sq: int, sk: int) -> dict:
        """What `DotProductAttention`'s unfused softmax masks: a given mask alone, else the causal triangle for
        a causal layer with more than one query (sq = sk there), else nothing."""
        if attention_mask is not None:
            return {"attn_mask": ~attention_mask.bool()}  # SDPA's boolean mask is True where attention is allowed
        if mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise SDPAttentionUnsupported(f"causal self-attention needs as many queries as keys (got {sq}, {sk})")
            return {"is_causal": True}
        return {}


def _refuse_unsupported_config(config: TransformerConfig, layer_number: int) -> None:
    """Settings whose `DotProductAttention` behaviour this module does not reproduce."""
    if config.softmax_type != "vanilla":
        raise SDPAttentionUnsupported(f"softmax_type {config.softmax_type!r} is not supported; use 'vanilla'")
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        raise SDPAttentionUnsupported("sliding-window attention is not supported by actor.attention = 'sdpa'")
