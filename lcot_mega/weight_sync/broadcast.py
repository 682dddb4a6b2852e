"""Disaggregated weight sync: the trainer broadcasts HF tensors to remote rollout servers over a process group.

SGLang's protocol: the trainer (rank 0) hosts a TCP store and asks each server to join a new group
(`POST /init_weights_update_group`, server i at rank i); per bucket it posts `/update_weights_from_distributed`
(names, dtypes, shapes) to every server in background threads, since each answer only comes once the tensors
have arrived, then broadcasts every tensor from rank 0 in the same order and joins the requests. A bucket whose
tensors share one dtype goes as one broadcast of their concatenation instead (`load_format: "flattened_bucket"`,
SGLang's `_update_bucketed_weights_from_distributed`): one collective per bucket rather than per tensor, and from a
staging buffer (`weight_sync.staging`) the bucket's range itself is sent, without a copy.

The group is built directly from a `TCPStore` + `PrefixStore` and `ProcessGroupGloo` (CPU) or `ProcessGroupNCCL`
(GPU), without `init_process_group`: it does not touch the default group, so it works in a training job, in a
server, and for several groups in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lcot_mega.rollout.tensor_ipc import FLATTENED_BUCKET
from lcot_mega.weight_sync.push import WeightSyncError
from lcot_mega.weight_sync.staging import flat_range

Bucket = Sequence[tuple[str, torch.Tensor]]
DEFAULT_TIMEOUT_S = 300.0
FAILED_BROADCAST_GRACE_S = 10.0
"""How long the servers' update requests are awaited once a broadcast failed on the trainer's side (a member
died): the others wait in a receive that will not complete until the group's timeout, so waiting for them
would only delay the error by `timeout_s`."""
_ALIGN = 64  # bytes: each received tensor starts aligned in the receive buffer, whatever its dtype


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's wire name for a dtype ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any) -> torch.dtype:
    """A torch dtype from its wire name ("bfloat16" or "torch.bfloat16"); ValueError otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a string, got {name!r}")
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class WeightGroup:
    """One member of a weight-update process group (rank 0 is the trainer, the source of every broadcast)."""

    def __init__(
        self,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        store: Any = None,
    ) -> None:
        """`store`: rank 0's already listening `TCPStore` (see `listening_store`); None creates it here."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.rank, self.world_size, self.group_name, self.backend = rank, world_size, group_name, backend
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = (
            store
            if store is not None
            else dist.TCPStore(
                master_address,
                int(master_port),
                world_size,
                is_master=rank == 0,
                timeout=timeout,
                wait_for_workers=False,
            )
        )
        store = dist.PrefixStore(f"lcot_weights/{group_name}", self._store)
        if backend == "gloo":
            self.device = torch.device("cpu")
            self._pg: Any = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        self._buffer: torch.Tensor | None = None  # `receive`'s, reused

    def broadcast(self, tensor: torch.Tensor) -> None:
        """In place, from rank 0 (blocks until done on this rank)."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._pg.broadcast([tensor], opts).wait()

    def receive(
        self, dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]], *, flat: bool = False
    ) -> list[torch.Tensor]:
        """Tensors filled by rank 0's broadcasts, in order, one broadcast per tensor; `flat` (one dtype): a single
        broadcast of their concatenation (SGLang's "flattened_bucket"). They are views of one receive buffer that
        the next `receive` overwrites, so load them before receiving again: reused because fresh memory costs a
        page fault per 4 KiB on first touch (on CPU about 3x the copy itself); it grows to the largest bucket."""
        if flat and len(set(dtypes)) > 1:
            raise ValueError(f"a flattened bucket holds one dtype, got {sorted(map(str, set(dtypes)))}")
        sizes = [torch.Size(shape).numel() * dtype.itemsize for dtype, shape in zip(dtypes, shapes, strict=True)]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + (size if flat else -(-size // _ALIGN) * _ALIGN))
        if self._buffer is None or self._buffer.numel() < offsets[-1]:
            self._buffer = None  # freed before its replacement exists
            self._buffer = torch.empty(offsets[-1], dtype=torch.uint8, device=self.device)
        out = [
            self._buffer[offset : offset + size].view(dtype).view(tuple(shape))
            for dtype, shape, size, offset in zip(dtypes, shapes, sizes, offsets, strict=False)
        ]
        if flat and out:
            self.broadcast(self._buffer[: offsets[-1]].view(dtypes[0]))
        else:
            for t in out:
                self.broadcast(t)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def close(self) -> None:
        self._buffer = None
        pg, self._pg = self._pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            with contextlib.suppress(Exception):  # best effort: the group is being dropped anyway
                pg.shutdown()
        self._store = None


def listening_store(master_address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Rank 0's rendezvous store on a port the OS picks, listening at once: a port chosen first and bound later can
    be taken in between by another process on a busy machine (EADDRINUSE, seen with Ray and study runs)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(master_address, 0, is_master=True, timeout=timeout, wait_for_workers=False)


class BroadcastSync:
    """The trainer's side: rank 0 of a group with one rank per server (`SGLangHTTPEngine`s, ranks 1..N)."""

    def __init__(
        self,
        engines: Sequence[Any],
        master_address: str,
        master_port: int,
        *,
        group_name: str = "lcot_weights",
        backend: str = "gloo",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        flatten: bool | None = None,
    ) -> None:
        """`master_port` 0: listen on a port the OS picks before inviting the servers (`listening_store`).
        `flatten`: a bucket of one dtype goes as one broadcast (load format "flattened_bucket", which our server
        and recent SGLang read; an SGLang without it needs False); None: where every engine sends flattened buckets
        (`SGLangHTTPEngine.flattened_bucket`)."""
        if not engines:
            raise ValueError("BroadcastSync needs at least one server")
        self.engines, self.group_name, self.backend = list(engines), group_name, backend
        if flatten is None:
            flatten = all(getattr(e, "flattened_bucket", False) for e in self.engines)
        self.flatten, self._send_buffer = flatten, None
        world = len(self.engines) + 1
        store = listening_store(master_address, timeout_s) if master_port == 0 else None
        master_port = store.port if store is not None else master_port

        def join(i: int, engine: Any) -> Callable[[], None]:
            return lambda: engine.init_weights_update_group(
                master_address, master_port, i + 1, world, group_name, backend
            )

        threads = _start([join(i, e) for i, e in enumerate(self.engines)])
        try:
            self.group = WeightGroup(master_address, master_port, 0, world, group_name, backend, timeout_s, store)
        except Exception as e:
            _join(threads, timeout_s)
            raise WeightSyncError(f"could not create weight group {group_name!r}: {e}") from e
        errors = _join(threads, timeout_s)
        if errors:
            self.group.close()
            raise WeightSyncError(f"servers failed to join weight group {group_name!r}: {'; '.join(errors)}")
        self.timeout_s = timeout_s

    def _round(self, bucket: Bucket, version: int | None) -> None:
        names = [n for n, _ in bucket]
        dtypes = [dtype_name(t.dtype) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        flat = self._flat([t.detach() for _, t in bucket]) if self.flatten and len(set(dtypes)) == 1 else None
        load_format = FLATTENED_BUCKET if flat is not None else None

        def post(engine: Any) -> Callable[[], None]:
            return lambda: engine.update_weights_from_distributed(
                names, dtypes, shapes, self.group_name, version, load_format=load_format
            )

        threads = _start([post(e) for e in self.engines])
        failure = None
        try:
            for t in [flat] if flat is not None else [t for _, t in bucket]:
                self.group.broadcast(t.detach().to(self.group.device).contiguous())
        except Exception as e:
            failure = f"broadcast: {type(e).__name__}: {e}"
        errors = _join(threads, min(self.timeout_s, FAILED_BROADCAST_GRACE_S) if failure else self.timeout_s)
        if failure:
            errors.insert(0, failure)
        if errors:
            raise WeightSyncError(f"weight broadcast failed: {'; '.join(errors)}")

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The concatenation of `tensors` (one dtype): the staged range itself where they lie packed in one
        storage (`staging.flat_range`), else a copy into a send buffer kept for the next bucket."""
        flat = flat_range(tensors)
        if flat is not None and flat.device == self.group.device:
            return flat
        total = sum(t.numel() for t in tensors)
        nbytes = total * tensors[0].element_size()
        if self._send_buffer is None or self._send_buffer.numel() < nbytes:
            self._send_buffer = None
            self._send_buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.group.device)
        flat = self._send_buffer[:nbytes].view(tensors[0].dtype)
        start = 0
        for t in tensors:
            flat[start : start + t.numel()].view(t.shape).copy_(t)
            start += t.numel()
        return flat

    def push(self, named_tensor_buckets: Iterable[Bucket], version: int) -> tuple[int, int]:
        """Every bucket to every server under its current version, then the bump to `version`; (bytes, buckets).
        Raises WeightSyncError on any failure (servers stay on their old version: sync again)."""
        nbytes = buckets = 0
        for bucket in named_tensor_buckets:
            bucket = list(bucket)
            self._round(bucket, None)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            buckets += 1
        self._round([], version)  # an empty update: only the version moves, once all tensors are in
        return nbytes, buckets

    def close(self, keep: Collection[str] | None = None) -> None:
        """Ask every server (or only those whose `base_url` is in `keep`: the others are dead or being replaced) to
        leave the group, then drop the trainer's side."""
        leaving = [e for e in self.engines if keep is None or getattr(e, "base_url", None) in keep]
        errors = _join(_start([lambda e=e: e.destroy_weights_update_group(self.group_name) for e in leaving]), 60)
        self.group.close()
        self._send_buffer = None
        if errors:
            raise WeightSyncError(f"destroy_weights_update_group failed: {'; '.join(errors)}")


def _start(fns: Sequence[Callable[[], None]]) -> list[tuple[threading.Thread, list[str]]]:
    out = []
    for fn in fns:
        errs: list[str] = []

        def run(fn: Callable[[], None] = fn, errs: list[str] = errs) -> None:
            try:
                fn()
            except Exception as e:  # reported by the caller
                errs.append(f"{type(e).__name__}: {e}")

        t = threading.Thread(target=run, daemon=True)
        t.start()
        out.append((t, errs))
    return out


def _join(threads: list[tuple[threading.Thread, list[str]]], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    errors = []
    for t, errs in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            errors.append(f"no answer in {timeout_s}s")
        errors.extend(errs)
    return errors
