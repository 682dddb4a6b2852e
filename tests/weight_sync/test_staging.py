"""The staging buffer of syncs to engines in other processes: one shared-memory buffer laid out from the first sync,
the gather writing each weight into its place, the shared-memory transport sending handles to it without a copy,
and an engine in another process reading the values through it."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf

from lcot_mega.rollout.tensor_ipc import dumps_named_tensors, loads_named_tensors
from lcot_mega.weight_sync.staging import Stager, StagingBuffer

LAYOUT = (
    ("a", (3, 5), torch.float32),
    ("b", (7,), torch.bfloat16),
    ("c", (2, 2), torch.int64),
    ("d", (0,), torch.float32),
)


def test_views_are_aligned_disjoint_and_in_one_shared_segment():
    buf = StagingBuffer(LAYOUT)
    assert list(buf.views) == ["a", "b", "c", "d"]
    base = buf.storage.data_ptr()
    spans = []
    for name, shape, dtype in LAYOUT:
        v = buf.views[name]
        assert v.shape == shape and v.dtype == dtype and v.is_contiguous()
        assert v.untyped_storage().data_ptr() == base and buf.storage.is_shared()
        start = v.data_ptr() - base
        assert start % 64 == 0
        spans.append((start, start + v.numel() * v.element_size()))
    spans.sort()
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))  # no two views overlap
    assert buf.nbytes == 64 + 64 + 64 + 0 and buf.storage.nbytes() >= buf.nbytes  # 60, 14, 32 bytes rounded up
    for i, (name, _, _) in enumerate(LAYOUT):  # writing one view leaves the others alone
        buf.views[name].fill_(i + 1)
    assert [int(buf.views[n].sum()) for n in "abc"] == [15, 14, 12]


def test_the_stager_learns_its_layout_from_a_finished_sync_and_keeps_its_buffer():
    stager = Stager()
    assert stager.targets() is None
    sent = [[("a", torch.ones(3, 5)), ("b", torch.ones(7, dtype=torch.bfloat16))], [("c", torch.ones(2, 2).long())]]
    unfinished = stager.watch(sent)
    next(unfinished)
    assert stager.targets() is None  # a sync cut off half way teaches nothing
    assert [list(b) for b in stager.watch(sent)] == sent
    first = stager.targets()
    assert {n: (tuple(t.shape), t.dtype) for n, t in first.items()} == {n: (s, d) for n, s, d in LAYOUT[:3]}
    list(stager.watch([[(n, t) for n, t in first.items()]]))  # the next sync sends the staged views themselves
    assert stager.targets() is first
    list(stager.watch([[("a", torch.ones(4))]]))  # another layout (a resized vocabulary): a new buffer
    assert list(stager.targets()) == ["a"] and stager.targets()["a"].shape == (4,)


def test_staged_tensors_go_as_handles_and_another_process_reads_them_in_place():
    buf = StagingBuffer(LAYOUT[:2])
    buf.views["a"].copy_(torch.arange(15.0).view(3, 5))
    buf.views["b"].copy_(torch.arange(7.0))
    payload = dumps_named_tensors(list(buf.views.items()))
    assert payload.buffer is None and payload.load_format is None  # nothing was copied into a segment of its own
    assert payload.nbytes == 15 * 4 + 7 * 2
    script = """
import base64, pickle, sys, torch
for name, t in pickle.loads(base64.b64decode(sys.stdin.read(), validate=True)):
    print(name, str(t.dtype), float(t.float().sum()))
"""
    res = subprocess.run([sys.executable, "-c", script], input=payload.entries[0], text=True, capture_output=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["a torch.float32 105.0", "b torch.bfloat16 21.0"]
    (again,) = dumps_named_tensors(list(buf.views.items())).entries
    (_, a), _ = loads_named_tensors(again)
    assert a.data_ptr() == buf.views["a"].data_ptr()  # the receiver maps the staging buffer itself


def _three_syncs(rank: int, world: int, actor_dir: str, engine_dir: str) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine, RolloutServer, ServeConfig, SGLangHTTPEngine, tensor_ipc
    from lcot_mega.weight_sync import ProbeCheck, sync_weights

    torch.set_num_threads(1)
    copies = []  # tensors copied into a transport segment of their own, per sync
    for fn in ("_plain", "_flattened"):
        real = getattr(tensor_ipc, fn)
        setattr(tensor_ipc, fn, lambda named, reuse, real=real: (copies.append(len(named)), real(named, reuse))[1])
    arch = arch_from_hf_config(AutoConfig.from_pretrained(actor_dir))
    actor = MegatronActor(arch, ActorConfig(tensor_parallel=2), AlgoConfig(), actor_dir)
    server = RolloutServer(EmbeddedEngine(engine_dir), ServeConfig(port=0)).start() if rank == 0 else None
    clients = [SGLangHTTPEngine(server.url, timeout_s=60)] if server else []
    probe = ProbeCheck((3, 14, 15, 92, 65, 35, 89, 79), tolerance=1e-4)
    diffs, copied = [], []
    try:
        for version in (1, 2, 3):
            torch.manual_seed(version)  # the same noise on both ranks' replicated parameters
            with torch.no_grad():
                for p in actor.chunks[0].parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            copies.clear()
            report = sync_weights(actor.chunks, arch, clients, version, bucket_bytes=40_000, verify=probe)
            diffs.append(report.probe_max_diff)
            copied.append(sum(copies))
        return dict(diffs=diffs, copied=copied, version=clients[0].weight_version if clients else None)
    finally:
        if server:
            server.shutdown()


def test_a_tp2_actor_syncs_a_served_engine_through_the_staging_buffer(tmp_path):
    """From the second sync on, nothing is copied into a transport segment, and the engine still scores exactly
    like the actor after every sync (the weights changed in between)."""
    pytest.importorskip("megatron.core")
    actor_dir = make_tiny_hf(tmp_path / "a", "qwen2", seed=0, initializer_range=0.2)
    engine_dir = make_tiny_hf(tmp_path / "b", "qwen2", seed=1, initializer_range=0.2)
    rank0, rank1 = run_gloo(_three_syncs, 2, str(actor_dir), str(engine_dir))
    assert rank0["version"] == 3 and rank0["diffs"] == rank1["diffs"]
    assert all(d is not None and d < 1e-5 for d in rank0["diffs"]), rank0["diffs"]
    assert rank0["copied"][0] > 0 and rank0["copied"][1:] == [0, 0], rank0["copied"]
