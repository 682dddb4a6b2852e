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

Layout = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
_ALIGN = 64  # bytes: every view starts aligned, whatever its dtype


class StagingBuffer:
    """Views, by HF name, into one CPU storage in shared memory (a named segment that other processes can map)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        offsets, size = [], 0
        for _, shape, dtype in layout:
            offsets.append(size)
            size += -(-torch.Size(shape).numel() * _itemsize(dtype) // _ALIGN) * _ALIGN
        self.storage = torch.UntypedStorage._new_using_filename_cpu(max(size, 1))
        self.nbytes = size
        self.views: dict[str, torch.Tensor] = {}
        for (name, shape, dtype), offset in zip(layout, offsets, strict=True):
            view = torch.empty(0, dtype=dtype).set_(self.storage, offset // _itemsize(dtype), torch.Size(shape))
            self.views[name] = view


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


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
            layout += [(name, tuple(t.shape), t.dtype) for name, t in bucket]
            yield bucket
        if self.buffer is None or self.buffer.layout != tuple(layout):
            self.buffer = StagingBuffer(tuple(layout)) if layout else None
