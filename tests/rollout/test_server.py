"""The HTTP server and client against the in-process engine: same results, SGLang shapes, contract errors, auth."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch
from helpers.tiny_models import VOCAB

from lcot_mega.cli import main as cli_main
from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.http_client import EngineHTTPError, SGLangHTTPEngine
from lcot_mega.rollout.protocol import RolloutEngine, SamplingParams
from lcot_mega.rollout.server import RolloutServer, ServeConfig
from lcot_mega.types import SampleStatus

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [20]]
KEY = "test-key"


def _serve(engine, model_dir, **cfg) -> RolloutServer:
    return RolloutServer(engine, ServeConfig(port=0, **cfg), model_path=str(model_dir)).start()


@pytest.fixture(scope="module")
def server(engine, model_dir):
    srv = _serve(engine, model_dir, max_body_bytes=1 << 20)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server) -> SGLangHTTPEngine:
    return SGLangHTTPEngine(server.url, timeout_s=60)


def post(server: RolloutServer, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, raw = resp.status, resp.read()
    conn.close()
    return status, json.loads(raw)


# ------------------------------------------------------------------------------------------ equality


def test_client_implements_every_rollout_engine_member():
    # isinstance() on the runtime-checkable Protocol would read the weight_version property (a request).
    members = [m for m in vars(RolloutEngine) if not m.startswith("_")]
    assert members and all(hasattr(SGLangHTTPEngine, m) for m in members)


def test_generate_over_http_equals_in_process_engine(engine, client):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, n=2, seed=7)
    local = engine.generate(PROMPTS, params)
    remote = client.generate(PROMPTS, params)
    assert len(remote) == len(PROMPTS) and all(len(g) == 2 for g in remote)
    for lg, rg in zip(local, remote, strict=True):
        for lc, rc in zip(lg, rg, strict=True):
            assert rc.token_ids == lc.token_ids
            assert rc.logprobs == lc.logprobs  # exact: JSON round-trips Python floats
            assert (rc.finish, rc.matched_stop, rc.text) == (lc.finish, lc.matched_stop, lc.text)
            assert (rc.prompt_tokens, rc.completion_tokens, rc.weight_version) == (
                lc.prompt_tokens,
                lc.completion_tokens,
                lc.weight_version,
            )


def test_score_over_http_equals_engine_score(engine, client):
    prompt, response = [5, 6, 7, 8], [9, 10, 11, 2, 40]
    assert torch.equal(client.score(prompt, response), engine.score(prompt, response))


def test_scoring_request_reports_input_token_logprobs_from_logprob_start_len(engine, server):
    ids = [5, 6, 7, 8, 9]
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
    status, out = post(server, "/generate", {**body, "logprob_start_len": 0})
    assert status == 200 and out["output_ids"] == []
    entries = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in entries] == ids and entries[0][0] is None
    assert [lp for lp, _, _ in entries[1:]] == engine.score(ids[:1], ids[1:]).tolist()
    assert post(server, "/generate", {**body, "logprob_start_len": 5})[0] == 400
    assert post(server, "/generate", {**body, "input_ids": [5, VOCAB], "logprob_start_len": 1})[0] == 400


# --------------------------------------------------------------------------------------- SGLang shapes


def test_one_prompt_with_n_1_answers_a_dict_else_a_flat_list_grouped_by_prompt(engine, server):
    sp = {"max_new_tokens": 4, "ignore_eos": True, "sampling_seed": 3}
    status, single = post(server, "/generate", {"input_ids": PROMPTS[0], "sampling_params": sp})
    assert status == 200 and isinstance(single, dict)
    assert set(single) == {"text", "output_ids", "meta_info"} and "output_token_logprobs" not in single["meta_info"]
    assert single["meta_info"]["finish_reason"] == {"type": "length", "length": 4}

    body = {"input_ids": PROMPTS[:2], "sampling_params": {**sp, "n": 3}, "return_logprob": True}
    status, flat = post(server, "/generate", body)
    assert status == 200 and isinstance(flat, list) and len(flat) == 6
    local = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, ignore_eos=True, n=3, seed=3))
    assert [r["output_ids"] for r in flat] == [c.token_ids for g in local for c in g]
    meta = flat[0]["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "weight_version"} <= set(meta)
    assert [t for _, t, _ in meta["output_token_logprobs"]] == flat[0]["output_ids"]
    assert [r["meta_info"]["prompt_tokens"] for r in flat] == [3, 3, 3, 5, 5, 5]
    assert len({r["meta_info"]["id"] for r in flat}) == 6

    status, batch_of_one = post(server, "/generate", {"input_ids": [PROMPTS[0]], "sampling_params": sp})
    assert status == 200 and isinstance(batch_of_one, list) and len(batch_of_one) == 1


def test_finish_reason_stop_reports_the_matched_token_id(engine, server):
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1, temperature=0.0))[0][0]
    first = greedy.token_ids[0]
    sp = {"max_new_tokens": 8, "temperature": 0.0, "stop_token_ids": [first]}
    status, out = post(server, "/generate", {"input_ids": PROMPTS[0], "sampling_params": sp})
    assert status == 200 and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert out["output_ids"] == [first]


def test_text_prompts_are_tokenized_by_the_engine_tokenizer(engine, server):
    sp = {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    status, out = post(server, "/generate", {"text": "abc", "sampling_params": sp})
    ids = engine.tokenizer.encode("abc")
    local = engine.generate([ids], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))[0][0]
    assert status == 200 and out["output_ids"] == local.token_ids and out["text"] == local.text


def test_abort_ends_in_flight_generation_with_finish_reason_abort(engine, client):
    result = {}
    params = SamplingParams(max_new_tokens=3000, ignore_eos=True, seed=0)
    before = engine.tokens_generated
    worker = threading.Thread(target=lambda: result.setdefault("out", client.generate([PROMPTS[1]], params)))
    worker.start()
    deadline = time.monotonic() + 20
    while engine.tokens_generated == before and time.monotonic() < deadline:  # decoding, not only in flight
        time.sleep(0.01)
    client.abort()
    worker.join(timeout=30)
    (c,) = result["out"][0]
    assert c.finish is SampleStatus.ABORTED and 0 < len(c.token_ids) < 3000


def _long_body(rid: str) -> dict:
    params = SamplingParams(max_new_tokens=3000, ignore_eos=True, seed=0)
    return {"input_ids": PROMPTS[1], "sampling_params": params.to_sglang(), "return_logprob": True, "rid": rid}


def _start(server, rids: list[str]) -> tuple[dict, list[threading.Thread]]:
    """Send a long /generate per rid, in order, each once the previous one is in the server's queue."""
    results: dict[str, tuple[int, object]] = {}
    threads = []
    for k, rid in enumerate(rids):
        t = threading.Thread(target=lambda r=rid: results.setdefault(r, post(server, "/generate", _long_body(r))))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 20
        while len(server.requests()) <= k and time.monotonic() < deadline:
            time.sleep(0.005)
    assert server.requests() == rids  # the first runs, the others queue behind it
    return results, threads


def _wait_decoding(engine, before: int) -> None:
    deadline = time.monotonic() + 20
    while engine.tokens_generated == before and time.monotonic() < deadline:
        time.sleep(0.005)


def test_abort_all_ends_the_running_request_and_every_queued_one(engine, server, client):
    before = engine.tokens_generated
    results, threads = _start(server, ["run", "queued-a", "queued-b"])
    _wait_decoding(engine, before)
    t0 = time.monotonic()
    client.abort()  # {"rid": "", "abort_all": true}
    for t in threads:
        t.join(timeout=30)
    assert time.monotonic() - t0 < 10 and server.requests() == []
    (status, running), *queued = (results[r] for r in ["run", "queued-a", "queued-b"])
    assert status == 200 and running["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(running["output_ids"]) < 3000 and running["meta_info"]["id"] == "run"
    for status, out in queued:  # never started: no tokens, answered at once
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort" and out["output_ids"] == []


def test_abort_by_rid_prefix_ends_only_matching_requests_and_an_empty_rid_ends_nothing(engine, server, client):
    before = engine.tokens_generated
    results, threads = _start(server, ["keep-0", "drop-1", "keep-2", "drop-3"])
    _wait_decoding(engine, before)
    assert post(server, "/abort_request", {"rid": ""})[0] == 200  # SGLang: no rid and no abort_all is a no-op
    assert server.requests() == ["keep-0", "drop-1", "keep-2", "drop-3"]
    assert post(server, "/abort_request", {"rid": "drop"})[0] == 200
    for r in ("drop-1", "drop-3"):
        threads[int(r[-1])].join(timeout=10)
        status, out = results[r]
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort" and out["output_ids"] == []
    assert server.requests() == ["keep-0", "keep-2"]  # the running one kept decoding, the other kept its place
    assert post(server, "/abort_request", {"rid": "keep-0"})[0] == 200  # the running one
    threads[0].join(timeout=30)
    assert 0 < len(results["keep-0"][1]["output_ids"]) < 3000
    deadline = time.monotonic() + 20  # keep-2 starts now; let it decode, then end it too
    while server.requests() != ["keep-2"] and time.monotonic() < deadline:
        time.sleep(0.005)
    _wait_decoding(engine, engine.tokens_generated)
    client.abort()
    threads[2].join(timeout=30)
    assert results["keep-2"][1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(results["keep-2"][1]["output_ids"]) > 0  # it ran after keep-0: it was never cancelled


@pytest.mark.parametrize("body", [{"rid": 3}, {"abort_all": "yes"}])
def test_abort_request_with_a_malformed_body_answers_400(server, body):
    assert post(server, "/abort_request", body)[0] == 400


def test_request_bodies_validate_against_sglang_schema(client):
    io_struct = pytest.importorskip("sglang.srt.managers.io_struct")
    params = SamplingParams(max_new_tokens=8, n=2, seed=1, stop=("x",), stop_token_ids=(3,))
    body = {"input_ids": PROMPTS, "sampling_params": params.to_sglang(), "return_logprob": True}
    io_struct.GenerateReqInput(**body, logprob_start_len=-1)


# ------------------------------------------------------------------------------------- contract errors


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": -1}},
        {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 40000}},
        {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": "8"}},
        {"input_ids": [5, 6], "sampling_params": {"temperature": -1.0}},
        {"input_ids": [5, 6], "sampling_params": {"frequency_penalty": 0.5}},
        {"input_ids": [5, 6], "sampling_params": {"no_such_key": 1}},
        {"input_ids": [5, 6], "sampling_params": [1]},
        {"input_ids": "abc"},
        {"input_ids": []},
        {"input_ids": [[5], []]},
        {"input_ids": [5, VOCAB + 10]},
        {"input_ids": [5], "text": "a"},
        {"input_ids": [5], "return_logprob": "yes"},
    ],
)
def test_contract_violations_answer_400_and_the_server_keeps_serving(server, client, body):
    status, out = post(server, "/generate", body)
    assert status == 400 and isinstance(out["error"], str)
    assert client.health()


def test_body_over_the_size_limit_answers_400(server, client):
    status, out = post(server, "/generate", b'{"input_ids": [' + b"5, " * (1 << 19) + b"5]}")
    assert status == 400 and "limit" in out["error"]
    assert client.health()


def test_client_raises_value_error_on_400(client):
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int in \[0, 32768\]"):
        client.generate([[5], [6]], SamplingParams(max_new_tokens=40000))


def test_unknown_route_answers_404(server):
    assert post(server, "/nope", {})[0] == 404


# ---------------------------------------------------------------------------------------- security


def test_every_endpoint_needs_the_api_key_when_one_is_set(engine, model_dir):
    srv = _serve(engine, model_dir, api_key=KEY)
    try:
        for path in ("/generate", "/flush_cache", "/update_weights_from_disk"):
            assert post(srv, path, {})[0] == 401
            assert post(srv, path, {}, {"Authorization": "Bearer wrong"})[0] == 401
        assert not SGLangHTTPEngine(srv.url).health()
        keyed = SGLangHTTPEngine(srv.url, api_key=KEY)
        assert keyed.health() and keyed.weight_version == engine.weight_version
        assert keyed.generate([[5, 6]], SamplingParams(max_new_tokens=2))[0][0].completion_tokens >= 1
    finally:
        srv.shutdown()


def test_disabled_weight_and_memory_endpoints_answer_403(engine, model_dir, other_dir):
    srv = _serve(engine, model_dir, allow_weight_updates=False)
    try:
        c = SGLangHTTPEngine(srv.url)
        for call in (lambda: c.load_from_disk(str(other_dir), 5), c.release_memory, c.resume_memory):
            with pytest.raises(EngineHTTPError) as err:
                call()
            assert err.value.status == 403
        assert c.weight_version == 0 and c.health()
    finally:
        srv.shutdown()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.1"])
def test_refuses_to_bind_beyond_loopback_without_an_api_key(engine, model_dir, host):
    with pytest.raises(ValueError, match="requires an API key"):
        RolloutServer(engine, ServeConfig(host=host, port=0))
    assert cli_main(["serve", str(model_dir), "--port", "0", "--host", host]) == 2


# ------------------------------------------------------------------------------ weights and memory


def test_load_from_disk_swaps_weights_and_bumps_the_version(model_dir, other_dir):
    eng = EmbeddedEngine(model_dir)
    srv = _serve(eng, model_dir)
    try:
        c = SGLangHTTPEngine(srv.url)
        prompt, response = [5, 6, 7], [8, 9, 10]
        c.load_from_disk(str(other_dir), 3)
        assert c.weight_version == 3
        assert torch.equal(c.score(prompt, response), EmbeddedEngine(other_dir).score(prompt, response))
        info = c._request("GET", "/get_model_info")
        assert info["model_path"] == str(other_dir)

        c.release_memory(["weights"])
        with pytest.raises(EngineHTTPError) as err:  # released weights: a state conflict, not a bad request
            c.generate([prompt], SamplingParams(max_new_tokens=2))
        assert err.value.status == 409
        c.resume_memory(["weights"])
        c.load_from_disk(str(model_dir), 4)
        assert torch.equal(c.score(prompt, response), EmbeddedEngine(model_dir).score(prompt, response))
        assert c.generate([prompt], SamplingParams(max_new_tokens=2))[0][0].weight_version == 4
        with pytest.raises(ValueError, match="safetensors"):
            c.load_from_disk(str(model_dir / "nope"), 5)
        c.flush_cache()
    finally:
        srv.shutdown()


def test_client_retries_connection_errors_then_reports_them():
    c = SGLangHTTPEngine("http://127.0.0.1:9", retries=2, backoff_s=0.01, timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="after 3 attempts"):
        c.generate([[5]], SamplingParams(max_new_tokens=2))
    assert time.monotonic() - t0 < 5 and not c.health()


def test_an_answer_cut_off_by_a_dying_server_is_a_connection_error_and_not_resent():
    """A server killed while answering leaves a body shorter than its Content-Length (IncompleteRead): health is
    False, and a request fails as a connection error at once (it may have acted: it is not sent again)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port, requests = listener.getsockname()[1], []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            requests.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 65\r\n\r\n{")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        client = SGLangHTTPEngine(f"http://127.0.0.1:{port}", retries=3, backoff_s=0.01, timeout_s=5)
        assert client.health() is False
        requests.clear()
        with pytest.raises(ConnectionError, match="the answer broke off"):
            client.flush_cache()
        assert len(requests) == 1
    finally:
        listener.close()


def test_a_generate_outlasting_the_timeout_on_a_live_server_is_waited_for_until_aborted(engine, server):
    """`timeout_s` bounds silence, not work: the server answers /health, so the client keeps waiting; abort ends it."""
    c = SGLangHTTPEngine(server.url, timeout_s=0.3, retries=3)
    out: list = []
    t = threading.Thread(
        target=lambda: out.append(c.generate([PROMPTS[1]], SamplingParams(max_new_tokens=3000, ignore_eos=True)))
    )
    t.start()
    deadline = time.monotonic() + 20
    while c.busy_probes < 3 and time.monotonic() < deadline:  # ~1 s: three timeouts' worth of silence
        time.sleep(0.05)
    assert c.busy_probes >= 3 and t.is_alive() and engine.in_flight
    c.abort()
    t.join(timeout=20)
    assert not t.is_alive() and out[0][0][0].finish == SampleStatus.ABORTED
    assert not engine.in_flight


def _silent_server() -> socket.socket:
    """A port that accepts connections (the kernel's backlog) and never answers: a SIGSTOPped server."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_a_generate_on_a_hung_server_fails_once_health_fails_too_and_is_not_retried():
    with _silent_server() as s:
        c = SGLangHTTPEngine(f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=0.3, retries=3)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"/generate: no answer in 0\.3s, and /health failed"):
            c.generate([PROMPTS[1]], SamplingParams(max_new_tokens=3))
        assert time.monotonic() - t0 < 3 and c.busy_probes == 0  # 0.3 s silence + a 0.3 s probe, no resend
        with pytest.raises(TimeoutError, match=r"/flush_cache: no answer in 0\.3s$"):  # other calls: plain timeout
            c.flush_cache()


def test_serve_command_serves_the_model(model_dir):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lcot_mega.cli", "serve", str(model_dir), "--port", str(port), "--api-key", KEY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = SGLangHTTPEngine(f"http://127.0.0.1:{port}", api_key=KEY, timeout_s=10)
        deadline = time.monotonic() + 60
        while not c.health() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.health(), proc.stderr.read().decode() if proc.poll() is not None else "no health within 60 s"
        assert c._request("GET", "/get_model_info")["model_path"] == str(model_dir)
        assert len(c.generate([[5, 6]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0][0].token_ids) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)
