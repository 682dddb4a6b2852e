"""SGLang's colocated weight update (`/update_weights_from_tensor`): tensors cross processes through shared memory,
the payload format is SGLang's, a served engine then scores like an engine loaded with those weights, and a hostile
payload is refused without running anything."""

from __future__ import annotations

import base64
import gc
import http.client
import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.http_client import EngineHTTPError, SGLangHTTPEngine
from lcot_mega.rollout.server import RolloutServer, ServeConfig
from lcot_mega.rollout.tensor_ipc import (
    FLATTENED_BUCKET,
    PayloadError,
    dumps_named_tensors,
    loads_named_tensors,
)

_FAKE_SGLANG = """
import dataclasses, types
for name in ("sglang", "sglang.srt", "sglang.srt.weight_sync", "sglang.srt.weight_sync.tensor_bucket"):
    sys.modules[name] = types.ModuleType(name)
@dataclasses.dataclass
class FlattenedTensorMetadata:
    name: str; shape: torch.Size; dtype: torch.dtype; start_idx: int; end_idx: int; numel: int
FlattenedTensorMetadata.__module__ = "sglang.srt.weight_sync.tensor_bucket"
sys.modules[FlattenedTensorMetadata.__module__].FlattenedTensorMetadata = FlattenedTensorMetadata
"""
"""SGLang's metadata class in a module of its real name, for subprocesses standing in for an SGLang process."""
PROMPT, RESPONSE = [5, 6, 7, 8], [9, 10, 11, 2, 40, 41]
PATH = "/update_weights_from_tensor"


def _hf_state(model_dir) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items())


def _serve(model_dir, **cfg) -> RolloutServer:
    return RolloutServer(EmbeddedEngine(model_dir), ServeConfig(port=0, **cfg), model_path=str(model_dir)).start()


def _body(entry: str, **extra) -> dict:
    return {"serialized_named_tensors": [entry], "load_format": None, "flush_cache": True, **extra}


def post(server: RolloutServer, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, raw = resp.status, resp.read()
    conn.close()
    return status, json.loads(raw)


def _shm_segments() -> set[str]:
    """This process's torch shared-memory segments."""
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"torch_{os.getpid()}_")}


@pytest.fixture(scope="module")
def other_state(other_dir) -> list[tuple[str, torch.Tensor]]:
    return _hf_state(other_dir)


@pytest.fixture(scope="module")
def other_scores(other_dir) -> torch.Tensor:
    return EmbeddedEngine(other_dir).score(PROMPT, RESPONSE)


@pytest.fixture(scope="module")
def served(model_dir):
    srv = _serve(model_dir)
    yield srv
    srv.shutdown()


# ------------------------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("flatten", [True, False])
def test_payload_round_trips_names_shapes_and_values(flatten):
    named = [("a", torch.randn(3, 4)), ("b", torch.arange(5.0)), ("c", torch.randn(2, 3).t()), ("e", torch.ones(0))]
    payload = dumps_named_tensors(named, ranks=2, flatten=flatten)
    assert payload.load_format == (FLATTENED_BUCKET if flatten else None) and len(payload.entries) == 2
    assert payload.nbytes == sum(t.numel() * 4 for _, t in named)
    for entry in payload.entries:  # one pickle per rank, each with its own reference on the same buffer
        out = loads_named_tensors(entry, payload.load_format)
        assert [n for n, _ in out] == [n for n, _ in named]
        assert all(torch.equal(x, t) and x.dtype == t.dtype for (_, x), (_, t) in zip(out, named, strict=True))


def test_mixed_dtypes_go_as_the_plain_list_and_an_empty_update_needs_no_buffer():
    named = [("w", torch.randn(3)), ("h", torch.randn(5).to(torch.bfloat16)), ("i", torch.arange(3))]
    payload = dumps_named_tensors(named)
    assert payload.load_format is None
    out = loads_named_tensors(payload.entries[0])
    assert [(n, x.dtype) for n, x in out] == [(n, t.dtype) for n, t in named]
    assert all(torch.equal(x, t) for (_, x), (_, t) in zip(out, named, strict=True))
    empty = dumps_named_tensors([])
    assert empty.buffer is None and empty.load_format is None and loads_named_tensors(empty.entries[0]) == []


def test_a_stock_unpickler_with_sglangs_metadata_class_reads_our_payload_in_another_process():
    """What an SGLang server does (ForkingPickler-compatible loads, `FlattenedTensorBucket.reconstruct_tensors`,
    old `.reshape` and new `.view(dtype).reshape` rules), in a process that is not our child by multiprocessing."""
    named = [("x", torch.randn(4, 3)), ("y", torch.arange(6.0))]
    payload = dumps_named_tensors(named)
    script = (
        """
import base64, pickle, sys, torch
"""
        + _FAKE_SGLANG
        + """obj = pickle.loads(base64.b64decode(sys.stdin.read(), validate=True))
flat = obj["flattened_tensor"]
for m in obj["metadata"]:
    old = flat[m.start_idx : m.end_idx].reshape(m.shape)
    new = flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)
    assert torch.equal(old, new) and type(m) is FlattenedTensorMetadata and m.numel == old.numel()
    print(m.name, tuple(m.shape), str(m.dtype), float(new.sum()))
"""
    )
    res = subprocess.run([sys.executable, "-c", script], input=payload.entries[0], text=True, capture_output=True)
    assert res.returncode == 0, res.stderr
    expected = [f"{n} {tuple(t.shape)} torch.float32 {float(t.sum())}" for n, t in named]
    assert res.stdout.splitlines() == expected


def test_we_read_a_forking_pickler_payload_with_a_uint8_bucket_from_another_process():
    """The newer SGLang bucket (uint8, byte offsets, mixed dtypes) as slime-like senders pickle it with torch's own
    reductions under the file_system strategy."""
    script = (
        """
import base64, io, sys, torch, torch.multiprocessing as mp
from multiprocessing.reduction import ForkingPickler
"""
        + _FAKE_SGLANG
        + """mp.set_sharing_strategy("file_system")
a, b = torch.arange(6.0).reshape(2, 3), torch.arange(4, dtype=torch.bfloat16)
parts = [a.flatten().view(torch.uint8), b.view(torch.uint8)]
flat = torch.cat(parts)
meta = [
    FlattenedTensorMetadata("a", a.shape, a.dtype, 0, 24, 24),
    FlattenedTensorMetadata("b", b.shape, b.dtype, 24, 32, 8),
]
buf = io.BytesIO()
ForkingPickler(buf).dump({"flattened_tensor": flat, "metadata": meta})
print(base64.b64encode(buf.getvalue()).decode(), flush=True)
sys.stdin.read()  # keep the segment until the reader is done
"""
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        out = loads_named_tensors(proc.stdout.readline().strip(), FLATTENED_BUCKET)
        assert [(n, t.dtype, tuple(t.shape)) for n, t in out] == [
            ("a", torch.float32, (2, 3)),
            ("b", torch.bfloat16, (4,)),
        ]
        assert torch.equal(out[0][1], torch.arange(6.0).reshape(2, 3))
        assert torch.equal(out[1][1], torch.arange(4, dtype=torch.bfloat16))
    finally:
        proc.communicate("", timeout=30)


# ---------------------------------------------------------------------------------------------- served


@pytest.mark.parametrize("flatten", [True, False])
def test_served_engine_scores_like_the_other_model_after_the_update(
    model_dir, other_state, other_scores, flatten, served
):
    client = SGLangHTTPEngine(served.url, timeout_s=60, flattened_bucket=flatten)
    before = client.score(PROMPT, RESPONSE)
    assert float((before - other_scores).abs().max()) > 0.1  # the server starts from other weights
    version = client.weight_version + 3
    client.update_weights(other_state, version)
    assert client.weight_version == version
    assert float((client.score(PROMPT, RESPONSE) - other_scores).abs().max()) < 1e-6
    client.update_weights(_hf_state(model_dir), version + 1)  # and back
    assert torch.equal(client.score(PROMPT, RESPONSE), before) and client.weight_version == version + 1


def test_a_real_serve_process_maps_the_senders_shared_memory(model_dir, other_state, other_scores):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lcot_mega.cli", "serve", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = SGLangHTTPEngine(f"http://127.0.0.1:{port}", timeout_s=30)
        deadline = time.monotonic() + 60
        while not client.health() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.health(), proc.stderr.read().decode() if proc.poll() is not None else "no health in 60 s"
        segments = _shm_segments()
        for flatten, version in ((True, 4), (False, 5), (False, 6)):
            client.flattened_bucket = flatten
            client.update_weights(other_state, version)
            assert client.weight_version == version
            assert float((client.score(PROMPT, RESPONSE) - other_scores).abs().max()) < 1e-6
        assert len(_shm_segments() - segments) == 1  # the client keeps one buffer to write the next update into
        del client
        gc.collect()
        assert _shm_segments() <= segments  # a segment is gone once both sides dropped it
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_names_or_shapes_answer_400_and_keep_the_version(served):
    client = SGLangHTTPEngine(served.url, timeout_s=60)
    version = client.weight_version
    with pytest.raises(ValueError, match="unknown parameter"):
        client.update_weights([("model.nope.weight", torch.zeros(3))], version + 1)
    with pytest.raises(ValueError, match="has shape"):
        client.update_weights([("model.norm.weight", torch.zeros(3))], version + 1)
    assert client.weight_version == version and client.health()


def test_disabled_weight_updates_answer_403_without_opening_the_payload(model_dir, other_state):
    srv = _serve(model_dir, allow_weight_updates=False)
    try:
        client = SGLangHTTPEngine(srv.url, timeout_s=60)
        before = client.score(PROMPT, RESPONSE)
        with pytest.raises(EngineHTTPError) as err:
            client.update_weights(other_state[:2], 9)
        assert err.value.status == 403
        assert client.weight_version == 0 and torch.equal(client.score(PROMPT, RESPONSE), before)
    finally:
        srv.shutdown()


def test_the_endpoint_needs_the_api_key(model_dir):
    srv = _serve(model_dir, api_key="k")
    try:
        assert post(srv, PATH, _body(dumps_named_tensors([]).entries[0]))[0] == 401
        keyed = SGLangHTTPEngine(srv.url, api_key="k", timeout_s=60)
        keyed.update_weights([], 2)
        assert keyed.weight_version == 2
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------- hostile


class _Call:
    """Pickles as a call of `func(*args)`, like an attacker's payload."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_entries(marker: str) -> dict[str, str]:
    def b64(obj) -> str:
        return base64.b64encode(pickle.dumps(obj, protocol=4)).decode()

    shell = f"touch {marker}"
    return {
        "os.system": b64(_Call(os.system, shell)),
        "os.system inside a pair": b64([("w", _Call(os.system, shell))]),
        "subprocess.Popen": b64(_Call(subprocess.Popen, ["touch", marker])),
        "builtins.eval": b64(_Call(eval, f"__import__('os').system({shell!r})")),
        "allowed global called with junk": b64(_Call(torch.Size, "abc")),
        "protocol 0 GLOBAL": base64.b64encode(f"cos\nsystem\n(S'{shell}'\ntR.".encode()).decode(),
        "persistent id": base64.b64encode(b"\x80\x04K\x01Q.").decode(),
    }


@pytest.mark.parametrize("kind", list(_evil_entries("x")))
def test_hostile_pickles_answer_400_and_run_nothing(served, tmp_path, kind):
    marker = tmp_path / "pwned"
    version = SGLangHTTPEngine(served.url).weight_version
    status, out = post(served, PATH, _body(_evil_entries(str(marker))[kind], weight_version="99"))
    assert status == 400 and isinstance(out["error"], str), out
    time.sleep(0.1)
    assert not marker.exists()
    client = SGLangHTTPEngine(served.url)
    assert client.health() and client.weight_version == version


def test_hostile_globals_are_refused_before_anything_is_called():
    with pytest.raises(PayloadError, match=r"refused global posix\.system|refused global os\.system"):
        loads_named_tensors(base64.b64encode(pickle.dumps(_Call(os.system, "true"))).decode())


@pytest.mark.parametrize(
    "body",
    [
        {"serialized_named_tensors": "abc"},
        {"serialized_named_tensors": []},
        {"serialized_named_tensors": [1]},
        {"serialized_named_tensors": ["a", "b"]},  # two TP ranks for a one-rank server
        {"serialized_named_tensors": ["!!not base64!!"]},
        {"serialized_named_tensors": [base64.b64encode(b"\x80\x04K").decode()]},  # truncated pickle
        {"serialized_named_tensors": [base64.b64encode(pickle.dumps({"a": 1})).decode()]},  # not a pair list
        {"serialized_named_tensors": [base64.b64encode(pickle.dumps([])).decode()], "load_format": "direct_x"},
        {"serialized_named_tensors": [base64.b64encode(pickle.dumps([])).decode()], "load_format": FLATTENED_BUCKET},
        {"serialized_named_tensors": [base64.b64encode(pickle.dumps([])).decode()], "flush_cache": "yes"},
        {"serialized_named_tensors": [base64.b64encode(pickle.dumps([])).decode()], "weight_version": "v2"},
    ],
)
def test_malformed_bodies_answer_400(served, body):
    status, out = post(served, PATH, body)
    assert status == 400 and isinstance(out["error"], str), out
    assert SGLangHTTPEngine(served.url).health()


def test_a_forged_storage_handle_is_refused(served):
    """Allowed rebuild functions with arguments that do not name a torch shm segment, or a segment that is gone."""
    fake = dumps_named_tensors([("model.norm.weight", torch.ones(64))], flatten=False)
    raw = base64.b64decode(fake.entries[0])
    handle = raw[raw.index(b"/torch_") :].split(b"\x94", 1)[0]
    for forged in (b"/etc/passwd" + b"\0" * (len(handle) - 11), b"/torch_1_2_" + b"3" * (len(handle) - 11)):
        entry = base64.b64encode(raw.replace(handle, forged[: len(handle)])).decode()
        status, out = post(served, PATH, _body(entry))
        assert status == 400 and ("cannot map shared memory" in out["error"] or "not a torch" in out["error"]), out


# -------------------------------------------------------------------------------------- from the actor


def _sync_into_http_engine(rank: int, world: int, actor_dir: str, engine_dir: str) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.weight_sync import ProbeCheck, WeightSyncError, sync_weights, verify_weights

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(actor_dir))
    actor = MegatronActor(arch, ActorConfig(tensor_parallel=1), AlgoConfig(), actor_dir)
    server = RolloutServer(EmbeddedEngine(engine_dir), ServeConfig(port=0)).start()
    try:
        client = SGLangHTTPEngine(server.url, timeout_s=60)
        probe = ProbeCheck((3, 14, 15, 92, 65, 35, 89, 79), tolerance=1e-4)
        try:
            verify_weights(actor.chunks, arch, [client], probe)
            before = "no error"
        except WeightSyncError as e:  # the server starts from other weights
            before = str(e)
        report = sync_weights(actor.chunks, arch, [client], 3, bucket_bytes=50_000, verify=probe)
        return dict(report=report, version=client.weight_version, before=before)
    finally:
        server.shutdown()
        ma.destroy_parallel()


def test_sync_weights_from_a_megatron_actor_into_an_http_engine(tmp_path):
    pytest.importorskip("megatron.core")
    actor_dir = make_tiny_hf(tmp_path / "a", "qwen2", seed=0, initializer_range=0.2)
    engine_dir = make_tiny_hf(tmp_path / "b", "qwen2", seed=1, initializer_range=0.2)
    (out,) = run_gloo(_sync_into_http_engine, 1, str(actor_dir), str(engine_dir))
    report = out["report"]
    assert out["version"] == 3 and report.buckets > 1 and report.bytes > 500_000
    assert report.probe_max_diff is not None and report.probe_max_diff < 1e-5
    assert "disagree on the probe sequence" in out["before"]
