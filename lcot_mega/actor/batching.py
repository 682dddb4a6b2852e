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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TokenSequence = tuple[Sequence[int], Sequence[int]]
"""(prompt_ids, response_ids) of one sampled sequence."""


@dataclass(frozen=True)
class MicroBatch:
    """One right-padded micro-batch; an empty one (no `indices`) holds a single dummy token."""

    input_ids: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64, next token (0 where there is none)
    loss_mask: torch.Tensor  # [b, s] bool, True where labels is a response token
    indices: tuple[int, ...]
    """Index of each real row's sequence in the caller's list; rows beyond len(indices) are dummies."""

    @property
    def num_rows(self) -> int:
        """Real rows (0 for an empty micro-batch, which still holds one dummy row to run the model on)."""
        return len(self.indices)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The real rows of a [b, ...] tensor of this micro-batch."""
        return t[: self.num_rows]

    def to(self, device: torch.device | str) -> MicroBatch:
        """The same micro-batch with its tensors on `device`."""
        move = [
            t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids, self.labels, self.loss_mask)
        ]
        return MicroBatch(*move, self.indices)


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


def pack_by_tokens(lengths: Sequence[int], indices: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches of `indices` with padded length * rows <= `max_tokens` (an over-long one alone)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        # sorted longest first: the first row of a micro-batch sets its padded length
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_micro_batches(
    lengths: Sequence[int], num_ranks: int, max_tokens: int, count_multiple: int = 1
) -> list[list[list[int]]]:
    """[rank][micro-batch] -> sequence indices; every rank gets the same number of micro-batches.

    That number is also rounded up to a multiple of `count_multiple` (the interleaved pipeline schedule
    needs a multiple of the pipeline size); the added micro-batches are empty.
    """
    per_rank = [pack_by_tokens(lengths, idx, max_tokens) for idx in split_across_ranks(lengths, num_ranks)]
    count = max(1, max(len(b) for b in per_rank))
    count = -(-count // count_multiple) * count_multiple
    return [b + [[] for _ in range(count - len(b))] for b in per_rank]


def collate(
    sequences: Sequence[TokenSequence], indices: Sequence[int], pad_id: int = 0, shape: tuple[int, int] = (1, 1)
) -> MicroBatch:
    """Right-padded tensors of the sequences at `indices`, at least `shape` = (rows, length) large.

    Rows beyond the real ones are dummies (pad tokens, empty mask); no indices gives one dummy row.
    """
    rows = [list(sequences[i][0]) + list(sequences[i][1]) for i in indices]
    num_rows, seq_len = max(len(rows), shape[0]), max([len(r) for r in rows] + [shape[1]])
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


def make_micro_batches(
    sequences: Sequence[TokenSequence],
    rank: int,
    num_ranks: int,
    max_tokens: int,
    count_multiple: int = 1,
    pad_id: int = 0,
    uniform_shape: bool = False,
) -> list[MicroBatch]:
    """The micro-batches of data-parallel `rank` (same count on every rank); see the module docstring.

    `uniform_shape` pads them all to the largest row count and length among them (the token budget then
    holds for none but the largest): for pipeline schedules that cannot exchange shapes per micro-batch.
    """
    lengths = sequence_lengths(sequences)
    plan = plan_micro_batches(lengths, num_ranks, max_tokens, count_multiple)[rank]
    shape = (1, 1)
    if uniform_shape:
        shape = (max(len(idx) for idx in plan), max([lengths[i] for idx in plan for i in idx] + [1]))
    return [collate(sequences, idx, pad_id, shape) for idx in plan]


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
