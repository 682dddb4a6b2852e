"""Per-token log-probs and entropy straight from the final hidden states, a chunk of tokens at a time.

The full-logits path (`logprobs.scaled_logits`) materializes fp32 [tokens, V/tp] logits and copies of them for
the softmax, the entropy and the loss's backward: about 5 MB per token on SmolLM2's 49k vocabulary, GBs at 8k
tokens. Here the logits of `chunk` tokens at a time are formed from the hidden states h and the output weight
W, reduced to four numbers per token, and dropped; the backward recomputes each chunk's logits from the saved
h and W (as Liger-Kernel's fused linear cross-entropy and the chunked log-probs of verl and slime do). Memory
is O(chunk x V/tp) at any sequence length.

With z = (h W^T) / T over the real vocabulary columns of this TP rank's slice (the padding columns are never
formed: they carry no probability), m = max_j z_j, S = sum_j e^(z_j - m), A = sum_j e^(z_j - m) (z_j - m),
m, S and A reduced over the TP group, p = softmax(z) and target t:

    log p_t = z_t - m - log S                  H = -sum_j p_j log p_j = log S - A / S
    d log p_t / dz_j = [j = t] - p_j           dH / dz_j = -p_j (z_j - m - A / S) = -p_j (log p_j + H)

and dz / d(h W^T) = 1 / T. Each TP rank forms the hidden-state gradient of its vocabulary slice; the caller's
`copy_to_tensor_model_parallel_region` (applied where megatron's output layer would apply it) sums them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from lcot_mega.actor import megatron_adapter as ma


def _real_columns(weight: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """The rows of this rank's [V_pad/tp, h] output weight that belong to the real (unpadded) vocabulary."""
    return weight[: max(0, min(weight.shape[0], vocab_size - vocab_start))]


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """fp32 (h W^T) / T of one chunk, the product in `dtype` (the output layer's compute dtype; `w` already in
    it); [c, V_real]."""
    with torch.autocast(h.device.type, enabled=False):
        z = (h.to(dtype) @ w.t()).float()
    return z.div_(temperature)


def _target_mask(labels: torch.Tensor, vocab_start: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether this rank holds each label's column, that column's local index or 0); [c], [c]."""
    local = labels - vocab_start
    here = (local >= 0) & (local < columns)
    return here, torch.where(here, local, 0)


class _ChunkedTokenStats(torch.autograd.Function):
    """(log p_t, H) per token from hidden states [N, h] and this rank's output weight [V_pad/tp, h]."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        vocab_start: int,
        vocab_size: int,
        chunk: int,
        dtype: torch.dtype,
        group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        w = _real_columns(weight, vocab_start, vocab_size).to(dtype)  # [V_real, h], cast once (autocast: a copy)
        shift = torch.empty(n, dtype=torch.float32, device=hidden.device)  # m per token
        sums = torch.empty(3, n, dtype=torch.float32, device=hidden.device)  # S, A, z_t - m per token
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            z = _chunk_logits(hidden[lo:hi], w, temperature, dtype)  # [c, V_real]
            m = z.amax(-1) if z.shape[-1] else z.new_full((hi - lo,), float("-inf"))  # [c]
            if group.size() > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            z.sub_(m.unsqueeze(-1))  # z - m, in place: one [c, V] tensor less
            here, local = _target_mask(labels[lo:hi], vocab_start, z.shape[-1])
            target = torch.where(here, z.gather(-1, local.unsqueeze(-1)).squeeze(-1) if z.shape[-1] else 0.0, 0.0)
            e = z.exp()  # [c, V_real]
            weighted = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # sum_j e_j z_j: one pass, no product
            sums[:, lo:hi] = torch.stack([e.sum(-1), weighted, target])
            shift[lo:hi] = m
            del z, e
        if group.size() > 1:
            dist.all_reduce(sums, group=group)
        total, weighted, target = sums
        log_total = total.log()
        entropy = log_total - weighted / total
        ctx.save_for_backward(hidden, weight, labels, shift + log_total, entropy)  # log-normalizer m + log S
        ctx.settings = (temperature, vocab_start, vocab_size, chunk, dtype)
        ctx.set_materialize_grads(False)
        return target - log_total, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None) -> tuple:
        hidden, weight, labels, log_norm, entropy = ctx.saved_tensors
        temperature, vocab_start, vocab_size, chunk, dtype = ctx.settings
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w):
            return (None,) * 9
        w = _real_columns(weight, vocab_start, vocab_size).to(dtype)  # [V_real, h], cast once
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        g_lp = grad_logp / temperature if grad_logp is not None else torch.zeros_like(entropy)
        # dL/dz_j with y_j = log p_j = z_j - m - log S (so z_j - m - A/S = y_j + H), both terms times 1/T:
        #   p_j * (a y_j + b) + g_lp / T [j = t],  a = -g_H / T,  b = -(g_lp + g_H H) / T
        if grad_entropy is not None:
            a = -grad_entropy / temperature
            b = a * entropy - g_lp
        for lo in range(0, hidden.shape[0], chunk):
            hi = min(hidden.shape[0], lo + chunk)
            y = _chunk_logits(hidden[lo:hi], w, temperature, dtype).sub_(log_norm[lo:hi].unsqueeze(-1))  # log p
            if grad_entropy is None:
                dz = y.exp_().mul_(-g_lp[lo:hi].unsqueeze(-1))  # -g_lp p / T, in y's storage
            else:
                p = y.exp()
                dz = y.mul_(a[lo:hi].unsqueeze(-1)).add_(b[lo:hi].unsqueeze(-1)).mul_(p)
                del p
            if grad_logp is not None:
                here, local = _target_mask(labels[lo:hi], vocab_start, dz.shape[-1])
                rows = here.nonzero().squeeze(-1)
                dz[rows, local[rows]] += g_lp[lo:hi][rows]
            dz = dz.to(dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                if grad_h is not None:
                    grad_h[lo:hi] = (dz @ w).to(grad_h.dtype)
                if grad_w is not None:
                    grad_w[: w.shape[0]] += (dz.t() @ hidden[lo:hi].to(dtype)).float()
            del dz, y
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), *(None,) * 7


def chunked_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    vocab_size: int,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), entropy) of softmax(h W^T / T) per token, float32 [N] each; hidden [N, h], labels [N].

    `weight` is this TP rank's [V_pad/tp, h] slice of the output layer; `hidden` must already pass through
    the TP copy (`megatron_adapter` does it where the output layer would). The matrix product runs in the
    autocast dtype when autocast is on (as the output layer's would), else in the weight's dtype.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    group = ma.tensor_parallel_group()
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    vocab_start = group.rank() * weight.shape[0]
    return _ChunkedTokenStats.apply(
        hidden, weight, labels, float(temperature), vocab_start, vocab_size, chunk_tokens, dtype, group
    )


# ------------------------------------------------------------------------------- the model's hidden-state output


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The [V_pad/tp, h] weight the output layer of this last-stage (possibly wrapped) `GPTModel` multiplies by."""
    model = ma.unwrap(model)
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def let_output_layer_return_hidden_states(model: torch.nn.Module) -> None:
    """Give a last-stage `GPTModel`'s output layer a switch (`returning_hidden_states`) that makes it hand back
    its input instead of logits: the model then returns the final hidden states [b, s, h].

    The hidden states go through the same TP mapping the output layer applies to its input (copy: identity
    forward, all-reduce backward; under sequence parallelism the gather), so their gradient is summed over
    the vocabulary slices of the TP ranks exactly as the output layer's would be.
    """
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    layer = model.output_layer
    inner = layer.forward
    layer.lcot_return_hidden = False

    def forward(input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: Any = None):
        if not layer.lcot_return_hidden:
            return inner(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        group = ma.tensor_parallel_group()
        if layer.sequence_parallel:
            return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=group), None
        return copy_to_tensor_model_parallel_region(input_, group=group), None

    layer.forward = forward


@contextlib.contextmanager
def returning_hidden_states(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """Within: the last-stage chunks output final hidden states [b, s, h] instead of logits."""
    layers = [ma.unwrap(c).output_layer for c in chunks if ma.unwrap(c).post_process]
    for layer in layers:
        layer.lcot_return_hidden = True
    try:
        yield
    finally:
        for layer in layers:
            layer.lcot_return_hidden = False
