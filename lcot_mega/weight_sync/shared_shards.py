"""Tensor-parallel shards read through shared memory: the rank that exports a stage's weights reads its TP peers'
parameters in place, instead of all-gathering them over gloo.

On CPU the TP ranks of a stage are processes of one host, and an all-gather moves every peer's shard through a
loopback socket into fresh buffers on every rank, though one rank alone needs them. Here each TP rank moves its
parameters' storages into shared memory once (`UntypedStorage._share_filename_cpu_`: the data moves in place, so
every view of it, DDP's parameter buffer and the optimizer's included, follows) and tells the group where they are;
each rank maps its peers' storages. From then on an export reads the peers' live weights with no copy and no message
but two barriers: before (every peer has finished its optimizer step) and after (no peer changes its weights while
they are read). torch.multiprocessing shares CPU tensors between processes the same way (its file_system strategy).

A storage replaced since it was shared (a checkpoint load that assigns `param.data`) is noticed at the next export
(`stale`), and the group shares again. Groups spread over several hosts, NCCL groups and platforms without
`torch_shm_manager` keep the all-gather (`shareable` says why not).
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

_Handle = tuple[int, tuple[bytes, bytes, int], int, tuple[int, ...], tuple[int, ...], torch.dtype]
"""(storage index, (manager handle, file name, size), storage offset, shape, stride, dtype) of one parameter."""


def _share(params: Sequence[torch.Tensor]) -> tuple[list[tuple[bytes, bytes, int]], list[_Handle]]:
    """Move the storages of `params` into shared memory (once each) and describe every parameter's place in them."""
    storages: dict[int, int] = {}
    handles: list[tuple[bytes, bytes, int]] = []
    out: list[_Handle] = []
    for p in params:
        st = p.untyped_storage()
        key = st.data_ptr()
        if key not in storages:
            manager, name, size = st._share_filename_cpu_()
            storages[st.data_ptr()] = len(handles)  # the data moved: key by the new address
            handles.append((manager, name, size))
            key = st.data_ptr()
        out.append((storages[key], p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.dtype))
    return handles, out


def _map(handles: list[tuple[bytes, bytes, int]], places: list[tuple]) -> list[torch.Tensor]:
    """A peer's parameters as tensors over its shared storages (live: they show its every later update)."""
    storages = [torch.UntypedStorage._new_shared_filename_cpu(m, n, size) for m, n, size in handles]
    tensors = []
    for index, offset, shape, stride, dtype in places:
        t = torch.empty(0, dtype=dtype).set_(storages[index], offset, shape, stride)  # offset in elements of dtype
        tensors.append(t)
    return tensors


def shareable(group: Any) -> str | None:
    """Why the TP ranks of `group` cannot read each other's shards in place; None when they can. Collective."""
    if dist.get_backend(group) != "gloo":
        return f"backend {dist.get_backend(group)} (shared memory holds CPU tensors)"
    hosts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) > 1:
        return f"the group spans hosts {sorted(set(hosts))}"
    return None


class SharedShards:
    """Every TP rank's parameters of one actor, as tensors this rank can read (its own and its peers', mapped).

    `build` makes one (collective); `tensors(i)` is then local: parameter i of every TP rank, in rank order."""

    def __init__(self, params: list[torch.Tensor], by_rank: list[list[torch.Tensor]], group: Any) -> None:
        self.params, self.by_rank, self.group = params, by_rank, group
        self._ptrs = [p.data_ptr() for p in params]

    @classmethod
    def build(cls, params: Sequence[torch.Tensor], group: Any) -> SharedShards | str:
        """Share this rank's parameters and map its peers'; or why the group cannot (every rank gets the same
        answer). Collective over `group`."""
        why = shareable(group)
        if why is not None:
            return why
        params = list(params)
        try:
            mine: Any = _share(params)
        except (RuntimeError, OSError) as e:  # no torch_shm_manager, /dev/shm full
            mine = f"{type(e).__name__}: {e}"
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        failed = [x for x in everyone if isinstance(x, str)]
        if failed:
            return f"sharing failed: {failed[0]}"
        me = dist.get_group_rank(group, dist.get_rank())
        by_rank = [params if r == me else _map(handles, places) for r, (handles, places) in enumerate(everyone)]
        return cls(params, by_rank, group)

    def tensors(self, index: int) -> list[torch.Tensor]:
        """Parameter `index` of every TP rank (views: read them between `begin` and `end`)."""
        return [rank[index] for rank in self.by_rank]

    def stale(self) -> bool:
        """Whether a parameter of any rank moved to other memory since it was shared. Collective."""
        moved = torch.tensor([float(any(p.data_ptr() != q for p, q in zip(self.params, self._ptrs, strict=True)))])
        dist.all_reduce(moved, op=dist.ReduceOp.MAX, group=self.group)
        return bool(moved.item())

    def begin(self) -> None:
        """Before reading: every rank of the group has finished changing its weights."""
        dist.barrier(group=self.group)

    def end(self) -> None:
        """After reading: the ranks may change their weights again."""
        dist.barrier(group=self.group)


class _Published:
    """What one process knows of the engine targets shared in its TP group (`peer_targets`)."""

    def __init__(self) -> None:
        self.generation = 0
        self.signature: tuple = ()
        """On the source: (name, address) of every target since they were last shared."""
        self.shared = False
        """On the source: whether that sharing worked."""
        self.views: dict[str, torch.Tensor] = {}
        """On a peer: the source's targets as last shared, mapped (kept while a sync has no targets)."""


_PUBLISHED: dict[int, _Published] = {}


def peer_targets(targets: dict[str, torch.Tensor] | None, group: Any, src: int) -> dict[str, torch.Tensor] | None:
    """An in-process engine's parameters (`targets`, on global rank `src`) as tensors every TP rank of `group` can
    write, so that each rank copies its own slices straight into them (shard to shard, every core at work); None
    on every rank when `src` has no targets or cannot share them. The storages move into shared memory in place
    once (the engine keeps using them) and are shared again only when an address changes (the engine's weights
    were released and reloaded); otherwise one small broadcast per sync. Collective over `group`."""
    state = _PUBLISHED.setdefault(src, _Published())
    message: Any = None
    if dist.get_rank() == src and targets is not None:
        message = (state.generation,) if state.shared else None
        if tuple((name, t.data_ptr()) for name, t in targets.items()) != state.signature:
            state.generation += 1
            try:
                handles, places = _share(list(targets.values()))
                message, state.shared = (state.generation, list(targets), handles, places), True
            except (RuntimeError, OSError):  # no torch_shm_manager, /dev/shm full: the source copies alone
                message, state.shared = None, False
            state.signature = tuple((name, t.data_ptr()) for name, t in targets.items())  # sharing moved them
    box = [message]
    dist.broadcast_object_list(box, src=src, group=group)
    message = box[0]
    if message is None:
        return None
    if dist.get_rank() == src:
        return targets
    if len(message) > 1:
        state.generation, names, handles, places = message
        state.views = dict(zip(names, _map(handles, places), strict=True))
    return state.views


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, SharedShards | str] = weakref.WeakKeyDictionary()


def shared_shards(chunks: Sequence[torch.nn.Module], params: Sequence[torch.Tensor], group: Any) -> SharedShards | None:
    """The `SharedShards` of an actor (`chunks`, whose parameters in export order are `params`), built on first use
    and again when a parameter moved; None where the group cannot share (the reason is kept: `why_not`).
    Collective over `group`."""
    key = chunks[0]
    shards = _CACHE.get(key)
    if isinstance(shards, str):
        return None
    if shards is None or len(shards.params) != len(params) or shards.stale():
        shards = SharedShards.build(params, group)
        _CACHE[key] = shards
    return shards if isinstance(shards, SharedShards) else None


def why_not(chunks: Sequence[torch.nn.Module]) -> str | None:
    """Why the actor of `chunks` all-gathers its shards instead of reading them in place (None: it reads them in
    place, or has not exported yet)."""
    shards = _CACHE.get(chunks[0])
    return shards if isinstance(shards, str) else None
