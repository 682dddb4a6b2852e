"""Export a sharded Megatron-core model as full Hugging Face tensors: live weight sync and HF directories.

The inverse of `hf_load`, through the same name/layout map (`mapping`), streamed at every level so no
rank ever materializes the whole model:

- `iter_hf_tensors`: this rank's pipeline stage as (HF name, full tensor). Each parameter is all-gathered
  over the tensor-parallel group, so every TP rank of the stage gets the same tensors in the same order.
- `iter_hf_buckets`: the same, grouped into buckets of at most `bucket_bytes`.
- `gather_hf_state`: the buckets of every pipeline stage, in model order, on one rank: one rank per stage
  sends them point to point (a header object, then one tensor per entry).
- `save_hf_checkpoint`: those buckets written by global rank 0 as a safetensors HF directory, shard by
  shard, into a temporary sibling that is renamed into place at the end.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lcot_mega.bridge.arch import ArchSpec, arch_from_hf_config
from lcot_mega.bridge.hf_load import named_params_with_layers
from lcot_mega.bridge.mapping import REPLICATED, concat_tp, concat_tp_into, hf_tensor_names, rule_for, split

Named = tuple[str, torch.Tensor]
Bucket = list[Named]

DEFAULT_BUCKET_BYTES = 512 << 20
DEFAULT_SHARD_BYTES = 5 << 30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class HFExportError(RuntimeError):
    """An export that cannot be written (or that rank 0 failed to write); the message says why."""


# ---------------------------------------------------------------------------------------------- tensors


def _tp_group() -> Any:
    from lcot_mega.actor import megatron_adapter as ma  # the one reader of Megatron's parallel state

    return ma.tensor_parallel_group()


def _gather_tp(param: torch.Tensor, layout: str, group: Any) -> list[torch.Tensor]:
    """Every TP rank's local tensor of `param` (just this rank's when the parameter is replicated)."""
    local = param.detach()
    size = dist.get_world_size(group)
    if size == 1 or layout == REPLICATED:
        return [local]
    local = local.contiguous()
    per_rank = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(per_rank, local, group=group)
    return per_rank


def _chunk_params(chunk: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, int | None]]:
    from megatron.core.utils import unwrap_model

    return list(named_params_with_layers(unwrap_model(chunk)))


@dataclass(frozen=True)
class _Experts:
    """Where the other experts of this rank's MoE layers are: its expert-parallel group (size > 1) and the group
    that splits each expert over tensor-parallel ranks."""

    group: Any
    size: int
    rank: int
    tp_group: Any


def _expert_groups() -> _Experts:
    """This rank's expert-parallel group (maybe of one: every expert here) and expert tensor-parallel group."""
    from lcot_mega.actor import megatron_adapter as ma

    group = ma.expert_parallel_group()
    return _Experts(group, dist.get_world_size(group), dist.get_rank(group), ma.expert_tensor_parallel_group())


_GLOBAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)\.")


def _every_rank_expert(
    name: str, param: torch.Tensor, experts: _Experts, num_experts: int
) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the expert at `param`'s local position on every expert-parallel rank, in rank order: rank r
    holds experts [r*n, (r+1)*n) (megatron-core's `local_expert_indices`), so a name's global index moves by n."""
    local = param.detach().contiguous()
    if experts.size == 1:
        return [(name, local)]
    per_rank = [torch.empty_like(local) for _ in range(experts.size)]
    dist.all_gather(per_rank, local, group=experts.group)
    match = _GLOBAL_EXPERT.search(name)
    assert match is not None, name
    index = int(match.group(2))
    n = num_experts // experts.size
    position = index - experts.rank * n
    out = []
    for r, t in enumerate(per_rank):
        renamed = f"{name[: match.start(2)]}{r * n + position}{name[match.end(2) :]}"
        out.append((renamed, t))
    return out


Targets = Mapping[str, torch.Tensor]
"""HF name -> the tensor to write that weight into (an in-process engine's parameter)."""


@torch.no_grad()
def _chunk_hf_tensors(
    chunk: torch.nn.Module,
    arch: ArchSpec,
    group: Any,
    per_rank_of: Callable[[int], list[torch.Tensor]] | None = None,
    into: Targets | None = None,
    only: int | None = None,
) -> Iterator[Named]:
    """(HF name, full tensor) of one chunk; each TP-split parameter all-gathered over `group`, or, with
    `per_rank_of` (parameter index -> every TP rank's tensor, `weight_sync.shared_shards`), read in place. With
    `into`, a full tensor is assembled straight in its target, which is what is yielded. `only` (with `into` and
    `per_rank_of`): this rank writes TP rank `only`'s slices alone (its own: `shared_shards.peer_targets` gave
    every TP rank the targets), and a tensor that does not fit its target is assembled by TP rank 0 alone."""
    experts = _expert_groups() if arch.num_experts else None
    for index, (name, param, layer) in enumerate(_chunk_params(chunk)):
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # the last PP stage's copy of the embedding; stage 0 emits model.embed_tokens.weight
        if experts is not None and _GLOBAL_EXPERT.search(name):  # this expert of every expert-parallel rank
            for expert_name, t in _every_rank_expert(name, param, experts, arch.num_experts):
                rule = rule_for(expert_name, layer, arch)
                yield from _assembled(rule, _gather_tp(t, rule.layout, experts.tp_group), arch, into)
            continue
        rule = rule_for(name, layer, arch)
        if per_rank_of is not None and rule.layout != REPLICATED:
            tensors = per_rank_of(index)
        else:
            tensors = _gather_tp(param, rule.layout, group)
        mine = tensors
        if only is not None and rule.layout != REPLICATED:  # split the others' shards for their shapes only
            mine = [t if r == only else t.to("meta") for r, t in enumerate(tensors)]
        per_rank = [split(rule, t, arch) for t in mine]
        for j, hf_name in enumerate(rule.hf_names):
            pieces = [p[j] for p in per_rank]
            target = into.get(hf_name) if into is not None else None
            if target is not None and concat_tp_into(rule, pieces, target, only=only):
                yield hf_name, target
            elif only in (None, 0):  # TP rank 0 assembles what does not fit, from the real shards
                pieces = pieces if mine is tensors else [split(rule, t, arch)[j] for t in tensors]
                yield hf_name, concat_tp(rule, pieces, hf_rows=arch.vocab_size).contiguous()
            else:  # a peer: the same item, without data, so that its buckets end where TP rank 0's do
                meta = [p.to("meta") for p in pieces]
                yield hf_name, concat_tp(rule, meta, hf_rows=arch.vocab_size)


def _assembled(rule: Any, tensors: list[torch.Tensor], arch: ArchSpec, into: Targets | None) -> Iterator[Named]:
    """The HF tensors of one parameter from every TP rank's shard: written into their targets where they fit."""
    per_rank = [split(rule, t, arch) for t in tensors]
    for j, hf_name in enumerate(rule.hf_names):
        pieces = [p[j] for p in per_rank]
        target = into.get(hf_name) if into is not None else None
        if target is not None and concat_tp_into(rule, pieces, target):
            yield hf_name, target
        else:
            yield hf_name, concat_tp(rule, pieces, hf_rows=arch.vocab_size).contiguous()


def iter_hf_tensors(chunks: list[torch.nn.Module], arch: ArchSpec) -> Iterator[Named]:
    """(HF name, full tensor) of this rank's pipeline stage, layer names with the global layer index.

    Collective over the tensor-parallel group: every TP rank must iterate to the end, and gets the same
    tensors. Replicated tensors (norms) may be views of the live parameters: copy them to keep them
    past the next optimizer step. Tied embeddings: no `lm_head.weight`.
    """
    group = _tp_group()
    for chunk in chunks:
        yield from _chunk_hf_tensors(chunk, arch, group)


def _pack(items: Iterable[Named], limit: int) -> Iterator[Bucket]:
    """Consecutive items in groups of at most `limit` bytes; a larger single item forms its own group."""
    group: Bucket = []
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append((name, t))
        size += nbytes
    if group:
        yield group


def _pack_together(items: Iterable[Named], limit: int, group: Any) -> Iterator[Bucket]:
    """`_pack` on every rank of `group` writing its share of the same buckets (`only`): a bucket is yielded once
    every rank has written its slices of it (one barrier per bucket), so a reader may read it at once."""
    for bucket in _pack(items, limit):
        dist.barrier(group=group)
        yield bucket


def iter_hf_buckets(chunks: list[torch.nn.Module], arch: ArchSpec, bucket_bytes: int) -> Iterator[Bucket]:
    """`iter_hf_tensors` in buckets of at most `bucket_bytes` (a larger single tensor is a bucket alone)."""
    return _pack(iter_hf_tensors(chunks, arch), bucket_bytes)


# ------------------------------------------------------------------------------------ pipeline collect


@dataclass(frozen=True)
class _Place:
    """Where one global rank sits: its pipeline stage, TP rank and TP group, and whether it is replica 0."""

    rank: int
    stage: int
    tp_rank: int
    replica0: bool
    """Data-parallel and context-parallel rank 0."""
    tp_ranks: tuple[int, ...]
    ep_ranks: tuple[int, ...]
    """Its expert-parallel group: the ranks holding the other experts of its MoE layers (itself alone without)."""


def _all_places() -> list[_Place]:
    from lcot_mega.actor import megatron_adapter as ma

    layout = ma.current_layout()
    me = _Place(
        rank=dist.get_rank(),
        stage=layout.pp_rank,
        tp_rank=layout.tp_rank,
        replica0=ma.is_first_replica(),
        tp_ranks=tuple(dist.get_process_group_ranks(_tp_group())),
        ep_ranks=tuple(dist.get_process_group_ranks(ma.expert_parallel_group())),
    )
    places: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(places, me)
    return places


def _producer(places: list[_Place], stage: int, dst: int) -> _Place:
    """The rank whose TP group exports `stage` for `dst`: dst itself when it holds that stage."""
    if places[dst].stage == stage:
        return places[dst]
    return next(p for p in places if p.stage == stage and p.tp_rank == 0 and p.replica0)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _send_buckets(buckets: Iterator[Bucket], dst: int, device: torch.device) -> None:
    for bucket in buckets:
        header = [(name, tuple(t.shape), t.dtype) for name, t in bucket]
        dist.send_object_list([header], dst=dst, device=device)
        for _, t in bucket:
            dist.send(t.to(device), dst=dst)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # NCCL sends are asynchronous: hold at most one bucket in flight
    dist.send_object_list([None], dst=dst, device=device)


def _recv_buckets(src: int, device: torch.device) -> Iterator[Bucket]:
    while True:
        header: list[Any] = [None]
        dist.recv_object_list(header, src=src, device=device)
        if header[0] is None:
            return
        bucket = []
        for name, shape, dtype in header[0]:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, src=src)
            bucket.append((name, t))
        yield bucket
        del bucket  # received buckets are not kept here while the next one arrives


def _drain(items: Iterable[Any]) -> None:
    for _ in items:
        pass


def gather_hf_state(
    chunks: list[torch.nn.Module],
    arch: ArchSpec,
    bucket_bytes: int,
    dst: int = 0,
    *,
    shared: bool = False,
    into: Targets | None = None,
    read_as_yielded: bool = True,
) -> Iterator[Bucket]:
    """On global rank `dst`: the HF buckets of every pipeline stage in model order (stage 0 first).

    Collective over the world: every rank must iterate it to the end; ranks other than `dst` yield
    nothing. Each stage's buckets come from its (dp 0, tp 0) rank (from dst's own TP group when dst
    holds the stage), one bucket at a time; the other data-parallel replicas do no work. With virtual
    pipeline stages the order is chunk 0 of every stage, then chunk 1, ...: the model's layer order.
    `shared`: the exporting rank reads its TP peers' shards in place through shared memory where the group
    allows it (`weight_sync.shared_shards`: one host, gloo) instead of all-gathering them. `into`: on `dst`, the
    tensors of its own stage are assembled straight into these targets (an in-process engine's parameters, or a
    staging buffer in shared memory); with `shared` as well, the targets are shared with dst's TP peers and each
    rank copies its own slices into them at once (`shared_shards.peer_targets`), a bucket being yielded once
    every rank has written its part (a barrier per bucket), or, with `read_as_yielded` False (a reader that reads
    the targets only after the stream has ended: an in-process engine), without those barriers; the same on
    every rank.
    """
    places = _all_places()
    me = places[dist.get_rank()]
    device = _comm_device()
    group = _tp_group()
    # experts are gathered over their own groups (expert-parallel, expert tensor-parallel), not read in place
    shards = _shared_shards(chunks, group) if shared and not arch.num_experts else None
    every_rank_writes = None  # dst's targets, writable by every rank of its TP group
    if shards is not None and me.rank in places[dst].tp_ranks:
        from lcot_mega.weight_sync.shared_shards import peer_targets

        every_rank_writes = peer_targets(dict(into) if me.rank == dst and into else None, group, dst)
    offset = 0
    for chunk in chunks:
        count = len(_chunk_params(chunk))
        for stage in range(1 + max(p.stage for p in places)):
            producer = _producer(places, stage, dst)
            targets = into if me.rank == dst else None
            if shards is None:
                local = _pack(_chunk_hf_tensors(chunk, arch, group, into=targets), bucket_bytes)  # lazy
                peers = {r for t in producer.tp_ranks for r in places[t].ep_ranks}
                yield from _stage_part(me.rank, producer, dst, local, device, peers)
            elif me.rank in producer.tp_ranks:  # the producing TP group: read in place between two barriers
                shards.begin()
                per_rank_of = partial(lambda base, i: shards.tensors(base + i), offset)
                if every_rank_writes is not None and producer.rank == dst:  # each rank copies its own slices
                    tensors = _chunk_hf_tensors(chunk, arch, group, per_rank_of, every_rank_writes, only=me.tp_rank)
                    together = read_as_yielded
                    packed = _pack_together(tensors, bucket_bytes, group) if together else _pack(tensors, bucket_bytes)
                    yield from _stage_part(me.rank, producer, dst, packed, device)
                else:
                    local = _pack(_chunk_hf_tensors(chunk, arch, group, per_rank_of, targets), bucket_bytes)
                    mine = local if me.rank == producer.rank else iter(())
                    yield from _stage_part(me.rank, producer, dst, mine, device)
                shards.end()  # after it, every rank's slices are in the targets
            else:
                yield from _stage_part(me.rank, producer, dst, iter(()), device)
        offset += count


def _shared_shards(chunks: list[torch.nn.Module], group: Any) -> Any:
    """The TP peers' parameters mapped through shared memory, or None where the group cannot share them."""
    from lcot_mega.weight_sync.shared_shards import shared_shards

    if dist.get_world_size(group) == 1:
        return None
    params = [param for chunk in chunks for _, param, _ in _chunk_params(chunk)]
    return shared_shards(chunks, params, group)


def _stage_part(
    rank: int,
    producer: _Place,
    dst: int,
    local: Iterator[Bucket],
    device: torch.device,
    expert_peers: Collection[int] = (),
) -> Iterator[Bucket]:
    """This rank's part in bringing one stage's buckets to `dst` (which alone yields them). `expert_peers`: the
    ranks whose experts the producing TP group gathers (they iterate along)."""
    if rank == dst and rank in producer.tp_ranks:
        yield from local
    elif rank == dst:
        yield from _recv_buckets(producer.rank, device)
    elif rank == producer.rank:
        _send_buckets(local, dst, device)
    elif rank in producer.tp_ranks or rank in expert_peers:
        _drain(local)  # a TP or expert-parallel peer of the sender: its part of each all-gather


# ------------------------------------------------------------------------------------- HF directory


def expected_hf_tensor_count(arch: ArchSpec) -> int:
    """How many tensors the HF checkpoint of `arch` holds (the `total` of a progress report)."""
    return len(hf_tensor_names(arch))


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def _host_tensors(
    buckets: Iterable[Bucket], dtype: torch.dtype | None, total: int, progress: Callable[[int, int], None] | None
) -> Iterator[Named]:
    done = 0
    for bucket in buckets:
        for name, t in bucket:
            yield name, t.to("cpu", dtype or t.dtype)
            done += 1
            if progress is not None:
                progress(done, total)


def _write_shards(tensors: Iterable[Named], out: Path, max_shard_bytes: int) -> list[str]:
    """Shards in `out` (single `model.safetensors`, or numbered ones plus the index); returns the names."""
    shards: list[list[str]] = []
    total_bytes = 0
    for shard in _pack(tensors, max_shard_bytes):
        _write_shard(out / f"shard-{len(shards) + 1:05d}.part", dict(shard))
        shards.append([name for name, _ in shard])
        total_bytes += sum(t.numel() * t.element_size() for _, t in shard)
    if len(shards) == 1:
        (out / "shard-00001.part").rename(out / "model.safetensors")
        return shards[0]
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{i:05d}.part").rename(out / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [name for names in shards for name in names]


def _check_complete(written: list[str], arch: ArchSpec) -> None:
    expected = hf_tensor_names(arch)
    if sorted(written) != sorted(expected):
        missing = sorted(set(expected) - set(written))[:5]
        extra = sorted(set(written) - set(expected))[:5]
        raise HFExportError(
            f"exported {len(written)} tensors, expected {len(expected)}: missing {missing}, unexpected {extra}"
        )


def _tokenizer_files(tokenizer_dir: str | Path | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    files = [Path(tokenizer_dir) / name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
    if not files:
        raise HFExportError(f"tokenizer_dir {tokenizer_dir} holds none of {', '.join(TOKENIZER_FILES)}")
    return files


@dataclass(frozen=True)
class _WriteOptions:
    tokenizer_dir: str | Path | None
    dtype: torch.dtype | None
    max_shard_bytes: int
    progress: Callable[[int, int], None] | None


def _write_hf_dir(stream: Iterable[Bucket], out: Path, arch: ArchSpec, hf_config: Any, opts: _WriteOptions) -> None:
    tokenizer = _tokenizer_files(opts.tokenizer_dir)  # before the stream: fail before the long part
    total = expected_hf_tensor_count(arch)
    tensors = _host_tensors(stream, opts.dtype, total, opts.progress)
    _check_complete(_write_shards(tensors, out, opts.max_shard_bytes), arch)
    config = copy.deepcopy(hf_config)
    if opts.dtype is not None:
        config.dtype = opts.dtype
    config.save_pretrained(out)
    for file in tokenizer:
        shutil.copy2(file, out / file.name)


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Rename `new` to `out_dir`; a previous `out_dir` is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    try:
        new.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomically(
    stream: Iterable[Bucket], out_dir: Path, arch: ArchSpec, hf_config: Any, opts: _WriteOptions
) -> None:
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _write_hf_dir(stream, tmp, arch, hf_config, opts)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_checkpoint(
    chunks: list[torch.nn.Module],
    arch: ArchSpec,
    out_dir: str | Path,
    hf_config: Any,
    *,
    tokenizer_dir: str | Path | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path | None:
    """Write the model as an HF directory loadable by `AutoModelForCausalLM.from_pretrained(out_dir)`.

    Collective: every rank calls it. Global rank 0 streams the buckets of all stages into shards of at
    most `max_shard_bytes` (plus `config.json` from `hf_config`, the tokenizer files of `tokenizer_dir`)
    in a temporary sibling directory renamed to `out_dir` at the end, and returns `out_dir`; the other
    ranks return None. `dtype` casts the saved tensors (None: as held). `progress(done, total)` is
    called on rank 0 as tensors arrive. If rank 0 fails, it still drains the stream (the other ranks are
    sending) and every rank raises; `out_dir` is then untouched.
    """
    if arch_from_hf_config(hf_config) != arch:
        raise HFExportError(f"hf_config describes {arch_from_hf_config(hf_config)}, the model is {arch}")
    out_dir = Path(out_dir)
    opts = _WriteOptions(tokenizer_dir, dtype, max_shard_bytes, progress)
    stream = gather_hf_state(chunks, arch, bucket_bytes, dst=0)
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            _write_atomically(stream, out_dir, arch, hf_config, opts)
        except Exception as e:
            failure = e
            _drain(stream)  # the other stages are still sending: finish the collectives, then raise
    else:
        _drain(stream)
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(status, src=0, device=_comm_device())  # every rank raises, or none does
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise HFExportError(f"rank 0 failed to write {out_dir}: {status[0]}")
    return out_dir if dist.get_rank() == 0 else None
