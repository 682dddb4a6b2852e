"""A staging buffer for weight syncs to engines in other processes: one shared-memory buffer laid out for every
tensor a sync sends, kept across syncs.

Why: without it every sync assembles each HF tensor into fresh memory (a page fault per 4 KiB on first touch, about
4x the copy itself on CPU) and the shared-memory transport then copies it once more into its segment. With it the
gather writes each weight straight into its place in the buffer (every TP rank its own slices,
`shared_shards.peer_targets`), and `tensor_ipc` sends handles to the buffer instead of copying
(`/update_weights_from_tensor`); a broadcast reads the buffer directly. The layout is learned from the first sync
(names, shapes, dtypes as the engines receive them) and the buffer is rebuilt if it ever changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

Layout = tuple[tuple[tuple[str, tuple[int, ...], torch.dtype], ...], ...]
"""Per bucket, the (name, shape, dtype) of each tensor in it."""
_ALIGN = 64  # bytes: every bucket starts aligned


class StagingBuffer:
    """Views, by HF name, into one CPU storage in shared memory (a named segment that other processes can map).

    Each bucket's tensors lie packed one after the other (a tensor whose dtype differs from the one before it starts
    at a multiple of its item size), so a bucket of one dtype is one contiguous range: sent as a single flat tensor
    (`flat_range`) without a copy."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        offsets, size = [], 0
        for bucket in layout:
            size = _round_up(size, _ALIGN)
            for _, shape, dtype in bucket:
                size = _round_up(size, dtype.itemsize)
                offsets.append(size)
                size += torch.Size(shape).numel() * dtype.itemsize
        self.storage = torch.UntypedStorage._new_using_filename_cpu(max(size, 1))
        self.nbytes = size
        self.views: dict[str, torch.Tensor] = {}
        specs = [spec for bucket in layout for spec in bucket]
        for (name, shape, dtype), offset in zip(specs, offsets, strict=True):
            view = torch.empty(0, dtype=dtype).set_(self.storage, offset // dtype.itemsize, torch.Size(shape))
            self.views[name] = view


def flat_range(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D tensor over exactly the elements of `tensors` when they are contiguous, of one dtype and lie one
    right after the other in one storage (a staged bucket); else None."""
    if not tensors:
        return None
    first, dtype = tensors[0], tensors[0].dtype
    storage, start = first.untyped_storage(), first.storage_offset()
    end = start
    for t in tensors:
        same_place = t.untyped_storage().data_ptr() == storage.data_ptr() and t.storage_offset() == end
        if t.dtype != dtype or not t.is_contiguous() or not same_place:
            return None
        end += t.numel()
    return torch.empty(0, dtype=dtype, device=first.device).set_(storage, start, torch.Size([end - start]))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Stager:
    """Keeps the staging buffer of one sync route: `targets()` for the gather (None until a sync taught it the
    layout), `watch(buckets)` records the layout of what a sync sent."""

    def __init__(self) -> None:
        self.buffer: StagingBuffer | None = None

    def targets(self) -> dict[str, torch.Tensor] | None:
        return None if self.buffer is None else self.buffer.views

    def watch(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """`buckets` unchanged; once they are all through, a buffer for their layout (unless the current one is it)."""
        layout = []
        for bucket in buckets:
            bucket = list(bucket)
            layout.append(tuple((name, tuple(t.shape), t.dtype) for name, t in bucket))
            yield bucket
        if self.buffer is None or self.buffer.layout != tuple(layout):
            self.buffer = StagingBuffer(tuple(layout)) if layout else None
