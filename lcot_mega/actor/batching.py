"""Dynamic-batch-size micro-batches: (prompt, response) token sequences -> right-padded [b, s] tensors.

Three steps, each deterministic so that every rank computes the same plan from the same batch without
talking to the others:
1. `split_across_ranks`: sequences go to data-parallel ranks, balanced by token count (longest first, each
   to the rank with the fewest tokens so far).
2. `pack_by_tokens`: on each rank, sequences sorted by length (longest first) are packed while
   padded length * rows <= the token budget; a sequence longer than the budget gets its own micro-batch.
3. `plan_micro_batches`: every rank gets the same number of micro-batches (empty ones appended), since
   the pipeline schedule's point-to-point and gradient collectives must match across ranks.

Layout of one micro-batch (`MicroBatch`): row i holds prompt + response of sequence `indices[i]`, padded
on the right. Response token t (at position p = len(prompt) + t) is predicted by the logits at position
p - 1, so `labels[i, p - 1] = input_ids[i, p]` and `loss_mask[i, p - 1]` is True exactly for response
tokens. Right padding keeps every real token at its own position under the causal mask.

Packed micro-batches (`packed=True`, actor.pack_sequences): the model input is one row of the sequences laid
end to end, no padding ([1, T], T = the sum of their lengths, which is what the token budget counts), attended
per sequence through `PackedRows.cu_seqlens` (THD, megatron's `PackedSeqParams`). `labels` and `loss_mask` keep
the padded [n, s] layout above, so the loss sees one row per sequence either way; `PackedRows.token_index` maps
each (row, position) to its place in the packed row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

TokenSequence = tuple[Sequence[int], Sequence[int]]
"""(prompt_ids, response_ids) of one sampled sequence."""


@dataclass(frozen=True)
class PackedRows:
    """Where the sequences of a packed micro-batch lie in its one input row."""

    cu_seqlens: torch.Tensor  # [n + 1] int32 (+1 with a pad segment at the end): sequence i is input positions
    # cu_seqlens[i] .. cu_seqlens[i + 1] - 1
    token_index: torch.Tensor  # [n, s] int64: input position of (row, position) of the padded layout (0 at padding)
    max_seqlen: int

    def to(self, device: torch.device | str) -> PackedRows:
        return PackedRows(self.cu_seqlens.to(device), self.token_index.to(device), self.max_seqlen)


@dataclass(frozen=True)
class MicroBatch:
    """One right-padded (or packed) micro-batch; an empty one (no `indices`) holds a single dummy token."""

    input_ids: torch.Tensor  # [b, s] int64 ([1, T] when packed)
    position_ids: torch.Tensor  # [b, s] int64 ([1, T] when packed: each sequence from 0)
    labels: torch.Tensor  # [b, s] int64, next token (0 where there is none)
    loss_mask: torch.Tensor  # [b, s] bool, True where labels is a response token
    indices: tuple[int, ...]
    """Index of each real row's sequence in the caller's list; rows beyond len(indices) are dummies."""
    packed: PackedRows | None = None
    """Set when the model input is packed (then `labels` and `loss_mask` are still [n, s], one row a sequence)."""
    routing: Any = None
    """A mixture of experts' `routing.RouteTargets` for this micro-batch (replayed experts, real tokens), or None."""

    @property
    def num_rows(self) -> int:
        """Real rows (0 for an empty micro-batch, which still holds one dummy row to run the model on)."""
        return len(self.indices)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The real rows of a [b, ...] tensor of this micro-batch (in the padded layout)."""
        return t[: self.num_rows]

    def response_states(self, output: torch.Tensor) -> torch.Tensor:
        """The model output [b, s, ...] ([1, T, ...] when packed) at the loss-mask positions, in the order of
        `rows(loss_mask)`'s True entries (row by row): [N, ...]."""
        mask = self.rows(self.loss_mask)  # [n, s]
        if self.packed is None:
            return self.rows(output)[mask]
        return output[0, self.packed.token_index[mask]]

    def to(self, device: torch.device | str) -> MicroBatch:
        """The same micro-batch with its tensors on `device`."""
        move = [
            t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids, self.labels, self.loss_mask)
        ]
        packed = None if self.packed is None else self.packed.to(device)
        return MicroBatch(*move, self.indices, packed, None if self.routing is None else self.routing.to(device))


def sequence_lengths(sequences: Sequence[TokenSequence]) -> list[int]:
    """Prompt + response tokens of each sequence; a prompt must have at least one token."""
    lengths = []
    for i, (prompt, response) in enumerate(sequences):
        if len(prompt) == 0:
            raise ValueError(f"sequence {i} has an empty prompt: its first response token would have no context")
        lengths.append(len(prompt) + len(response))
    return lengths


def split_across_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Indices per rank, balanced by tokens (longest first onto the least loaded rank, ties to the lowest)."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    load = [0] * num_ranks
    out: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(num_ranks), key=lambda r: (load[r], r))
        out[rank].append(i)
        load[rank] += lengths[i]
    return out


def pack_by_tokens(
    lengths: Sequence[int], indices: Sequence[int], max_tokens: int, packed: bool = False
) -> list[list[int]]:
    """Micro-batches of `indices` with padded length * rows <= `max_tokens` (an over-long one alone).

    `packed`: the budget counts real tokens (sum of lengths), filled first-fit in decreasing length order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if packed:
            fit = next((b for b, load in enumerate(loads) if load + lengths[i] <= max_tokens), None)
            if fit is None:
                batches.append([i])
                loads.append(lengths[i])
            else:
                batches[fit].append(i)
                loads[fit] += lengths[i]
        # sorted longest first: the first row of a micro-batch sets its padded length
        elif batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_micro_batches(
    lengths: Sequence[int], num_ranks: int, max_tokens: int, count_multiple: int = 1, packed: bool = False
) -> list[list[list[int]]]:
    """[rank][micro-batch] -> sequence indices; every rank gets the same number of micro-batches.

    That number is also rounded up to a multiple of `count_multiple` (the interleaved pipeline schedule
    needs a multiple of the pipeline size); the added micro-batches are empty.
    """
    per_rank = [pack_by_tokens(lengths, idx, max_tokens, packed) for idx in split_across_ranks(lengths, num_ranks)]
    count = max(1, max(len(b) for b in per_rank))
    count = -(-count // count_multiple) * count_multiple
    return [b + [[] for _ in range(count - len(b))] for b in per_rank]


def collate(
    sequences: Sequence[TokenSequence],
    indices: Sequence[int],
    pad_id: int = 0,
    shape: tuple[int, int] = (1, 1),
    length_multiple: int = 1,
) -> MicroBatch:
    """Right-padded tensors of the sequences at `indices`, at least `shape` = (rows, length) large, the length
    rounded up to a multiple of `length_multiple` (context parallelism cuts it into equal chunks).

    Rows beyond the real ones are dummies (pad tokens, empty mask); no indices gives one dummy row.
    """
    rows = [list(sequences[i][0]) + list(sequences[i][1]) for i in indices]
    num_rows, seq_len = max(len(rows), shape[0]), max([len(r) for r in rows] + [shape[1]])
    seq_len = -(-seq_len // length_multiple) * length_multiple
    input_ids = torch.full((num_rows, seq_len), pad_id, dtype=torch.long)  # [b, s]
    loss_mask = torch.zeros((num_rows, seq_len), dtype=torch.bool)  # [b, s]
    for row, i in enumerate(indices):
        prompt_len, total = len(sequences[i][0]), len(rows[row])
        input_ids[row, :total] = torch.tensor(rows[row], dtype=torch.long)
        loss_mask[row, prompt_len - 1 : total - 1] = True
    labels = torch.zeros_like(input_ids)  # [b, s]
    labels[:, :-1] = input_ids[:, 1:]
    position_ids = torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(num_rows, -1).contiguous()
    return MicroBatch(input_ids, position_ids, labels, loss_mask, tuple(indices))


def pack(mb: MicroBatch, lengths: Sequence[int], length_multiple: int = 1) -> MicroBatch:
    """The packed form of a collated micro-batch whose real rows hold sequences of `lengths` tokens: the
    sequences end to end in one input row, which `length_multiple` rounds up with one more segment of pad tokens
    (sequence parallelism cuts the row into equal parts). An empty micro-batch stays as it is."""
    if mb.num_rows == 0:
        return mb
    pad = -sum(lengths) % length_multiple
    segments = [*lengths, pad] if pad else list(lengths)
    rows = [mb.input_ids[row, :n] for row, n in enumerate(lengths)]
    input_ids = torch.cat([*rows, mb.input_ids.new_zeros(pad)]).unsqueeze(0)  # [1, T]
    position_ids = torch.cat([torch.arange(n) for n in segments]).unsqueeze(0)  # [1, T]
    cu = torch.tensor([0, *segments]).cumsum(0)  # [segments + 1]
    s = mb.loss_mask.shape[1]
    position = torch.arange(s)  # [s]
    token_index = torch.where(
        position < torch.tensor(lengths).unsqueeze(1), cu[: len(lengths)].unsqueeze(1) + position, 0
    )
    rows = PackedRows(cu.to(torch.int32), token_index, max(segments))
    return MicroBatch(input_ids, position_ids, mb.rows(mb.labels), mb.rows(mb.loss_mask), mb.indices, rows)


def make_micro_batches(
    sequences: Sequence[TokenSequence],
    rank: int,
    num_ranks: int,
    max_tokens: int,
    count_multiple: int = 1,
    pad_id: int = 0,
    uniform_shape: bool = False,
    packed: bool = False,
    length_multiple: int = 1,
) -> list[MicroBatch]:
    """The micro-batches of data-parallel `rank` (same count on every rank); see the module docstring.

    `uniform_shape` pads them all to the largest row count and length among them (the token budget then
    holds for none but the largest): for pipeline schedules that cannot exchange shapes per micro-batch.
    `packed`: each micro-batch's sequences end to end in one row, the budget counting real tokens.
    `length_multiple`: padded lengths (with `packed`, the packed rows) are rounded up to a multiple of it.
    """
    if packed and uniform_shape:
        raise ValueError("packed micro-batches have no uniform shape (the interleaved pipeline schedule needs one)")
    lengths = sequence_lengths(sequences)
    plan = plan_micro_batches(lengths, num_ranks, max_tokens, count_multiple, packed)[rank]
    shape = (1, 1)
    if uniform_shape:
        shape = (max(len(idx) for idx in plan), max([lengths[i] for idx in plan for i in idx] + [1]))
    batches = [collate(sequences, idx, pad_id, shape, length_multiple) for idx in plan]
    return [pack(mb, [lengths[i] for i in mb.indices], length_multiple) for mb in batches] if packed else batches


def to_token_layout(
    values: Sequence[torch.Tensor | float], mb: MicroBatch, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[num_rows, s] tensor holding each real row's per-response-token values at its loss-mask positions.

    `values` is indexed like the caller's sequences: a 1-D tensor with one value per response token, or a
    scalar (per-sequence value, broadcast over the response). Zero elsewhere; on the micro-batch's device.
    """
    mask = mb.rows(mb.loss_mask)  # [n, s]
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # [n, s]
    for row, i in enumerate(mb.indices):
        v = torch.as_tensor(values[i], dtype=dtype).to(mask.device)
        n = int(mask[row].sum())
        if v.dim() == 1 and v.numel() != n:
            raise ValueError(f"sequence {i}: {v.numel()} values for {n} response tokens")
        out[row, mask[row]] = v
    return out


def from_token_layout(t: torch.Tensor, mb: MicroBatch) -> list[torch.Tensor]:
    """Inverse of `to_token_layout`: per real row, the [response_len] values at its loss-mask positions."""
    mask = mb.rows(mb.loss_mask)  # [n, s]
    return [t[row][mask[row]] for row in range(mb.num_rows)]
