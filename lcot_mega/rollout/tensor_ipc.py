"""SGLang's `/update_weights_from_tensor` payload on CPU: named tensors through shared memory, and safely back.

Wire format (SGLang's `MultiprocessingSerializer`, sglang/srt/utils/common.py): every entry of
`serialized_named_tensors` (one per tensor-parallel rank; rank r reads entry r) is base64 of a pickle made the way
`multiprocessing.reduction.ForkingPickler` pickles tensors (torch's reductions), so a tensor's bytes are not in the
pickle, only a handle to the shared memory that holds them:
- `load_format` null: a list of `(name, tensor)` pairs.
- `load_format` "flattened_bucket": `{"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata]}`
  (sglang/srt/weight_sync/tensor_bucket.py; fields name, shape, dtype, start_idx, end_idx, numel), tensor i being
  `flattened_tensor[start_idx:end_idx].view(dtype).reshape(shape)`. We send one flat tensor in the tensors' common
  dtype with element offsets: older SGLang readers (one dtype, `.to(dtype)`) and newer ones (uint8 with byte
  offsets, `.view(dtype)`) both read it. `loads_named_tensors` reads both layouts.

CPU tensors cross processes with torch's `file_system` strategy (a named POSIX shm segment; the handle is its name
plus the torch_shm_manager socket), not the default `file_descriptor` one: that sends a `DupFd` which the receiver
fetches over multiprocessing's resource sharer, authenticated with the sender's authkey, which only the sender's own
children hold; an unrelated server process gets AuthenticationError. Our pickler applies the strategy through its
own dispatch table; the process-wide sharing strategy is left alone.

Reference counts (torch's file_system protocol): each pickled entry takes a reference on its segment and the
receiver's rebuild gives it back, so the segment disappears when the sender drops its buffer after the answer. An
entry never unpickled (a request refused before loading) keeps its segment until the sender process exits, when
torch_shm_manager removes it.

Unpickling an HTTP body is code execution unless restricted: `loads_named_tensors` runs only the pickle opcodes this
format needs, resolves only torch's three rebuild functions (wrapped with argument checks), the tensor and storage
classes (as inert markers), torch.Size, dtypes and FlattenedTensorMetadata, and raises `PayloadError` (a ValueError)
for anything else.
"""

from __future__ import annotations

import base64
import binascii
import copyreg
import io
import math
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch.multiprocessing import reductions as _torch_red

FLATTENED_BUCKET = "flattened_bucket"
LOAD_FORMATS = (None, FLATTENED_BUCKET)
SGLANG_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
"""Module and name under which SGLang (and therefore the wire) knows the bucket metadata class."""
_ALIGN = 64  # byte alignment of each tensor in a plain-format buffer (views of any dtype need aligned offsets)
_MAX_SHARED_BYTES = 1 << 40  # a storage handle claiming more than 1 TiB is not a weight bucket
_SHM_NAME = re.compile(rb"/torch_\d+_\d+_\d+")  # torch's shm segment names (libshm): /torch_<pid>_<rand>_<n>

NamedTensors = list[tuple[str, torch.Tensor]]


class PayloadError(ValueError):
    """A `serialized_named_tensors` entry that is not a tensor payload of the expected format (answer 400)."""


@dataclass
class FlattenedTensorMetadata:
    """Where one tensor lies in a flattened bucket (SGLang's class of the same name and fields)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@dataclass
class SerializedTensors:
    """Entries for `serialized_named_tensors` and the shared buffer they point into.

    Keep this object alive until the server has answered: dropping `buffer` earlier may free the segment before the
    server maps it."""

    entries: list[str]
    load_format: str | None
    buffer: torch.UntypedStorage | None
    nbytes: int
    """Tensor bytes in the buffer (without alignment padding)."""


# ------------------------------------------------------------------------------------------------- sending


def dumps_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    ranks: int = 1,
    flatten: bool = True,
    reuse: torch.UntypedStorage | None = None,
) -> SerializedTensors:
    """Copy `named_tensors` into one shared-memory buffer and pickle handles to it, once per rank.

    Tensors that all lie in shared memory already (a staging buffer) are sent as they are: handles only, nothing
    copied, as one flattened bucket when they lie packed one after the other (`staging.flat_range`), else in the
    plain format; the caller must not change them before the server has answered.
    `flatten` sends SGLang's "flattened_bucket" when every tensor has the same dtype (else the plain list). Each rank
    gets its own pickle of the same buffer, since each pickle holds one reference that one rank gives back. `reuse`
    is the buffer of an earlier, answered payload: used again when large enough (a fresh segment costs a page fault
    per 4 KiB on first write, about 4x the copy itself); pass only one no reader can still be mapping."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    named = [(_check_name(n), _check_tensor(n, t)) for n, t in named_tensors]
    if not named:
        payload: Any = []
        load_format, buffer, nbytes = None, None, 0
    elif all(_in_shared_memory(t) for _, t in named):  # a staging buffer: handles to it, no copy
        from lcot_mega.weight_sync.staging import flat_range

        flat = flat_range([t for _, t in named]) if flatten else None
        payload = _metadata(named, flat) if flat is not None else named
        load_format, buffer = (FLATTENED_BUCKET if flat is not None else None), None
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
    elif flatten and len({t.dtype for _, t in named}) == 1:
        payload, buffer, nbytes = _flattened(named, reuse)
        load_format = FLATTENED_BUCKET
    else:
        payload, buffer, nbytes = _plain(named, reuse)
        load_format = None
    entries = [_dumps(payload) for _ in range(ranks)]
    return SerializedTensors(entries=entries, load_format=load_format, buffer=buffer, nbytes=nbytes)


def _in_shared_memory(t: torch.Tensor) -> bool:
    """A CPU tensor whose storage is already a named shared-memory segment (`weight_sync.staging`)."""
    return t.device.type == "cpu" and t.untyped_storage().is_shared()


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    return name


def _check_tensor(name: str, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_sparse or tensor.is_nested or tensor.is_quantized:
        raise ValueError(f"{name!r}: only dense tensors can be sent")
    return tensor.detach()


def _shared_storage(nbytes: int, reuse: torch.UntypedStorage | None) -> torch.UntypedStorage:
    """`reuse` if it holds `nbytes`, else a new CPU storage in a named shm segment (shared without a copy)."""
    if reuse is not None and reuse.is_shared() and reuse.device.type == "cpu" and reuse.nbytes() >= nbytes:
        return reuse
    return torch.UntypedStorage._new_using_filename_cpu(max(nbytes, 1))


def _view(storage: torch.UntypedStorage, dtype: torch.dtype, offset_bytes: int, shape: torch.Size) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(storage, offset_bytes // itemsize, shape)


def _flattened(
    named: NamedTensors, reuse: torch.UntypedStorage | None
) -> tuple[dict[str, Any], torch.UntypedStorage, int]:
    dtype = named[0][1].dtype
    total = sum(t.numel() for _, t in named)
    storage = _shared_storage(total * named[0][1].element_size(), reuse)
    flat = _view(storage, dtype, 0, torch.Size([total]))  # [total]
    start = 0
    for _, t in named:
        flat[start : start + t.numel()].view(t.shape).copy_(t)
        start += t.numel()
    return _metadata(named, flat), storage, total * flat.element_size()


def _metadata(named: NamedTensors, flat: torch.Tensor) -> dict[str, Any]:
    """The flattened-bucket payload of `named`, which lie one after the other in `flat` (their common dtype)."""
    metadata, start = [], 0
    for name, t in named:
        end = start + t.numel()
        metadata.append(FlattenedTensorMetadata(name, torch.Size(t.shape), flat.dtype, start, end, t.numel()))
        start = end
    return {"flattened_tensor": flat, "metadata": metadata}


def _plain(named: NamedTensors, reuse: torch.UntypedStorage | None) -> tuple[NamedTensors, torch.UntypedStorage, int]:
    offsets, size = [], 0
    for _, t in named:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    storage = _shared_storage(size, reuse)
    out = []
    for (name, t), offset in zip(named, offsets, strict=True):
        view = _view(storage, t.dtype, offset, t.shape)
        view.copy_(t)
        out.append((name, view))
    return out, storage, sum(t.numel() * t.element_size() for _, t in named)


def _reduce_storage_by_name(storage: torch.UntypedStorage) -> tuple[Any, tuple[Any, ...]]:
    """torch's `reduce_storage` under the file_system strategy, whatever the process-wide strategy is."""
    if storage.device.type != "cpu":
        raise pickle.PicklingError(f"only CPU storages go through shared memory here, got {storage.device}")
    manager, handle, size = storage._share_filename_cpu_()
    storage._shared_incref()  # given back by the receiver's rebuild_storage_filename
    _torch_red.shared_cache[handle] = _torch_red.StorageWeakRef(storage)  # same-process receivers reuse it
    return _torch_red.rebuild_storage_filename, (type(storage), manager, handle, size)


class _TensorPickler(pickle._Pickler):
    """ForkingPickler's tensor reductions with file_system storages; names the metadata class as SGLang does.

    The pure-Python pickler, because only it lets `save_global` write a global (SGLang's metadata class) that is not
    importable here; the pickle holds handles only, so its speed does not matter."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=4)
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table.update(
            {
                torch.Tensor: _torch_red.reduce_tensor,
                torch.nn.Parameter: _torch_red.reduce_tensor,
                torch.storage.TypedStorage: _torch_red.reduce_typed_storage,
                torch.UntypedStorage: _reduce_storage_by_name,
            }
        )

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is FlattenedTensorMetadata:
            self._write_global(*SGLANG_METADATA, obj)
        elif isinstance(obj, torch.dtype):  # always `torch.<name>`, never another module that re-exports it
            self._write_global("torch", str(obj).removeprefix("torch."), obj)
        else:
            super().save_global(obj, name)

    def _write_global(self, module: str, name: str, obj: Any) -> None:
        self.save(module)
        self.save(name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def _dumps(obj: Any) -> str:
    buf = io.BytesIO()
    _TensorPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------- receiving


class _ClassName:
    """A class named in a payload: passed to our rebuild wrappers, never called by the payload itself."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __repr__(self) -> str:
        return self.qualname


_TENSOR, _PARAMETER, _UNTYPED = _ClassName("torch.Tensor"), _ClassName("Parameter"), _ClassName("UntypedStorage")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or not all(_is_int(v) and v >= 0 for v in x):
        raise PayloadError(f"{what} must be a tuple of non-negative ints, got {x!r}")
    return tuple(x)


def _rebuild_storage(cls: Any, manager: Any, handle: Any, size: Any, *rest: Any) -> torch.UntypedStorage:
    if rest or cls is not _UNTYPED:
        raise PayloadError("rebuild_storage_filename: expected (UntypedStorage, manager, handle, size)")
    if not (isinstance(manager, bytes) and manager and isinstance(handle, bytes) and _SHM_NAME.fullmatch(handle)):
        raise PayloadError(f"rebuild_storage_filename: {handle!r} is not a torch shared-memory handle")
    if not _is_int(size) or not 0 <= size <= _MAX_SHARED_BYTES:
        raise PayloadError(f"rebuild_storage_filename: bad size {size!r}")
    try:
        return _torch_red.rebuild_storage_filename(torch.UntypedStorage, manager, handle, size)
    except RuntimeError as e:  # segment gone (sender exited, other host) or unreadable
        raise PayloadError(f"cannot map shared memory {handle.decode(errors='replace')}: {e}") from None


def _rebuild_typed_storage(storage: Any, dtype: Any) -> torch.TypedStorage:
    if not isinstance(storage, torch.UntypedStorage) or not isinstance(dtype, torch.dtype):
        raise PayloadError("rebuild_typed_storage: expected (UntypedStorage, dtype)")
    return _torch_red.rebuild_typed_storage(storage, dtype)


def _rebuild_tensor(cls: Any, storage: Any, metadata: Any) -> torch.Tensor:
    if cls not in (_TENSOR, _PARAMETER) or not isinstance(storage, torch.TypedStorage):
        raise PayloadError("rebuild_tensor: expected (Tensor, TypedStorage, metadata)")
    if not (isinstance(metadata, tuple) and len(metadata) == 4 and _is_int(metadata[0]) and metadata[0] >= 0):
        raise PayloadError(f"rebuild_tensor: bad metadata {metadata!r}")
    size, stride = _ints(metadata[1], "size"), _ints(metadata[2], "stride")
    if len(size) != len(stride):
        raise PayloadError(f"rebuild_tensor: size {size} and stride {stride} differ in length")
    try:  # set_ checks that offset, size and stride stay inside the storage
        return _torch_red.rebuild_tensor(torch.Tensor, storage, (metadata[0], torch.Size(size), stride, False))
    except RuntimeError as e:
        raise PayloadError(f"rebuild_tensor: {e}") from None


def _size(*args: Any) -> torch.Size:
    if len(args) != 1:
        raise PayloadError("torch.Size takes one tuple")
    return torch.Size(_ints(args[0], "torch.Size"))


_REDUCTIONS = "torch.multiprocessing.reductions"
_GLOBALS: dict[tuple[str, str], Any] = {
    (_REDUCTIONS, "rebuild_tensor"): _rebuild_tensor,
    (_REDUCTIONS, "rebuild_typed_storage"): _rebuild_typed_storage,
    (_REDUCTIONS, "rebuild_storage_filename"): _rebuild_storage,
    ("torch", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    ("torch", "UntypedStorage"): _UNTYPED,
    ("torch", "Size"): _size,
    SGLANG_METADATA: FlattenedTensorMetadata,
    **{("torch", n): getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)},
}
_CALLABLES = (_rebuild_tensor, _rebuild_typed_storage, _rebuild_storage, _size)
_METADATA_FIELDS = frozenset(f.name for f in fields(FlattenedTensorMetadata))
# Opcodes of protocols 2-4 for containers, scalars, strings, memo and globals; REDUCE, NEWOBJ and BUILD are
# replaced below by checked versions. Everything else (PERSID, EXT*, INST, OBJ, buffers, ...) is refused.
_OPCODES = (
    pickle.PROTO,
    pickle.FRAME,
    pickle.STOP,
    pickle.MARK,
    pickle.POP,
    pickle.POP_MARK,
    pickle.DUP,
    pickle.NONE,
    pickle.NEWTRUE,
    pickle.NEWFALSE,
    pickle.BININT,
    pickle.BININT1,
    pickle.BININT2,
    pickle.LONG1,
    pickle.BINFLOAT,
    pickle.SHORT_BINUNICODE,
    pickle.BINUNICODE,
    pickle.BINUNICODE8,
    pickle.SHORT_BINBYTES,
    pickle.BINBYTES,
    pickle.BINBYTES8,
    pickle.EMPTY_TUPLE,
    pickle.TUPLE,
    pickle.TUPLE1,
    pickle.TUPLE2,
    pickle.TUPLE3,
    pickle.EMPTY_LIST,
    pickle.APPEND,
    pickle.APPENDS,
    pickle.LIST,
    pickle.EMPTY_DICT,
    pickle.DICT,
    pickle.SETITEM,
    pickle.SETITEMS,
    pickle.BINGET,
    pickle.LONG_BINGET,
    pickle.BINPUT,
    pickle.LONG_BINPUT,
    pickle.MEMOIZE,
    pickle.GLOBAL,
    pickle.STACK_GLOBAL,
)


class _Opcodes(dict):
    def __missing__(self, op: int) -> Any:
        raise PayloadError(f"pickle opcode {bytes([op])!r} is not allowed in a tensor payload")


class _TensorUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with an opcode allowlist (the C one cannot restrict opcodes) and a global
    allowlist; payloads are a few hundred bytes per tensor, so its speed does not matter."""

    dispatch: ClassVar[dict[int, Any]]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise PayloadError(f"refused global {module}.{name}: not part of a tensor payload") from None

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in _CALLABLES) or not isinstance(args, tuple):
            raise PayloadError(f"refused call of {func!r}")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls is not FlattenedTensorMetadata or args != ():
            raise PayloadError(f"refused construction of {cls!r}")
        self.append(FlattenedTensorMetadata.__new__(FlattenedTensorMetadata))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, FlattenedTensorMetadata) or not isinstance(state, dict):
            raise PayloadError("refused object state outside FlattenedTensorMetadata")
        if set(state) != _METADATA_FIELDS:
            raise PayloadError(
                f"FlattenedTensorMetadata fields {sorted(map(str, state))}, expected {sorted(_METADATA_FIELDS)}"
            )
        inst.__dict__.update(state)


_TensorUnpickler.dispatch = _Opcodes({op[0]: pickle._Unpickler.dispatch[op[0]] for op in _OPCODES})
_TensorUnpickler.dispatch.update(
    {
        pickle.REDUCE[0]: _TensorUnpickler.load_reduce,
        pickle.NEWOBJ[0]: _TensorUnpickler.load_newobj,
        pickle.BUILD[0]: _TensorUnpickler.load_build,
    }
)


def _loads(entry: Any) -> Any:
    if not isinstance(entry, str):
        raise PayloadError(f"a serialized_named_tensors entry must be a base64 string, got {type(entry).__name__}")
    try:
        data = base64.b64decode(entry, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"serialized_named_tensors entry is not base64: {e}") from None
    try:
        return _TensorUnpickler(io.BytesIO(data)).load()
    except PayloadError:
        raise
    except Exception as e:  # truncated or malformed pickle, bad arguments to an allowed function
        raise PayloadError(f"serialized_named_tensors entry is not a tensor payload: {type(e).__name__}: {e}") from None


def loads_named_tensors(entry: Any, load_format: str | None = None) -> NamedTensors:
    """The (name, tensor) pairs of one `serialized_named_tensors` entry; PayloadError if it is anything else.

    The tensors map the sender's shared memory: copy them before the sender may drop its buffer (its answer)."""
    if load_format not in LOAD_FORMATS:
        raise PayloadError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
    obj = _loads(entry)
    return _unflatten(obj) if load_format == FLATTENED_BUCKET else _pairs(obj)


def _pairs(obj: Any) -> NamedTensors:
    if not isinstance(obj, list | tuple):
        raise PayloadError(f"load_format null expects a list of (name, tensor) pairs, got {type(obj).__name__}")
    out = []
    for item in obj:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise PayloadError("load_format null expects (name, tensor) pairs")
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise PayloadError(f"expected a (str, tensor) pair, got ({type(name).__name__}, {type(tensor).__name__})")
        out.append((name, tensor))
    return out


def _unflatten(obj: Any) -> NamedTensors:
    if not (isinstance(obj, dict) and set(obj) == {"flattened_tensor", "metadata"}):
        raise PayloadError('load_format "flattened_bucket" expects {"flattened_tensor": ..., "metadata": [...]}')
    flat, metadata = obj["flattened_tensor"], obj["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or not flat.is_contiguous():
        raise PayloadError("flattened_tensor must be a contiguous 1-D tensor")
    if not isinstance(metadata, list) or not all(isinstance(m, FlattenedTensorMetadata) for m in metadata):
        raise PayloadError("metadata must be a list of FlattenedTensorMetadata")
    return [(m.name, _piece(flat, m)) for m in metadata]


def _piece(flat: torch.Tensor, m: FlattenedTensorMetadata) -> torch.Tensor:
    """`flat[start:end]` as m.dtype and m.shape: same dtype with element offsets, or uint8 with byte offsets."""
    if not isinstance(m.name, str) or not isinstance(m.dtype, torch.dtype):
        raise PayloadError(f"bad metadata name/dtype: {m.name!r}, {m.dtype!r}")
    shape = _ints(m.shape, f"{m.name}: shape")
    start, end = m.start_idx, m.end_idx
    if not (_is_int(start) and _is_int(end) and 0 <= start <= end <= flat.numel()):
        raise PayloadError(f"{m.name}: [{start}, {end}) outside the flattened tensor of {flat.numel()} elements")
    if flat.dtype != m.dtype and flat.dtype != torch.uint8:
        raise PayloadError(f"{m.name}: a {flat.dtype} flattened tensor cannot hold {m.dtype} (send uint8 or one dtype)")
    try:
        piece = flat[start:end].view(m.dtype)
    except RuntimeError as e:  # byte range not a whole, aligned number of elements
        raise PayloadError(f"{m.name}: {e}") from None
    if piece.numel() != math.prod(shape):
        raise PayloadError(f"{m.name}: {piece.numel()} elements in [{start}, {end}) for shape {shape}")
    return piece.view(shape)
