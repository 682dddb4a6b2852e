"""Context parallelism (actor.context_parallel): which tokens of a sequence each CP rank holds, and how they return.

Under causal attention the query at position p attends p + 1 keys, so cutting a sequence into cp contiguous
pieces would leave the last rank with most of the work. The sequence (padded to a multiple of 2 * cp) is cut into
2 * cp equal chunks instead and rank r keeps chunks r and 2 * cp - 1 - r: one early and one late chunk each, the
same number of tokens and of (query, key) pairs on every rank. This is megatron-core's split (Megatron-LM
`get_batch_on_this_cp_rank`); its rotary embedding slices positions the same way (`get_pos_emb_on_this_cp_rank`,
applied whenever the CP group has more than one rank), and Transformer Engine's context-parallel attention
assumes it, so a token's rotary position is its true position in the full sequence exactly when the model input
was split here.

The pure functions (`padded_length`, `rank_positions`, `split_sequence`, `restore_order`) say where tokens go; the
two gathers bring values back over the CP group, with the gradient each use needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from lcot_mega.actor.batching import MicroBatch


def padded_length(length: int, cp_size: int) -> int:
    """`length` rounded up to a multiple of 2 * cp_size (right padding: no real token sees it under causal
    attention, and it is outside every loss mask)."""
    multiple = 2 * cp_size
    return -(-length // multiple) * multiple


def rank_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of the 2 * cp_size chunks that `cp_rank` holds, in its local order: (r, 2 * cp - 1 - r)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def rank_positions(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of the full sequence that `cp_rank` holds, in its local order; int64 [length / cp_size]."""
    multiple = 2 * cp_size
    if length % multiple:
        raise ValueError(
            f"a sequence split over {cp_size} CP ranks needs a length divisible by {multiple}, got {length}"
        )
    chunk = length // multiple
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in rank_chunks(cp_size, cp_rank)])


def split_sequence(t: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """`cp_rank`'s part of `t` along the sequence dimension `dim` (a copy; `t` itself at cp_size 1)."""
    if cp_size == 1:
        return t
    return t.index_select(dim, rank_positions(t.shape[dim], cp_size, cp_rank).to(t.device))


def restore_order(gathered: torch.Tensor, cp_size: int, dim: int = 1) -> torch.Tensor:
    """The full sequence from the parts of ranks 0 .. cp_size - 1 laid end to end along `dim` (what an all-gather
    returns): the inverse of `split_sequence` over all ranks."""
    if cp_size == 1:
        return gathered
    length = gathered.shape[dim]
    order = torch.cat([rank_positions(length, cp_size, r) for r in range(cp_size)])  # gathered index -> position
    return gathered.index_select(dim, order.argsort().to(gathered.device))


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0 over `group` (rank-major); the backward either reduce-scatters the gradient (each
    rank's downstream computation differs: the gradient of a rank's part is the sum over ranks) or keeps this
    rank's part of it (every rank computes the same thing downstream, so their gradients are equal).

    Written with plain `torch.distributed` calls on the input's device: megatron-core's sequence-parallel gather
    allocates its reduce-scatter output on `torch.cuda.current_device()` inside the backward, where the CPU shim's
    device mode does not reach (`cpu_compat`)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: dist.ProcessGroup, sum_grads: bool) -> torch.Tensor:
        ctx.group, ctx.sum_grads = group, sum_grads
        t = t.contiguous()
        out = t.new_empty((t.shape[0] * group.size(), *t.shape[1:]))
        dist.all_gather_into_tensor(out, t, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        group = ctx.group
        part = grad.shape[0] // group.size()
        if not ctx.sum_grads:
            return grad[group.rank() * part : (group.rank() + 1) * part].contiguous(), None, None
        out = grad.new_empty((part, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
        return out, None, None


def gather_keys_values(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Keys or values of the whole sequence from every rank's part: [s / cp, ...] -> [s, ...] in sequence order.

    Each rank's queries attend to other ranks' keys, so the gradient of a rank's keys is the sum of what every
    rank's attention sends back: the backward reduce-scatters over the CP group. All-gathered keys and values
    rather than a ring (Grattafiori et al. 2024, "The Llama 3 Herd of Models", sec. 3.3.2): with grouped-query
    attention they are a small share of the activations.
    """
    return restore_order(_AllGatherFirstDim.apply(t, group, True), group.size(), dim=0)


def gather_token_values(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Per-token values of the whole sequence from every rank's part: [n, s / cp] -> [n, s] in sequence order.

    For values every rank then feeds into the same computation (the loss of the whole sequence): each rank's
    gradient of the full [n, s] tensor is the same, so the backward keeps this rank's part of it and sends
    nothing; summing would count it cp times.
    """
    gathered = _AllGatherFirstDim.apply(t.transpose(0, 1), group, False)  # [s, n], rank-major
    return restore_order(gathered, group.size(), dim=0).transpose(0, 1)


@dataclass(frozen=True)
class SequenceSplit:
    """This rank's place in its CP group; `local` cuts a micro-batch to its tokens, `gather` brings them back."""

    size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None

    def local(self, mb: MicroBatch) -> MicroBatch:
        """The micro-batch as this rank sees it: every [b, s] tensor cut to its [b, s / cp] positions (the model
        input, and the labels and loss mask its log-probs are computed at). The same `mb` at CP size 1."""
        if self.size == 1:
            return mb
        if mb.packed is not None:
            raise ValueError("packed micro-batches are not split over context-parallel ranks (actor.pack_sequences)")
        cut = [
            split_sequence(t, self.size, self.rank) for t in (mb.input_ids, mb.position_ids, mb.labels, mb.loss_mask)
        ]
        routing = mb.routing  # a mixture of experts' replayed experts: cut as the input is
        if routing is not None:
            routing = routing.cut(lambda t: split_sequence(t, self.size, self.rank, dim=0), mb.input_ids.shape[0])
        return replace(mb, input_ids=cut[0], position_ids=cut[1], labels=cut[2], loss_mask=cut[3], routing=routing)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[n, s / cp] per-token values of `local(mb)` -> [n, s] of `mb` (`gather_token_values`)."""
        return t if self.size == 1 else gather_token_values(t, self.group)
