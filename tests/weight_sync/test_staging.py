"""The staging buffer of syncs to engines in other processes: one shared-memory buffer laid out from the first sync,
the gather writing each weight into its place, the shared-memory transport sending handles to it without a copy,
and an engine in another process reading the values through it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf

from lcot_mega.rollout.tensor_ipc import FLATTENED_BUCKET, dumps_named_tensors, loads_named_tensors
from lcot_mega.weight_sync.staging import Stager, StagingBuffer, flat_range

MIXED = (("a", (3, 5), torch.float32), ("b", (7,), torch.bfloat16), ("c", (2, 2), torch.int64))
ONE_DTYPE = (("d", (0,), torch.float32), ("e", (3,), torch.float32), ("f", (5,), torch.float32))
LAYOUT = (MIXED, ONE_DTYPE)


def test_buckets_start_aligned_and_their_tensors_lie_packed_without_overlap():
    buf = StagingBuffer(LAYOUT)
    assert list(buf.views) == list("abcdef")
    start = {n: v.storage_offset() * v.element_size() for n, v in buf.views.items()}
    # a: 60 bytes at 0; b (bf16) at 60; c (int64) at 74 rounded up to 80; the second bucket at 112 -> 128
    assert start == {"a": 0, "b": 60, "c": 80, "d": 128, "e": 128, "f": 140} and buf.nbytes == 160
    for name, shape, dtype in (*MIXED, *ONE_DTYPE):
        v = buf.views[name]
        assert v.shape == shape and v.dtype == dtype and v.is_contiguous() and buf.storage.is_shared()
        assert v.untyped_storage().data_ptr() == buf.storage.data_ptr()
    for i, name in enumerate("abcef"):  # writing one view leaves the others alone
        buf.views[name].fill_(i + 1)
    assert [int(buf.views[n].sum()) for n in "abcef"] == [15, 14, 12, 12, 25]


def test_a_bucket_of_one_dtype_is_one_flat_range():
    buf = StagingBuffer(LAYOUT)
    flat = flat_range([buf.views[n] for n in "def"])
    assert flat is not None and flat.shape == (8,) and flat.data_ptr() == buf.views["e"].data_ptr()
    buf.views["f"].fill_(2.0)
    assert flat.tolist() == [0.0] * 3 + [2.0] * 5  # the range itself, not a copy
    assert flat_range([buf.views[n] for n in "ab"]) is None  # two dtypes
    assert flat_range([buf.views["f"], buf.views["e"]]) is None  # not in storage order
    assert flat_range([torch.ones(3), torch.ones(5)]) is None  # separate storages
    assert flat_range([]) is None


def test_the_stager_learns_its_layout_from_a_finished_sync_and_keeps_its_buffer():
    stager = Stager()
    assert stager.targets() is None
    sent = [[(n, torch.ones(shape, dtype=dtype)) for n, shape, dtype in bucket] for bucket in LAYOUT]
    unfinished = stager.watch(sent)
    next(unfinished)
    assert stager.targets() is None  # a sync cut off half way teaches nothing
    assert [list(b) for b in stager.watch(sent)] == sent
    first = stager.targets()
    assert stager.buffer.layout == LAYOUT and list(first) == list("abcdef")
    list(stager.watch([[(n, first[n]) for n, *_ in bucket] for bucket in LAYOUT]))  # the staged views themselves
    assert stager.targets() is first
    list(stager.watch([[("a", torch.ones(4))]]))  # another layout (a resized vocabulary): a new buffer
    assert list(stager.targets()) == ["a"] and stager.targets()["a"].shape == (4,)


def test_staged_tensors_go_as_handles_and_another_process_reads_them_in_place():
    buf = StagingBuffer(LAYOUT)
    for i, name in enumerate(buf.views):
        buf.views[name].copy_(torch.arange(buf.views[name].numel()).view(buf.views[name].shape) + i)
    flat = dumps_named_tensors([(n, buf.views[n]) for n in "def"])
    mixed = dumps_named_tensors([(n, buf.views[n]) for n in "abc"])
    assert flat.load_format == FLATTENED_BUCKET and mixed.load_format is None
    assert flat.buffer is None and mixed.buffer is None  # nothing was copied into a segment of its own
    assert (flat.nbytes, mixed.nbytes) == (32, 60 + 14 + 32)
    script = """
import sys
from lcot_mega.rollout.tensor_ipc import loads_named_tensors
for line in sys.stdin:
    fmt, entry = line.split()
    for name, t in loads_named_tensors(entry, None if fmt == "plain" else fmt):
        print(name, str(t.dtype), tuple(t.shape), float(t.double().sum()))
"""
    lines = f"{FLATTENED_BUCKET} {flat.entries[0]}\nplain {mixed.entries[0]}\n"
    res = subprocess.run([sys.executable, "-c", script], input=lines, text=True, capture_output=True)
    assert res.returncode == 0, res.stderr
    expected = [f"{n} {t.dtype} {tuple(t.shape)} {float(t.double().sum())}" for n, t in buf.views.items()]
    assert sorted(res.stdout.splitlines()) == sorted(expected)
    (again,) = dumps_named_tensors([(n, buf.views[n]) for n in "ef"]).entries
    (_, e), _ = loads_named_tensors(again, FLATTENED_BUCKET)
    assert e.data_ptr() == buf.views["e"].data_ptr()  # the receiver maps the staging buffer itself


def _three_syncs(rank: int, world: int, actor_dir: str, engine_dir: str, route: str) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine, RolloutServer, ServeConfig, SGLangHTTPEngine, tensor_ipc
    from lcot_mega.weight_sync import BroadcastSync, ProbeCheck, sync_weights

    torch.set_num_threads(1)
    copies = []  # per sync: tensors copied into a segment of their own (tensor), or broadcasts not from shared memory
    for fn in ("_plain", "_flattened"):
        real = getattr(tensor_ipc, fn)
        setattr(tensor_ipc, fn, lambda named, reuse, real=real: (copies.append(len(named)), real(named, reuse))[1])
    arch = arch_from_hf_config(AutoConfig.from_pretrained(actor_dir))
    actor = MegatronActor(arch, ActorConfig(tensor_parallel=2), AlgoConfig(), actor_dir)
    server = RolloutServer(EmbeddedEngine(engine_dir), ServeConfig(port=0)).start() if rank == 0 else None
    clients = [SGLangHTTPEngine(server.url, timeout_s=60)] if server else []
    transport = BroadcastSync(clients, "127.0.0.1", 0, group_name="staged") if server and route == "broadcast" else None
    if transport is not None:
        real_broadcast = transport.group.broadcast
        record = lambda t: copies.append(0 if t.untyped_storage().is_shared() else 1)  # noqa: E731
        transport.group.broadcast = lambda t: (record(t), real_broadcast(t))[1]
    probe = ProbeCheck((3, 14, 15, 92, 65, 35, 89, 79), tolerance=1e-4)
    diffs, copied, buckets = [], [], []
    try:
        for version in (1, 2, 3):
            torch.manual_seed(version)  # the same noise on both ranks' replicated parameters
            with torch.no_grad():
                for p in actor.chunks[0].parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            copies.clear()
            kw = dict(bucket_bytes=40_000, verify=probe, transport=transport)
            report = sync_weights(actor.chunks, arch, clients, version, **kw)
            diffs.append(report.probe_max_diff)
            copied.append(sum(copies))
            buckets.append(report.buckets)
        return dict(diffs=diffs, copied=copied, buckets=buckets, version=clients[0].weight_version if clients else None)
    finally:
        if transport is not None:
            transport.close()
        if server:
            server.shutdown()


@pytest.mark.parametrize("route", ["tensor", "broadcast"])
def test_a_tp2_actor_syncs_a_served_engine_through_the_staging_buffer(tmp_path, route):
    """From the second sync on, nothing is copied on the way to the server (the shared-memory payload or the
    broadcast is the staging buffer itself), and the engine scores exactly like the actor after every sync (the
    weights changed in between)."""
    pytest.importorskip("megatron.core")
    actor_dir = make_tiny_hf(tmp_path / "a", "qwen2", seed=0, initializer_range=0.2)
    engine_dir = make_tiny_hf(tmp_path / "b", "qwen2", seed=1, initializer_range=0.2)
    rank0, rank1 = run_gloo(_three_syncs, 2, str(actor_dir), str(engine_dir), route)
    assert rank0["version"] == 3 and rank0["diffs"] == rank1["diffs"]
    assert all(d is not None and d < 1e-5 for d in rank0["diffs"]), rank0["diffs"]
    assert rank0["buckets"][0] > 2
    assert rank0["copied"][0] > 0 and rank0["copied"][1:] == [0, 0], rank0["copied"]


def test_the_next_bucket_is_gathered_while_the_current_one_is_sent():
    import threading

    from lcot_mega.weight_sync.push import _Ahead

    produced, consumer_saw = [], []
    second_started = threading.Event()

    def gather():
        for i in range(4):
            produced.append(i)
            if i == 1:
                second_started.set()
            yield [(f"w{i}", torch.full((2,), float(i)))]

    ahead = _Ahead(gather())
    first = next(ahead)
    assert second_started.wait(10)  # bucket 1 is being gathered while bucket 0 is still with the caller
    consumer_saw.append(first[0][0])
    consumer_saw.append(next(ahead)[0][0])
    ahead.close()  # the caller stops early (a failed push): the item in flight finishes, the rest stays unread
    assert consumer_saw == ["w0", "w1"] and produced == [0, 1, 2]

    def failing():
        yield [("w0", torch.zeros(1))]
        raise RuntimeError("gather failed")

    ahead = _Ahead(failing())
    next(ahead)
    with pytest.raises(RuntimeError, match="gather failed"):  # the gather's own error, in the caller's thread
        next(ahead)
    ahead.close()
