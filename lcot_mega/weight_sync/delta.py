"""Delta weight sync (`rollout.sync: delta`): send the engines only the elements that changed since their version.

Why it pays: an RL step moves a weight by about the learning rate (1e-6..1e-5) while one ulp of a bf16 weight of
size 1e-2 is about 6e-5, so most engine-dtype elements are bit-identical from one step to the next. The trainer
keeps a mirror of what the engines hold (one copy of the model in the engine's dtype, on the owner rank) and sends,
per tensor, the flat indices and new values of the elements whose bits changed, or the whole tensor where that is
smaller (an fp32 engine changes almost everywhere, so delta mode then costs a compare and sends full tensors).

Wire: plain named tensors, so every transport carries a delta bucket unchanged (in process, shared memory, a
broadcast):
- `<name>`: a whole tensor; or `<name>#delta.value` (engine dtype, the changed elements in flat order) with their
  places, as `<name>#delta.index` (int32/int64 flat indices; smallest below 1/32 of the elements changed for
  16-bit weights) or `<name>#delta.mask` (a bitmap, bit i of byte j for element 8j+i); each tensor goes whichever
  of the three ways is smallest.
- `#delta`: int64 [base version, sequence number, k, c_1..c_k]; c_i is `tensor_checksum` of the i-th tensor of
  the bucket *after* the update, so an engine holding anything other than the trainer's mirror (a bucket it
  missed, a restart, a delta against the wrong version) fails the bucket instead of drifting silently.
- the last bucket of a sync is a commit `#delta` = [base version, -1, number of buckets]: a lost last bucket
  is detected too.
An engine failing any check raises `DeltaError`; `weight_sync.sync_weights` then drops the mirror and syncs
again in full.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

HEADER = "#delta"
INDEX = "#delta.index"
MASK = "#delta.mask"
VALUE = "#delta.value"
COMMIT = -1
"""Sequence number of the commit record."""

Named = tuple[str, torch.Tensor]


class DeltaError(ValueError):
    """A delta bucket that does not apply to what the engine holds; the trainer must sync in full."""


def tensor_checksum(t: torch.Tensor) -> int:
    """Sum of the tensor's bytes read as int64 words, wrapping (plus its tail bytes): exact and independent of
    reduction order, so both sides of a sync agree bit for bit; it changes with any single element and can only
    miss changes that cancel exactly. About 5x faster than a copy of the tensor on CPU."""
    raw = t.detach().contiguous().view(-1).view(torch.uint8)  # [nbytes]
    head = raw.numel() // 8 * 8
    words = raw[:head] if raw.data_ptr() % 8 == 0 else raw[:head].clone()
    total = int(words.view(torch.int64).sum()) if head else 0
    tail = raw[head:]
    if tail.numel():
        total += int((tail.to(torch.int64) << (8 * torch.arange(tail.numel()))).sum())
    return (total + raw.numel()) & 0xFFFF_FFFF_FFFF_FFFF


def is_delta(named: Iterable[Named]) -> bool:
    """Whether an update's tensors are a delta bucket (it carries a `#delta` record)."""
    return any(name == HEADER for name, _ in named)


@dataclass
class DeltaStats:
    """One sync as the encoder saw it."""

    full_bytes: int = 0
    """What a full sync would have sent (every tensor whole, in the engine's dtype)."""
    sent_bytes: int = 0
    """What this sync sent (indices, values, whole tensors and records)."""
    changed: int = 0
    """Elements whose bits differ from the mirror (all of a tensor sent without a baseline)."""
    elements: int = 0
    sparse_tensors: int = 0
    """Tensors sent as indices and values."""


class DeltaEncoder:
    """The trainer's side: turns each sync's HF buckets into delta buckets against `mirror`.

    Without a baseline (the first sync, after `reset`) the buckets go out whole and untagged, exactly as a full
    sync, and become the mirror. `commit(version)` after the engines confirmed the sync makes the mirror theirs;
    a sync that fails in between must `reset` (the engines may hold part of it)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        """`dtype`: the engines' parameter dtype; tensors are cast to it before comparing (None: as they come)."""
        self.dtype = dtype
        self.mirror: dict[str, torch.Tensor] = {}
        self.version: int | None = None
        """The version the engines hold per the mirror; None: no baseline, the next sync is full."""
        self.stats = DeltaStats()

    def reset(self) -> None:
        """Forget the baseline: the next sync is full."""
        self.mirror.clear()
        self.version = None

    def commit(self, version: int) -> None:
        self.version = version

    def encode(self, buckets: Iterable[Iterable[Named]]) -> Iterator[list[Named]]:
        """Delta buckets (or whole ones without a baseline) and, with a baseline, the commit record last."""
        self.stats = DeltaStats()
        base, count = self.version, 0
        self.version = None  # until `commit`: a sync that stops half way leaves no baseline
        if base is None:
            self.mirror.clear()
        for bucket in buckets:
            out = [self._entry(name, tensor, base is not None) for name, tensor in bucket]
            named = [pair for entry in out for pair in entry]
            if base is not None:
                sums = [tensor_checksum(self.mirror[name]) for name, _ in bucket]
                named.append((HEADER, torch.tensor([base, count, len(sums), *_signed(sums)], dtype=torch.int64)))
            self.stats.sent_bytes += sum(t.numel() * t.element_size() for _, t in named)
            count += 1
            yield named
        if base is not None:
            self.stats.sent_bytes += 3 * 8
            yield [(HEADER, torch.tensor([base, COMMIT, count], dtype=torch.int64))]

    def _entry(self, name: str, tensor: torch.Tensor, against_mirror: bool) -> list[Named]:
        new = tensor.detach() if self.dtype is None else tensor.detach().to(self.dtype)
        old = self.mirror.get(name)
        self.stats.full_bytes += new.numel() * new.element_size()
        self.stats.elements += new.numel()
        if not against_mirror or old is None or old.shape != new.shape or old.dtype != new.dtype:
            self.mirror[name] = new.clone().contiguous()
            self.stats.changed += new.numel()
            return [(name, new)]
        flat_new, flat_old = new.contiguous().view(-1), old.view(-1)
        mask = _bits(flat_new) != _bits(flat_old)  # [n]
        k, n, size = int(torch.count_nonzero(mask)), new.numel(), new.element_size()
        self.stats.changed += k
        index_dtype = torch.int32 if n < 2**31 else torch.int64
        index_bytes = k * (torch.empty((), dtype=index_dtype).element_size() + size)
        mask_bytes = (n + 7) // 8 + k * size
        flat_old.copy_(flat_new)  # the mirror as the engine will hold it (a copy is cheaper than a scatter)
        if min(index_bytes, mask_bytes) >= n * size:
            return [(name, new)]
        changed = mask.nonzero().view(-1)  # [k] ascending
        values = flat_new[changed]  # [k]
        self.stats.sparse_tensors += 1
        if index_bytes <= mask_bytes:
            return [(name + INDEX, changed.to(index_dtype)), (name + VALUE, values)]
        return [(name + MASK, pack_bits(mask)), (name + VALUE, values)]


_GATHER = 0x0102040810204080
"""Times a word of eight 0/1 bytes, puts byte i's bit at bit 56 + i (no two partial products overlap, so no carry)."""
_SPREAD, _SELECT = 0x0101010101010101, -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as int64


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool [n] as uint8 [ceil(n / 8)]: element 8j + i is bit i of byte j (numpy's packbits, little bit order).
    Eight mask bytes are one little-endian int64 word; one multiply gathers their bits (wrapping, as torch's int64
    arithmetic does), so the work is three passes over n / 8 words."""
    padded = torch.zeros((mask.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask
    words = padded.view(torch.int64)  # [ceil(n / 8)]
    return words.mul(_GATHER).bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """`pack_bits`'s inverse: bool [n]. Each byte is copied into the eight bytes of a word and byte i keeps bit i."""
    words = packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT)  # [n / 8]: byte i is 0 or 2^i
    return words.view(torch.uint8).ne(0)[:n]


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """An integer view of the same bytes: -0.0 vs 0.0 and NaN payloads compare as the bits they are."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return flat.view(ints[flat.element_size()])


def _signed(values: list[int]) -> list[int]:
    """Unsigned 64-bit checksums as the int64 a tensor holds."""
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


class DeltaReceiver:
    """The engine's side: applies delta buckets to its parameters and checks each one (`module docstring`)."""

    def __init__(self) -> None:
        self.expected = 0
        """Sequence number of the next bucket of the sync under way."""

    def apply(self, named: list[Named], state: dict[str, torch.Tensor], version: int) -> list[str]:
        """Apply one delta bucket (or check a commit) to `state` (HF name -> the live tensor) of an engine at
        `version`; the names of the tensors written. Raises DeltaError, and the next sync must be full."""
        header = [int(v) for v in next(t for n, t in named if n == HEADER).tolist()]
        try:
            return self._apply(header, [(n, t) for n, t in named if n != HEADER], state, version)
        except DeltaError:
            self.expected = 0
            raise

    def _apply(self, header: list[int], named: list[Named], state: dict[str, torch.Tensor], version: int) -> list[str]:
        base, seq = header[0], header[1]
        if base != version:
            raise DeltaError(f"delta against weight version {base}, but this engine holds version {version}")
        if seq == COMMIT:
            if header[2] != self.expected:
                raise DeltaError(f"sync of {header[2]} delta buckets, this engine received {self.expected}")
            self.expected = 0
            return []
        self.expected = 0 if seq == 0 else self.expected
        if seq != self.expected:
            raise DeltaError(f"delta bucket {seq} arrived, bucket {self.expected} was next: a bucket was lost")
        writes = _writes(named, state)
        if len(writes) != header[2]:
            raise DeltaError(f"delta bucket {seq} carries {len(writes)} tensors, its record says {header[2]}")
        with torch.no_grad():
            for name, (whole, index, value) in writes.items():
                target = state[name]
                if whole is not None:
                    target.copy_(whole)
                elif index.dtype == torch.bool:  # from a bitmap
                    target.view(-1).masked_scatter_(index, value.to(target.dtype))
                else:
                    target.view(-1).index_copy_(0, index.to(torch.int64), value.to(target.dtype))
        for (name, _), want in zip(writes.items(), _signed_back(header[3:]), strict=True):
            if tensor_checksum(state[name]) != want:
                raise DeltaError(f"{name} differs from the trainer's copy after delta bucket {seq}")
        self.expected += 1
        return list(writes)


def _writes(
    named: list[Named], state: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """name -> (whole tensor, or places and values), in the order the bucket names them, checked against `state`;
    places are flat indices, or a bool mask unpacked from a bitmap."""
    out: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in named:
        for suffix, slot in ((INDEX, 1), (MASK, 3), (VALUE, 2), ("", 0)):
            if name.endswith(suffix):
                base = name[: len(name) - len(suffix)] if suffix else name
                out.setdefault(base, [None, None, None, None])[slot] = tensor
                break
    writes = {}
    for name, (whole, index, value, bitmap) in out.items():
        if name not in state:
            raise DeltaError(f"delta bucket names {name!r}, not a parameter of this model")
        n = state[name].numel()
        if whole is not None:
            if index is not None or value is not None or bitmap is not None:
                raise DeltaError(f"{name!r} is sent both whole and as a delta")
            want = tuple(state[name].shape)
            if tuple(whole.shape) != want:
                raise DeltaError(f"{name!r} has shape {tuple(whole.shape)}, the model expects {want}")
        elif bitmap is not None:
            if index is not None or bitmap.dtype != torch.uint8 or bitmap.numel() != (n + 7) // 8:
                raise DeltaError(f"{name!r}: a delta bitmap needs {(n + 7) // 8} uint8 bytes and no indices")
            index = unpack_bits(bitmap, n)  # bool [n]
        writes[name] = (whole, index, value)
        if whole is None:
            _check_places(name, index, value, n)
    return writes


def _check_places(name: str, index: torch.Tensor | None, value: torch.Tensor | None, n: int) -> None:
    if index is None or value is None or index.dim() != 1 or value.dim() != 1:
        raise DeltaError(f"{name!r}: a delta needs 1-D places and values")
    count = int(torch.count_nonzero(index)) if index.dtype == torch.bool else index.numel()
    if count != value.numel():
        raise DeltaError(f"{name!r}: {count} places for {value.numel()} values")
    if index.dtype != torch.bool and index.numel() and not 0 <= int(index.min()) <= int(index.max()) < n:
        raise DeltaError(f"{name!r}: delta indices outside its {n} elements")


def _signed_back(values: list[int]) -> list[int]:
    return [v & 0xFFFF_FFFF_FFFF_FFFF for v in values]
