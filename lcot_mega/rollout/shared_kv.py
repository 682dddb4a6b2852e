"""Decoding n samples per prompt over ONE copy of each prompt's KV cache.

GRPO draws n samples per prompt; repeating the prompt's K/V n times (`DynamicCache.batch_repeat_interleave`) stores
n - 1 needless copies in every layer. `SharedPrefixCache` keeps, per layer, the prompts' K/V once
([P, kv, p, d], left padded as prefilled) and each live row's generated K/V ([A, kv, t, d], grown like a
`DynamicLayer`). `shared_prefix_attention`, registered in transformers' `AttentionInterface` under `ATTENTION`,
computes a decode step's attention of row a over [prefix of its prompt, its own suffix] as two attention blocks
merged by their log-sum-exp (the online-softmax merge of Milakov & Gimelshein 2018, used by FlashAttention, Dao et
al. 2022, Sec. 3.1): o = o_pre e^(lse_pre - lse) + o_suf e^(lse_suf - lse), lse = log(e^lse_pre + e^lse_suf),
which equals one softmax over the concatenated keys.

The prefix block is grouped by prompt, not gathered per row: the queries of a prompt's live rows are written into
slots [i * w, i * w + count_i) of a [P * w] grid (w = most live rows of any prompt), so a layer makes one attention
call [P, kv, w * g, d] against [P, kv, p, d] (g query heads share a kv head: they are extra query positions) and
never copies a prompt's keys per row. Slots of finished rows hold zero queries and are never read back; w shrinks
when rows finish, and a prompt whose rows have all finished leaves the prefix store. Rows must stay ordered by
prompt (the engine's rows are, and `batch_select_indices` keeps their order). Both blocks run in SDPA's own CPU
kernel, which returns the log-sum-exp and accumulates bf16 in fp32 as SDPA does on the repeated cache (plain bf16
matmuls for the scores were 6x farther from an fp32 reference).

Without the `shared_kv` keyword (prefill, `score`) the function is transformers' SDPA attention unchanged, and its
masks are SDPA's. Models and devices outside `supported_reason` keep the repeated cache (see there).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# SDPA's CPU kernel, called directly because it also returns the log-sum-exp [B, H, L] (fp32) that merges the two
# blocks; it accumulates in fp32 for bf16 inputs, as SDPA does for the repeated cache.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

ATTENTION = "lcot_shared_prefix"
"""`config._attn_implementation` of a model that decodes over a `SharedPrefixCache`."""
_FAMILIES = ("llama", "qwen2", "qwen3")


class SharedPrefixLayer(DynamicLayer):
    """One layer: the prompts' K/V once (`prefix_keys`/`prefix_values` [P, kv, p, d]) and the live rows' generated
    K/V (`keys`/`values` [A, kv, t, d], concatenated by `DynamicLayer.update`, which returns the suffix only)."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + super().get_seq_length()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]


class SharedPrefixCache(Cache):
    """KV cache of one chunk's decode: prompt K/V once per prompt, generated K/V per row (module docstring)."""

    def __init__(self, prefill: DynamicCache, prompt_mask: torch.Tensor, n: int) -> None:
        """`prefill`: the cache of one forward over the P left-padded prompts; `prompt_mask` [P, p] its padding
        mask (1 = token); rows are the prompts' n samples, prompt-major (row r belongs to prompt r // n)."""
        super().__init__(layers=[SharedPrefixLayer(layer.keys, layer.values) for layer in prefill.layers])
        keys = prefill.layers[0].keys
        bias = torch.zeros(prompt_mask.shape, dtype=keys.dtype, device=keys.device)
        bias.masked_fill_(prompt_mask.to(keys.device) == 0, float("-inf"))
        self.prefix_bias = bias[:, None, None]  # [P, 1, 1, p] additive: 0 at tokens, -inf at left padding
        self.row_prompt = torch.arange(prompt_mask.shape[0], device=keys.device).repeat_interleave(n)  # [A]
        self._regroup()

    @property
    def num_prompts(self) -> int:
        return self.prefix_bias.shape[0]

    def _regroup(self) -> None:
        counts = torch.bincount(self.row_prompt, minlength=self.num_prompts)  # [P]
        self.width = int(counts.max())
        first = counts.cumsum(0) - counts  # [P] first row of each prompt (rows are prompt-major)
        rank = torch.arange(len(self.row_prompt), device=counts.device) - first[self.row_prompt]
        self.slot = self.row_prompt * self.width + rank  # [A] the row's place in the [P * width] query grid

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (ascending); prompts left without rows leave the prefix store."""
        for layer in self.layers:
            layer.batch_select_indices(indices)
        row_prompt = self.row_prompt[indices]
        live = torch.unique(row_prompt)  # sorted
        if len(live) < self.num_prompts:
            for layer in self.layers:
                layer.prefix_keys = layer.prefix_keys.index_select(0, live)
                layer.prefix_values = layer.prefix_values.index_select(0, live)
            self.prefix_bias = self.prefix_bias.index_select(0, live)
            row_prompt = torch.searchsorted(live, row_prompt)
        self.row_prompt = row_prompt
        self._regroup()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a SharedPrefixCache shares the prompt's K/V across rows; it is never repeated")


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_kv: SharedPrefixCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention [A, 1, H, d] of one decode step over prefix + suffix; SDPA without `shared_kv`.

    query [A, H, 1, d]; key/value [A, kv, t, d], the rows' suffixes including this step's token (so never empty)."""
    if shared_kv is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[2] != 1 or kwargs.get("sliding_window") is not None:
        raise ValueError("shared_prefix_attention decodes one token per row with full attention only")
    layer = shared_kv.layers[module.layer_idx]
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(rows, kv_heads, group, dim)  # query head h reads kv head h // group

    prompts, width = shared_kv.num_prompts, shared_kv.width
    grid = q.new_zeros(prompts * width, kv_heads, group, dim).index_copy_(0, shared_kv.slot, q)
    grid = grid.view(prompts, width, kv_heads, group, dim).transpose(1, 2).reshape(prompts, kv_heads, -1, dim)
    bias = shared_kv.prefix_bias
    o_pre, lse_pre = _FLASH_CPU(grid, layer.prefix_keys, layer.prefix_values, attn_mask=bias, scale=scaling)
    o_pre = _grid_to_rows(o_pre, shared_kv, group)  # [A, kv, g, d]
    lse_pre = _grid_to_rows(lse_pre.unsqueeze(-1), shared_kv, group)  # [A, kv, g, 1]

    o_suf, lse_suf = _FLASH_CPU(q, key, value, scale=scaling)  # the row's own tokens: g queries per kv head
    lse = torch.logaddexp(lse_pre, lse_suf.unsqueeze(-1))
    out = o_pre.float() * (lse_pre - lse).exp_() + o_suf.float() * (lse_suf.unsqueeze(-1) - lse).exp_()
    return out.to(query.dtype).view(rows, 1, heads, dim), None


def _grid_to_rows(x: torch.Tensor, cache: SharedPrefixCache, group: int) -> torch.Tensor:
    """[P, kv, width * g, c] prompt-grouped -> [A, kv, g, c] live rows."""
    prompts, kv_heads, _, c = x.shape
    x = x.view(prompts, kv_heads, cache.width, group, c).transpose(1, 2)
    return x.reshape(prompts * cache.width, kv_heads, group, c).index_select(0, cache.slot)


def supported_reason(model: torch.nn.Module) -> str | None:
    """None if `model` can decode over a `SharedPrefixCache`, else why not.

    Supported: Llama, Qwen2 and Qwen3 with full attention in every layer under SDPA (the default), on CPU. Other
    devices (no CPU kernel there; SGLang/vLLM serve GPUs), sliding-window layers, other attention implementations
    (eager, flash, flex) and other families keep the repeated cache."""
    cfg = model.config
    device = next(model.parameters()).device
    if device.type != "cpu" or _FLASH_CPU is None:
        return f"no CPU attention kernel with log-sum-exp for device {device}"
    if cfg.model_type not in _FAMILIES:
        return f"model type {cfg.model_type!r} is not one of {_FAMILIES}"
    if cfg._attn_implementation not in ("sdpa", ATTENTION):
        return f"attention implementation {cfg._attn_implementation!r} is not sdpa"
    if getattr(cfg, "sliding_window", None) is not None or any(
        t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()
    ):
        return "sliding-window attention"
    return None


AttentionInterface.register(ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
