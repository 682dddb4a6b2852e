"""Per-token log-probs and entropy of response tokens, under any tensor/pipeline/data-parallel layout.

Two ways from the last stage's output to them (`TokenStatsHead`): by default the model hands back its final
hidden states and `chunked_logits` forms the logits a chunk of response tokens at a time (memory flat in the
sequence length); with `actor.logits_chunk_tokens = 0` the model's full logits are used as follows. Full
logits arrive vocab-parallel ([b, s, V_pad / tp] on each tensor-parallel rank). They are divided by the
sampling temperature exactly as the rollout engine does (logits / T) and the columns of the vocabulary
padding (V_pad > V) are set to -inf, so they carry no probability. The log-prob of a target token is
megatron-core's `vocab_parallel_cross_entropy` negated; the entropy is reduced over the TP group here.

The forward runs through megatron-core's pipeline schedule, so results exist only on the last pipeline
stage of each data-parallel replica. Under context parallelism each rank runs the model on its part of every
row (`context_parallel`) and the per-token values of whole rows are gathered from the CP group before any loss
sees them. `compute_logprobs` hands every rank the values of every sequence: one all-reduce (SUM) over all ranks
where only the last stage's TP and CP rank 0 of each replica contributes its sequences and every other rank adds
exact zeros.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from lcot_mega.actor import megatron_adapter as ma
from lcot_mega.actor import routing
from lcot_mega.actor.batching import MicroBatch, PackedRows, TokenSequence, from_token_layout, make_micro_batches
from lcot_mega.actor.chunked_logits import chunked_token_stats, output_weight, returning_hidden_states

DEFAULT_CHUNK_TOKENS = 1024
"""Tokens whose logits are formed at once (actor.logits_chunk_tokens): 1024 x 49k fp32 is 192 MiB per copy."""


def scaled_logits(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """fp32 logits / T with the vocabulary padding of this TP rank's slice at -inf; [b, s, V_pad/tp]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    group = ma.tensor_parallel_group()
    local = logits.shape[-1]
    start = group.rank() * local  # this rank's slice of the (padded) vocabulary
    z = logits.float() / temperature  # [b, s, V/tp], a new tensor (the callers modify it in place)
    if start + local > vocab_size:
        padded = torch.arange(start, start + local, device=z.device) >= vocab_size  # [V/tp]
        z = z.masked_fill(padded, float("-inf"))
    return z


def token_logprobs(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[label] over the vocab-parallel last dim; [b, s, V/tp], [b, s] -> [b, s]. CONSUMES `z`.

    `vocab_parallel_cross_entropy` subtracts the max from its input and exponentiates it in place. `z` is
    handed over without a copy (one [b, s, V/tp] fp32 tensor less, which matters at long-CoT lengths):
    compute anything else from `z` (the entropy) first. That is safe for autograd: no backward saves `z`
    itself (its producers are a division by a constant and a masked fill; the entropy saves only tensors
    derived from it), and the cross entropy's own backward uses the softmax it saved.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(z, labels)


def vocab_parallel_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the vocab-parallel last dim: H = log S - A / S, [b, s, V/tp] -> [b, s].

    With z' = z - max (over the whole vocabulary, detached: H does not depend on the shift), S = sum e^z' and
    A = sum e^z' z'. Each rank sums its slice and the partial sums are all-reduced with megatron-core's
    `reduce_from_tensor_model_parallel_region` (forward all-reduce, backward identity). That backward is
    right only because nothing but the two reduced scalars feeds H: every rank computes the same H from
    the same S and A, so dH/d(partial sum) = dH/dS (or dH/dA) on every rank. (Forming p = e^z' / S per
    rank instead would leave each rank's dH/dS without the other ranks' terms.) -inf entries (vocabulary
    padding) have e^z' = 0 and add 0.
    """
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    group = ma.tensor_parallel_group()
    z_max = z.detach().amax(dim=-1, keepdim=True)  # [b, s, 1]
    if group.size() > 1:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
    shifted = z - z_max  # [b, s, V/tp], max entry over the whole vocabulary 0
    exp = shifted.exp()  # [b, s, V/tp]
    # e^z' z' is 0 where z' = -inf; computed as such, 0 * -inf would be NaN
    exp_shifted = exp * torch.where(exp > 0, shifted, 0.0)  # [b, s, V/tp]
    sums = reduce_from_tensor_model_parallel_region(torch.stack([exp.sum(-1), exp_shifted.sum(-1)]), group)
    return sums[0].log() - sums[1] / sums[0]


class TokenStatsHead:
    """The last pipeline stage's output -> per-token (log p(label), entropy) of softmax(logits / T), [n, s] each.

    `chunk_tokens` > 0: the output is the final hidden states and the logits are formed `chunk_tokens` response
    tokens at a time (`chunked_logits`; zero at positions outside the loss mask). 0: the output is the full
    [b, s, V/tp] logits (the reference path, memory ~5 MB per token on a 49k vocabulary).
    """

    def __init__(self, chunks: list[torch.nn.Module], vocab_size: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
        self.chunks, self.vocab_size, self.chunk_tokens = chunks, vocab_size, chunk_tokens
        last = ma.unwrap(chunks[-1])
        self.weight = output_weight(last) if chunk_tokens and last.post_process else None
        self.split = ma.sequence_split()

    def model_outputs(self) -> contextlib.AbstractContextManager:
        """Context in which the chunks output what this head reads (hidden states when chunked)."""
        return returning_hidden_states(self.chunks) if self.chunk_tokens else contextlib.nullcontext()

    def __call__(
        self,
        mb: MicroBatch,
        output: torch.Tensor,
        temperature: float,
        entropy: bool = False,
        entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs, entropy or None) of the real rows of `mb`, [n, s]; the entropy in the graph only with
        `entropy_grad` (it is a loss term), else detached (a metric).

        Under context parallelism `output` covers this rank's tokens of `mb` only (`SequenceSplit.local`): their
        values are computed here and the whole rows gathered from the CP group, so every CP rank returns (and
        computes its loss from) the same [n, s] values."""
        logp, ent = self._local_stats(self.split.local(mb), output, temperature, entropy, entropy_grad)
        return self.split.gather(logp), None if ent is None else self.split.gather(ent)

    def _local_stats(
        self, mb: MicroBatch, output: torch.Tensor, temperature: float, entropy: bool, entropy_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.chunk_tokens:
            if mb.packed is not None:
                raise ValueError("packed micro-batches need actor.logits_chunk_tokens > 0")
            z = scaled_logits(mb.rows(output), temperature, self.vocab_size)  # [n, s, V/tp]
            ent = None
            if entropy:
                with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                    ent = vocab_parallel_entropy(z if entropy_grad else z.detach())  # [n, s], before z is consumed
            return token_logprobs(z, mb.rows(mb.labels)), ent
        mask = mb.rows(mb.loss_mask)  # [n, s]
        hidden = mb.response_states(output)  # [N, h]: response positions only
        logp, ent = chunked_token_stats(
            hidden, self.weight, mb.rows(mb.labels)[mask], temperature, self.vocab_size, self.chunk_tokens
        )
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        ent = zeros.masked_scatter(mask, ent if entropy_grad else ent.detach()) if entropy else None
        return zeros.masked_scatter(mask, logp), ent

    def zero_loss(self, output: torch.Tensor) -> torch.Tensor:
        """A zero loss that still reaches every parameter (empty micro-batches keep the ranks' schedules aligned)."""
        loss = output.sum() * 0.0
        if self.weight is not None and self.weight.requires_grad:
            loss = loss + self.weight[:1].sum() * 0.0
        return loss


def run_schedule(
    chunks: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    loss_func: Callable,
    forward_only: bool,
    head: TokenStatsHead,
) -> list:
    """Run `micro_batches` through megatron-core's pipeline schedule; per-micro-batch outputs of `loss_func`.

    `loss_func(mb, output)` runs on the last pipeline stage only; `output` is what `head` reads. Forward-only
    runs collect whatever it returns (non-loss data); training runs expect megatron's `(loss, stats)` pair and
    collect the stats. Every other stage gets an empty list.
    """

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        packed = None if mb.packed is None else packed_seq_params(mb.packed)
        local = head.split.local(mb)  # this context-parallel rank's tokens (all of them without CP)
        if local.routing is not None:  # a mixture of experts: this micro-batch's replayed experts, its real tokens
            routing.set_targets(model, routing.sequence_parallel_part(model, local.routing, local.input_ids.shape[0]))
        # [b, s, V/tp] logits or [b, s, h] hidden states on the last stage ([1, T, ...] packed), else activations;
        # s / cp positions under context parallelism
        output = model(local.input_ids, local.position_ids, None, packed_seq_params=packed)
        if forward_only:
            return output, lambda out, non_loss_data=True: loss_func(mb, out)
        return output, partial(loss_func, mb)

    # one iterator per model chunk: the interleaved schedule walks each chunk through every micro-batch
    iterators = [iter(micro_batches) for _ in chunks]
    dtype = ma.autocast_dtype(chunks)  # the backward too (megatron_adapter._autocast_forward)
    autocast = torch.autocast(ma.compute_device().type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with head.model_outputs(), autocast:
        out = ma.forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.input_ids.shape[1] for mb in micro_batches),  # per-micro-batch shapes are exchanged
            micro_batch_size=max(mb.input_ids.shape[0] for mb in micro_batches),
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )
    return list(out) if out else []


def packed_seq_params(rows: PackedRows):
    """megatron-core's THD description of a packed micro-batch: self-attention within each sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=rows.cu_seqlens,
        cu_seqlens_kv=rows.cu_seqlens,
        max_seqlen_q=rows.max_seqlen,
        max_seqlen_kv=rows.max_seqlen,
    )


def share_per_sequence(
    values: dict[int, torch.Tensor], lengths: Sequence[int], contributes: bool
) -> list[torch.Tensor]:
    """Every rank gets the 1-D tensor of every sequence; `values` (index -> tensor) of contributing ranks.

    One flat all-reduce SUM over all ranks: each sequence is written by exactly one rank, the others add
    exact zeros, so the result is bit-identical to what that rank computed.
    """
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    flat = torch.zeros(offsets[-1], dtype=torch.float32, device=ma.compute_device())  # [sum of lengths]
    if contributes:
        for i, v in values.items():
            flat[offsets[i] : offsets[i + 1]] = v.detach().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()  # results go back to the driver on the host
    return [flat[offsets[i] : offsets[i + 1]].clone() for i in range(len(lengths))]


def is_reporting_rank() -> bool:
    """The rank that speaks for its data-parallel replica: last pipeline stage, tensor- and context-parallel rank 0
    (the ranks of a TP or CP group hold the same per-token values of the replica's sequences)."""
    return ma.is_pipeline_last_stage() and ma.tensor_parallel_group().rank() == 0 and ma.sequence_split().rank == 0


def micro_batches_for_this_rank(
    sequences: Sequence[TokenSequence], max_tokens: int, packed: bool = False, sequence_parallel: bool = False
) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches; under virtual pipelining their count is a multiple of the
    pipeline size and they share one shape (`megatron_adapter.transformer_config` says why). `packed`: see
    `batching.pack`. Lengths are rounded up so that context parallelism cuts each row into 2 x CP equal chunks and
    sequence parallelism each context-parallel part into TP equal slices."""
    layout = ma.current_layout()
    interleaved = layout.vpp_size is not None
    multiple = 2 * layout.cp_size if layout.cp_size > 1 else 1  # equal chunks (`context_parallel`)
    if sequence_parallel:
        multiple = math.lcm(multiple, layout.cp_size * layout.tp_size)
    micro_batches = make_micro_batches(
        sequences,
        layout.dp_rank,
        layout.dp_size,
        max_tokens,
        count_multiple=layout.pp_size if interleaved else 1,
        uniform_shape=interleaved,
        packed=packed,
        length_multiple=multiple,
    )
    device = ma.compute_device()
    return [mb.to(device) for mb in micro_batches]


@dataclass(frozen=True)
class TokenLogProbs:
    """Per-sequence [response_len] float32 tensors, in the order of the sequences given."""

    logprobs: list[torch.Tensor]
    entropy: list[torch.Tensor] | None = None


@torch.no_grad()
def compute_logprobs(
    chunks: list[torch.nn.Module],
    sequences: Sequence[TokenSequence],
    temperature: float,
    vocab_size: int,
    max_tokens: int,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    packed: bool = False,
    routes: routing.RouteList | None = None,
) -> TokenLogProbs:
    """Log-probs (and optionally entropy) of every response token of `sequences`, on every rank.

    Every rank must pass the same `sequences` (the whole batch); each data-parallel replica computes its
    share (`batching.split_across_ranks`) and the results are shared with all ranks. `chunk_tokens`: see
    `TokenStatsHead`; `packed`: see `batching.pack`; `routes`: a mixture of experts' routing to replay, per sequence
    (`routing`).
    """
    sp = ma.unwrap(chunks[0]).config.sequence_parallel
    micro_batches = micro_batches_for_this_rank(sequences, max_tokens, packed, sp)
    micro_batches = routing.with_targets(chunks, micro_batches, sequences, routes)
    head = TokenStatsHead(chunks, vocab_size, chunk_tokens)

    def collect(mb: MicroBatch, output: torch.Tensor) -> tuple[MicroBatch, torch.Tensor | None, torch.Tensor | None]:
        if mb.num_rows == 0:  # an empty micro-batch that only keeps the ranks' schedules aligned
            return mb, None, None
        return mb, *head(mb, output, temperature, entropy=with_entropy)

    logp_by_index, ent_by_index = {}, {}
    for mb, logp, ent in run_schedule(chunks, micro_batches, collect, forward_only=True, head=head):
        if logp is None:
            continue
        logp_by_index.update(zip(mb.indices, from_token_layout(logp, mb), strict=True))
        if ent is not None:
            ent_by_index.update(zip(mb.indices, from_token_layout(ent, mb), strict=True))
    lengths = [len(response) for _, response in sequences]
    contributes = is_reporting_rank()
    logprobs = share_per_sequence(logp_by_index, lengths, contributes)
    entropy = share_per_sequence(ent_by_index, lengths, contributes) if with_entropy else None
    return TokenLogProbs(logprobs, entropy)
