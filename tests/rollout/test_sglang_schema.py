"""Every request body `SGLangHTTPEngine` sends is one a real SGLang server accepts: captured from each client method
and validated by SGLang's own request classes (`sglang.srt.managers.io_struct`, `sglang.api.v1.api_types`) and, for
`/update_weights_from_tensor`, by SGLang's own deserializer and bucket reader. Without the `sglang` package (CPU
machines) those checks skip; the capture itself and the documented field names are checked everywhere."""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest
import torch

from lcot_mega.rollout.http_client import SGLangHTTPEngine
from lcot_mega.rollout.protocol import SamplingParams
from lcot_mega.rollout.tensor_ipc import FLATTENED_BUCKET, loads_named_tensors

IO_STRUCT = {
    "/generate": "GenerateReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
    "/abort_request": "AbortReq",
}
"""Endpoint -> the io_struct class SGLang's HTTP server builds from its JSON body (`/flush_cache` takes none)."""

SGLANG_FIELDS = {
    "/generate": {"input_ids", "text", "sampling_params", "return_logprob", "logprob_start_len", "rid", "stream"},
    "/update_weights_from_tensor": {
        "serialized_named_tensors",
        "load_format",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
    },
    "/init_weights_update_group": {
        "master_address",
        "master_port",
        "rank_offset",
        "world_size",
        "group_name",
        "backend",
    },
    "/update_weights_from_distributed": {
        "names",
        "dtypes",
        "shapes",
        "group_name",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
        "load_format",
    },
    "/destroy_weights_update_group": {"group_name"},
    "/update_weights_from_disk": {"model_path", "load_format", "abort_all_requests", "weight_version"},
    "/release_memory_occupation": {"tags"},
    "/resume_memory_occupation": {"tags"},
    "/abort_request": {"rid", "abort_all"},
    "/flush_cache": set(),
}
"""Field names of those classes in SGLang 0.5.x (STACK-NOTES.md), for machines without the package."""


class _Recorder:
    """Stands in for the server: records (method, path, JSON-round-tripped body), answers like SGLang."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> Any:
        body = None if body is None else json.loads(json.dumps(body))  # what actually goes over the wire
        self.calls.append((method, path, body))
        if path == "/generate":
            return _generate_answer(body)
        if path == "/update_weights_from_tensor":
            for entry in body["serialized_named_tensors"]:  # as each TP rank would: also gives back the references
                loads_named_tensors(entry, body["load_format"])
        if path == "/get_model_info":
            return {"weight_version": "0"}
        return {"success": True, "message": ""}


def _generate_answer(body: dict) -> Any:
    ids = body["input_ids"]
    if body["sampling_params"]["max_new_tokens"] == 0:  # scoring
        tail = ids[body["logprob_start_len"] :]
        meta = {"input_token_logprobs": [[-0.5, t, None] for t in tail], "finish_reason": {"type": "length"}}
        return {"text": "", "output_ids": [], "meta_info": meta}
    n = body["sampling_params"].get("n", 1)
    one = {
        "text": "",
        "output_ids": [1],
        "meta_info": {"finish_reason": {"type": "length", "length": 1}, "output_token_logprobs": [[-0.1, 1, None]]},
    }
    return [one] * (len(ids) * n)


@pytest.fixture(scope="module")
def captured() -> list[tuple[str, str, Any]]:
    """The bodies of every client method, with the options that change them."""
    recorder = _Recorder()
    client = SGLangHTTPEngine("http://127.0.0.1:1", tp_size=2)
    client._request = recorder  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, n=2, seed=3)
    client.generate([[5, 6, 7], [8, 9]], params)
    client.generate([[5]], SamplingParams(max_new_tokens=4, stop=("x",), stop_token_ids=(3,), ignore_eos=True))
    client.score([5, 6, 7], [8, 9])
    client.abort()
    client.update_weights([("a.weight", torch.randn(4, 3)), ("b.weight", torch.randn(5))], 3)  # flattened
    client.update_weights([("a.weight", torch.randn(4, 3)), ("h", torch.ones(2, dtype=torch.bfloat16))], 4)  # plain
    client.flattened_bucket = False
    client.update_weights([("a.weight", torch.randn(4, 3))], 5)  # plain by choice
    client.update_weights([], 6)  # version only
    client.load_from_disk("/models/x", 7)
    client.init_weights_update_group("127.0.0.1", 29500, 1, 2, "g", "gloo")
    client.update_weights_from_distributed(["a.weight"], [torch.float32], [[4, 3]], "g", 8)
    client.update_weights_from_distributed(["a.weight"], ["bfloat16"], [[4, 3]], "g", None, flush_cache=False)
    client.destroy_weights_update_group("g")
    client.release_memory()
    client.release_memory(["weights", "kv_cache"])
    client.resume_memory(["weights"])
    client.flush_cache()
    assert client.weight_version == 0 and client.health()
    return recorder.calls


def _bodies(captured, path: str) -> list[dict]:
    return [b for _, p, b in captured if p == path]


# ------------------------------------------------------------------------------------------ everywhere


def test_every_post_body_uses_only_sglang_field_names(captured):
    posts = [(p, b) for m, p, b in captured if m == "POST"]
    assert {p for p, _ in posts} == set(SGLANG_FIELDS)
    for path, body in posts:
        assert set(body) <= SGLANG_FIELDS[path], (path, sorted(set(body) - SGLANG_FIELDS[path]))


def test_update_weights_from_tensor_bodies_carry_one_entry_per_tp_rank_and_the_version(captured):
    bodies = _bodies(captured, "/update_weights_from_tensor")
    assert [b["load_format"] for b in bodies] == [FLATTENED_BUCKET, None, None, None]
    assert [b["weight_version"] for b in bodies] == ["3", "4", "5", "6"]  # SGLang's weight_version is a string
    for b in bodies:
        assert len(b["serialized_named_tensors"]) == 2 and all(
            isinstance(e, str) for e in b["serialized_named_tensors"]
        )
        assert b["flush_cache"] is True and b["abort_all_requests"] is False


# ------------------------------------------------------------------------------------- with SGLang itself


def _validate(path: str, body: dict) -> Any:
    """The request object SGLang's HTTP server builds from `body` (FastAPI validates it with pydantic)."""
    io_struct = pytest.importorskip("sglang.srt.managers.io_struct")
    pydantic = pytest.importorskip("pydantic")
    return pydantic.TypeAdapter(getattr(io_struct, IO_STRUCT[path])).validate_python(body)


def test_sglang_request_classes_accept_every_body(captured):
    pytest.importorskip("sglang.srt.managers.io_struct")
    for method, path, body in captured:
        if method != "POST" or path not in IO_STRUCT:
            continue
        obj = _validate(path, body)
        if path == "/generate" and hasattr(obj, "normalize_batch_and_parallel_sampling"):
            obj.normalize_batch_and_parallel_sampling()


def test_sglang_api_generate_request_accepts_the_generate_bodies(captured):
    pytest.importorskip("sglang")
    try:
        api_types = importlib.import_module("sglang.api.v1.api_types")
    except ImportError:
        pytest.skip("this sglang has no sglang.api.v1.api_types")
    for body in _bodies(captured, "/generate"):
        api_types.GenerateRequest.from_json_value(body)


@pytest.mark.parametrize("flatten", [True, False])
def test_sglang_deserializer_and_bucket_reader_rebuild_our_tensors(flatten):
    """SGLang's path for a body: the request class (base64 entries -> bytes), the TP worker's
    `MultiprocessingSerializer.deserialize` of entry `tp_rank` (its restricted unpickler), then for a flattened
    bucket `FlattenedTensorBucket.reconstruct_tensors`."""
    pytest.importorskip("sglang.srt.managers.io_struct")
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    bodies: list[dict] = []
    client = SGLangHTTPEngine("http://127.0.0.1:1", tp_size=2, flattened_bucket=flatten)
    client._request = lambda method, path, body, timeout_s=None: bodies.append(body) or {"success": True}  # type: ignore[method-assign]
    named = [("a.weight", torch.randn(4, 3)), ("b.weight", torch.randn(5))]
    client.update_weights(named, 1)
    req = _validate("/update_weights_from_tensor", json.loads(json.dumps(bodies[0])))
    assert req.load_format == (FLATTENED_BUCKET if flatten else None)
    for tp_rank in range(2):
        obj = MultiprocessingSerializer.deserialize(req.serialized_named_tensors[tp_rank])
        if flatten:
            bucket = FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=obj["metadata"])
            obj = bucket.reconstruct_tensors()
        assert [n for n, _ in obj] == [n for n, _ in named]
        assert all(torch.equal(t, x) for (_, t), (_, x) in zip(named, obj, strict=True))
