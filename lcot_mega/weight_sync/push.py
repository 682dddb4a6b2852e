"""Live weight sync, in-process transport: the actor's Megatron shards into every rollout engine, bucket by bucket.

`sync_weights` streams `hf_export.gather_hf_state` (TP shards read in place through shared memory on one host,
`shared_shards`, else all-gathered; pipeline stages collected point to point) to the owner rank, which pushes
each HF bucket into every engine as it arrives, so at most one bucket is held. Buckets go out under the engine's
old version and a final empty update bumps it to the new one: a sync that fails half way leaves engines on their
old version (the caller must sync again). `ProbeCheck` then scores one fixed sequence teacher-forced on both sides
and stops training if they disagree. With `weight_dtype="fp8"` the linear weights are block-quantized on the owner
rank on their way out (`engine_buckets`, docs/FP8.md).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from lcot_mega.bridge.arch import ArchSpec
from lcot_mega.bridge.hf_export import DEFAULT_BUCKET_BYTES, Bucket, gather_hf_state
from lcot_mega.rollout.protocol import RolloutEngine
from lcot_mega.weight_sync.delta import DeltaEncoder, DeltaStats
from lcot_mega.weight_sync.fp8 import DEFAULT_BLOCK, fp8_named_tensors
from lcot_mega.weight_sync.staging import Stager

WEIGHT_DTYPES = ("auto", "fp8")


class WeightSyncError(RuntimeError):
    """The engines did not receive the actor's weights (a failed push, or a probe mismatch); stop training."""


@dataclass(frozen=True)
class ProbeCheck:
    """Verify a sync: the engines' teacher-forced log-probs of `probe_ids[1:]` after `probe_ids[0]` must match
    the actor's (temperature 1) within `tolerance` (max absolute difference)."""

    probe_ids: tuple[int, ...]
    """A fixed token sequence of at least 2 ids, valid for the model's vocabulary."""
    tolerance: float = 0.05
    """fp32 engines agree to ~1e-5; bf16 engines differ by up to a few 1e-2 on a short probe."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "probe_ids", tuple(int(t) for t in self.probe_ids))
        if len(self.probe_ids) < 2:
            raise ValueError(f"probe_ids needs at least 2 tokens, got {len(self.probe_ids)}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")


def fixed_probe_ids(vocab_size: int, n: int = 16) -> tuple[int, ...]:
    """`n` token ids spread over the vocabulary by a fixed prime stride: the same probe for every run of a model."""
    return tuple((7919 * i + 13) % vocab_size for i in range(n))


@dataclass(frozen=True)
class SyncReport:
    """One sync as measured on the owner rank (every rank returns the same report)."""

    seconds: float
    """Wall time from the first collective to the engines holding the new version (verification excluded)."""
    bytes: int
    """Tensor bytes pushed into each engine."""
    buckets: int
    probe_max_diff: float | None = None
    """Max |engine - actor| probe log-prob over the engines; None without `verify`."""
    delta: DeltaStats | None = None
    """With a `DeltaEncoder`: what the sync sent against what a full one would have."""
    delta_fallback: bool = False
    """A delta sync failed (an engine's check, a lost bucket) and the weights were sent again in full."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        out = {"sync/seconds": self.seconds, "sync/gb_per_s": self.gb_per_s, "sync/gb": self.bytes / 1e9}
        if self.probe_max_diff is not None:
            out["sync/probe_max_diff"] = self.probe_max_diff
        if self.delta is not None:
            d = self.delta
            out["sync/delta_sent_frac"] = d.sent_bytes / d.full_bytes if d.full_bytes else 0.0
            out["sync/delta_changed_frac"] = d.changed / d.elements if d.elements else 0.0
            out["sync/delta_fallbacks"] = float(self.delta_fallback)
        return out


def _push(stream: Iterable[Bucket], engines: Sequence[RolloutEngine], version: int) -> tuple[int, int]:
    """Every bucket into every engine under its old version, then the version bump; (bytes, buckets)."""
    old = [engine.weight_version for engine in engines]
    nbytes = buckets = 0
    for bucket in stream:
        for engine, v in zip(engines, old, strict=True):
            engine.update_weights(bucket, v)
        nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        buckets += 1
    for engine in engines:
        engine.update_weights((), version)  # an empty update: only the version moves, once all tensors are in
        engine.flush_cache()
    return nbytes, buckets


def engine_buckets(
    buckets: Iterable[Bucket],
    weight_dtype: str = "auto",
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype | None = None,
) -> Iterable[Bucket]:
    """The HF buckets as the engines load them (`rollout.weight_dtype`): "auto" returns `buckets` itself, or with
    `dtype` (the engines' dtype, model.dtype) its floating tensors cast to it on the way, so that a bf16 engine
    is sent half the bytes of the actor's fp32 weights; "fp8" block-quantizes each bucket's linear weights
    (`fp8_named_tensors`). Quantizing bucket by bucket keeps the byte bound: 1 byte per weight plus one float32
    per block is less than the bf16/fp32 tensor it replaces."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype == "fp8":
        return (list(fp8_named_tensors(bucket, block=block)) for bucket in buckets)
    if dtype is None:
        return buckets
    return ([(n, t.to(dtype) if t.is_floating_point() else t) for n, t in bucket] for bucket in buckets)


class WeightTransport(Protocol):
    """How buckets reach engines that do not live in the owner's process (e.g. `broadcast.BroadcastSync`)."""

    def push(self, named_tensor_buckets: Iterable[Bucket], version: int) -> tuple[int, int]:
        """Every bucket to every engine, then the version bump; returns (bytes, buckets)."""
        ...


_STAGERS: weakref.WeakKeyDictionary[torch.nn.Module, Stager] = weakref.WeakKeyDictionary()
"""Each actor's staging buffer (keyed by its first chunk) for syncs to engines in other processes."""


def _broadcast(obj: object, src: int) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_weights(
    chunks: list[torch.nn.Module],
    arch: ArchSpec,
    engines: Sequence[RolloutEngine],
    version: int,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    owner: int = 0,
    verify: ProbeCheck | None = None,
    transport: WeightTransport | None = None,
    weight_dtype: str = "auto",
    shared: bool = True,
    delta: DeltaEncoder | None = None,
    engine_dtype: torch.dtype | None = None,
) -> SyncReport:
    """Load the actor's current weights into `engines` as `version`, then flush their caches.

    Collective: every rank calls it with the same arguments; only global rank `owner` touches `engines` (other
    ranks may pass an empty list). Without `transport` the owner loads the buckets into `engines` in process
    (`update_weights`); with one (servers in other processes: `BroadcastSync`) the transport moves them and
    `engines` are only used by `verify`. If pushing fails on the owner, every rank raises WeightSyncError; so does a
    `verify` probe that disagrees by more than its tolerance. `weight_dtype` "fp8" sends block-FP8 linear weights
    (`engine_buckets`) to engines serving an FP8 checkpoint. `shared`: the owner reads its TP peers' shards in
    place through shared memory where their group allows it (`shared_shards`), instead of all-gathering them. An
    in-process engine with `parameter_views` (the embedded one) gets each weight assembled straight into its
    parameter: one copy per byte, no intermediate full tensor. `engine_dtype`: the engines' dtype; weights travel
    in it (`engine_buckets`). `delta` (owner rank; `rollout.sync: delta`) sends
    only the elements that changed since the engines' last version (`weight_sync.delta`); if that sync fails
    (an engine's checksum, a lost bucket, a push error), it is dropped and the weights are sent again in full.
    """
    had_baseline = delta is not None and delta.version is not None  # the owner's encoder decides
    args = (chunks, arch, engines, version, bucket_bytes, owner, transport, weight_dtype, shared, delta, engine_dtype)
    outcome, seconds = _gather_and_push(*args)
    fallback = isinstance(outcome, str) and delta is not None and bool(_broadcast(had_baseline, owner))
    if fallback:  # the engines may hold part of the delta: full weights under the same version
        delta.reset()  # type: ignore[union-attr]
        outcome, more = _gather_and_push(*args)
        seconds += more
    if isinstance(outcome, str):
        if delta is not None:
            delta.reset()
        raise WeightSyncError(f"weight sync to version {version} failed on rank {owner}: {outcome}")
    if delta is not None:
        delta.commit(version)
    diff = None if verify is None else verify_weights(chunks, arch, engines, verify, owner=owner)
    stats = delta.stats if delta is not None else None
    return SyncReport(seconds, outcome[0], outcome[1], diff, stats, fallback)


def _gather_and_push(*args: Any) -> tuple[tuple[int, int] | str, float]:
    """One pass of `sync_weights` on every rank (`args`: `_gather_and_push_unpaused`'s): ((bytes, buckets) or the
    owner's error, seconds), the same on every rank."""
    from lcot_mega.actor import cpu_compat

    with cpu_compat.paused():  # CPU: the copies need no device rewriting, and the mode costs ~30% of a sync
        return _gather_and_push_unpaused(*args)


def _gather_and_push_unpaused(
    chunks: list[torch.nn.Module],
    arch: ArchSpec,
    engines: Sequence[RolloutEngine],
    version: int,
    bucket_bytes: int,
    owner: int,
    transport: WeightTransport | None,
    weight_dtype: str,
    shared: bool,
    delta: DeltaEncoder | None,
    engine_dtype: torch.dtype | None,
) -> tuple[tuple[int, int] | str, float]:
    start = time.perf_counter()
    into, stager = None, None
    if dist.get_rank() == owner and weight_dtype == "auto":
        views = getattr(engines[0], "parameter_views", None) if engines and transport is None else None
        if views is not None and delta is None:  # an engine in this process: write straight into it
            into = views()
        elif dist.get_backend() == "gloo":  # engines elsewhere, bytes through host memory: a staging buffer
            stager = _STAGERS.setdefault(chunks[0], Stager())
            into = stager.targets()
    in_process = bool(_broadcast(into is not None and stager is None, owner))  # read once the stream has ended
    stream = gather_hf_state(
        chunks, arch, bucket_bytes, dst=owner, shared=shared, into=into, read_as_yielded=not in_process
    )
    outcome: tuple[int, int] | str = (0, 0)
    ahead = None
    if dist.get_rank() == owner:
        try:
            # engines elsewhere: bucket n+1 is gathered in a thread while bucket n is on its way
            ahead = _Ahead(stream) if stager is not None else None
            out = engine_buckets(ahead or stream, weight_dtype, dtype=engine_dtype)
            out = stager.watch(out) if stager is not None else out
            out = delta.encode(out) if delta is not None else out
            outcome = transport.push(out, version) if transport else _push(out, engines, version)
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        finally:
            if ahead is not None:
                ahead.close()
    for _ in stream:  # the rest of the collectives (all of them on ranks other than the owner)
        pass
    seconds = time.perf_counter() - start
    return _broadcast((outcome, seconds), owner)  # every rank raises, or none does


class _Ahead:
    """`items` iterated one item ahead in a thread: the next bucket is gathered (copies, which release the GIL, and
    the TP group's barriers) while the caller sends the current one (a request or a broadcast that waits on
    sockets). `close` waits for the item in flight; the caller may then go on iterating `items` itself."""

    _END = object()

    def __init__(self, items: Iterable[Bucket]) -> None:
        self._items = iter(items)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weight-sync-ahead")
        self._next: Future | None = self._pool.submit(next, self._items, self._END)

    def __iter__(self) -> _Ahead:
        return self

    def __next__(self) -> Bucket:
        if self._next is None:
            raise StopIteration
        item = self._next.result()  # the gather's exception, if it raised
        if item is self._END:
            self._next = None
            raise StopIteration
        self._next = self._pool.submit(next, self._items, self._END)
        return item

    def close(self) -> None:
        pending, self._next = self._next, None
        if pending is not None:
            wait([pending])
        self._pool.shutdown(wait=True)


def verify_weights(
    chunks: list[torch.nn.Module],
    arch: ArchSpec,
    engines: Sequence[RolloutEngine],
    check: ProbeCheck,
    *,
    owner: int = 0,
) -> float:
    """Max |engine - actor| teacher-forced log-prob of the probe over `engines`; WeightSyncError on every rank
    above `check.tolerance`, or when an engine cannot score it. Collective, like `sync_weights` (the actor's forward
    runs on every rank); the engines score the probe meanwhile, in threads on the owner: each side is a forward
    pass that reads every weight once, so running them side by side takes the longer of the two, not the sum."""
    from lcot_mega.actor import cpu_compat
    from lcot_mega.actor.logprobs import compute_logprobs

    prompt, response = check.probe_ids[:1], check.probe_ids[1:]
    owns = dist.get_rank() == owner
    with ThreadPoolExecutor(max(len(engines), 1), thread_name_prefix="probe-score") as pool:
        scores = [pool.submit(engine.score, prompt, response) for engine in engines] if owns else []
        with cpu_compat.active():  # a sync may run in a worker thread
            out = compute_logprobs(chunks, [(prompt, response)], 1.0, arch.vocab_size, len(check.probe_ids))
        diff, error = 0.0, None
        try:
            for score in scores:
                diff = max(diff, float((score.result() - out.logprobs[0]).abs().max()))
        except Exception as e:
            error = f"an engine could not score the probe: {type(e).__name__}: {e}"
    diff, error = _broadcast((diff, error), owner)  # type: ignore[misc]
    if error:
        raise WeightSyncError(f"weight sync check failed on rank {owner}: {error}")
    if diff > check.tolerance:
        raise WeightSyncError(
            f"engine and actor disagree on the probe sequence after the sync: max |log-prob diff| {diff:.3g}"
            f" > tolerance {check.tolerance:g}; the engine weights are stale or corrupted"
        )
    return diff
