"""A `RolloutEngine` that talks to an SGLang server (or our `rollout.server`) over its HTTP API.

Connection failures (refused, reset before an answer) are retried with exponential backoff, a bounded number of
times; a timeout is not retried (the server may still be working on the request). A 400 raises ValueError with
the server's message, other error statuses raise `EngineHTTPError`.

`timeout_s` bounds silence, not work. A `/generate` may rightly take far longer than any fixed limit: it waits its
turn behind the requests queued before it, and a 32k-token response takes minutes. So the client waits for a
generate answer as long as the server stays alive: after every `timeout_s` without an answer it asks `/health`,
and only a server that does not answer that probe either is hung (TimeoutError). Every other request (weight
loads, memory calls, `/health` itself) must be answered within `timeout_s`.

The client talks to the server directly over `http.client` (no HTTP proxy from the environment: rollout servers
live on the cluster's own network).
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lcot_mega.rollout.protocol import Completion, SamplingParams, decode_routed_experts
from lcot_mega.types import SampleStatus

_FINISH = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}
_PATIENT_PATHS = frozenset({"/generate"})  # waited for while the server answers /health (module docstring)


class _ServerHung(TimeoutError):
    """A generate answer is overdue and the server failed its /health probe."""


class EngineHTTPError(RuntimeError):
    """The server answered with an error status other than 400."""

    def __init__(self, status: int, path: str, message: str) -> None:
        super().__init__(f"{path}: HTTP {status}: {message}")
        self.status = status


def parse_weight_version(raw: Any) -> int:
    """SGLang reports weight_version as a string ("default" before any update); ours are ints."""
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def completion_from_sglang(result: dict[str, Any]) -> Completion:
    """A Completion from one SGLang `/generate` result (with `return_logprob=true`)."""
    meta = result["meta_info"]
    reason = meta.get("finish_reason") or {"type": "abort"}
    entries = meta.get("output_token_logprobs") or []
    ids = list(result.get("output_ids") or [t for _, t, _ in entries])
    prompt_tokens = int(meta.get("prompt_tokens", 0))
    routed = meta.get("routed_experts")
    if routed is not None:  # SGLang: every token the engine ran, the last sampled one excepted
        routed = decode_routed_experts(routed, prompt_tokens + len(ids) - 1)
    return Completion(
        token_ids=ids,
        logprobs=[float(lp) for lp, _, _ in entries],
        finish=_FINISH[reason["type"]],
        matched_stop=reason.get("matched"),
        text=result.get("text") or "",
        weight_version=parse_weight_version(meta.get("weight_version")),
        prompt_tokens=prompt_tokens,
        completion_tokens=int(meta.get("completion_tokens", len(ids))),
        routed_experts=routed,
    )


class SGLangHTTPEngine:
    """`RolloutEngine` over HTTP (SGLang `/generate` and friends).

    `tp_size` is the server's tensor-parallel size: `update_weights` sends one payload per rank. `flattened_bucket`
    sends a bucket whose tensors share one dtype as SGLang's "flattened_bucket" (one flat tensor), else as the plain
    list of (name, tensor) pairs."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        tp_size: int = 1,
        flattened_bucket: bool = True,
    ) -> None:
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be an int >= 1, got {tp_size!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout_s, self.retries, self.backoff_s = api_key, timeout_s, retries, backoff_s
        self.tp_size, self.flattened_bucket = tp_size, flattened_bucket
        self._update_lock = threading.Lock()
        self._spare_shm: torch.UntypedStorage | None = None  # buffer of the last answered tensor update
        self.busy_probes = 0
        """Health probes a slow /generate answer passed (the server was busy, not hung)."""

    # ------------------------------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        wait = timeout_s or self.timeout_s
        where = f"{method} {self.base_url}{path}"
        for attempt in range(self.retries + 1):
            try:
                status, raw = self._exchange(method, path, data, headers, wait, patient=path in _PATIENT_PATHS)
            except _ServerHung as e:
                raise TimeoutError(f"{where}: {e}") from None
            except TimeoutError:  # the server may still be working on it: never resend
                raise TimeoutError(f"{where}: no answer in {wait}s") from None
            except http.client.IncompleteRead as e:  # it died while answering: it may have acted, never resend
                raise ConnectionError(f"{where}: the answer broke off ({e!r})") from e
            except (OSError, http.client.RemoteDisconnected) as e:  # refused, reset, unreachable: nothing was answered
                if attempt == self.retries:
                    raise ConnectionError(f"{where}: {e!r} (after {self.retries + 1} attempts)") from e
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if status >= 400:
                raise _status_error(status, raw, path)
            return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()
        raise AssertionError("unreachable")

    def _exchange(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str], wait: float, patient: bool
    ) -> tuple[int, bytes]:
        """One request on a fresh connection: (status, body). `patient`: wait for the answer while /health answers."""
        url = urllib.parse.urlsplit(self.base_url + path)
        connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = connection(url.hostname or "localhost", url.port, timeout=wait)
        try:
            conn.request(method, url.path + (f"?{url.query}" if url.query else ""), body=data, headers=headers)
            if patient:
                self._await_answer(conn, wait)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _await_answer(self, conn: http.client.HTTPConnection, wait: float) -> None:
        """Block until the server starts answering on `conn`; after every `wait` seconds of silence probe /health,
        and give up (TimeoutError) only when the probe fails too: a busy server is not a hung one."""
        probes = 0
        while not select.select([conn.sock], [], [], wait)[0]:
            probes += 1
            if not self.health():
                raise _ServerHung(f"no answer in {wait * probes}s, and /health failed")
            self.busy_probes += 1

    # ----------------------------------------------------------------------------------------- protocol

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        prompts = [list(map(int, p)) for p in prompt_ids]
        if not prompts:
            return []
        body = {
            "input_ids": prompts,
            "sampling_params": params.to_sglang(),
            "return_logprob": True,
            "logprob_start_len": -1,
        }
        if params.return_routed_experts:
            body["return_routed_experts"] = True
        results = self._request("POST", "/generate", body)
        if isinstance(results, dict):
            results = [results]
        if len(results) != len(prompts) * params.n:
            raise RuntimeError(f"/generate returned {len(results)} results for {len(prompts)} x {params.n}")
        flat = [completion_from_sglang(r) for r in results]
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the first response token would have no context")
        response = list(map(int, response_ids))
        if not response:
            return torch.zeros(0)
        body = {
            "input_ids": list(map(int, prompt_ids)) + response,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": len(prompt_ids),
        }
        result = self._request("POST", "/generate", body)
        entries = result["meta_info"]["input_token_logprobs"][-len(response) :]
        if [t for _, t, _ in entries] != response:
            raise RuntimeError("/generate input_token_logprobs do not line up with the response tokens")
        return torch.tensor([float(lp) for lp, _, _ in entries])

    def abort(self) -> None:
        self._request("POST", "/abort_request", {"rid": "", "abort_all": True})

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load full HF-named tensors as `version` through `/update_weights_from_tensor` (colocated: the server must
        run on this host, since the tensors travel through shared memory and only their handles through HTTP).
        An empty update only moves the version. A refused update raises ValueError (400) or EngineHTTPError."""
        from lcot_mega.rollout.tensor_ipc import dumps_named_tensors

        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        path = "/update_weights_from_tensor"
        with self._update_lock:  # one update at a time: they share the spare buffer
            spare, self._spare_shm = self._spare_shm, None  # never reused after a failed or unanswered update
            payload = dumps_named_tensors(named_tensors, ranks=self.tp_size, flatten=self.flattened_bucket, reuse=spare)
            body = {
                "serialized_named_tensors": payload.entries,
                "load_format": payload.load_format,
                "flush_cache": True,
                "abort_all_requests": False,
                "weight_version": str(version),
            }
            _check_success(self._request("POST", path, body), path)
            # answered: the server has copied the tensors, so the buffer may be written again
            self._spare_shm = payload.buffer if payload.buffer is not None else spare

    def load_from_disk(self, path: str, version: int) -> None:
        """Load an HF checkpoint directory on the server (`/update_weights_from_disk`) as `version`."""
        body = {"model_path": str(path), "weight_version": str(version)}
        result = self._request("POST", "/update_weights_from_disk", body)
        if isinstance(result, dict) and not result.get("success", False):
            raise RuntimeError(f"/update_weights_from_disk failed: {result.get('message')}")

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Ask the server to join a weight-update process group at rank `rank_offset` (`/init_weights_update_group`).

        Blocks until every rank has joined: the trainer (rank 0) must create its side concurrently (a thread)."""
        body = {
            "master_address": master_address,
            "master_port": int(master_port),
            "rank_offset": int(rank_offset),
            "world_size": int(world_size),
            "group_name": group_name,
            "backend": backend,
        }
        _check_success(self._request("POST", "/init_weights_update_group", body), "/init_weights_update_group")

    def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str = "weight_update_group",
        weight_version: int | None = None,
        *,
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> None:
        """Announce tensors the trainer is about to broadcast from rank 0 (`/update_weights_from_distributed`);
        `weight_version` None keeps the server's version. Returns only once the server has received and loaded
        them, so call it from a thread and broadcast meanwhile (`lcot_mega.weight_sync.broadcast.BroadcastSync`).
        `load_format` "flattened_bucket": the tensors (of one dtype) come as one broadcast of their concatenation."""
        body = {
            "names": list(names),
            "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
            "shapes": [list(map(int, s)) for s in shapes],
            "group_name": group_name,
            "flush_cache": flush_cache,
            "weight_version": None if weight_version is None else str(weight_version),
            "load_format": load_format,
        }
        path = "/update_weights_from_distributed"
        _check_success(self._request("POST", path, body), path)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        body = {"group_name": group_name}
        _check_success(self._request("POST", "/destroy_weights_update_group", body), "/destroy_weights_update_group")

    @property
    def weight_version(self) -> int:
        return parse_weight_version(self._request("GET", "/get_model_info").get("weight_version"))

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        self._request("POST", "/release_memory_occupation", {"tags": None if tags is None else list(tags)})

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        self._request("POST", "/resume_memory_occupation", {"tags": None if tags is None else list(tags)})

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache", {})

    def health(self) -> bool:
        try:
            self._request("GET", "/health", timeout_s=min(self.timeout_s, 10.0))
        except (ConnectionError, TimeoutError, EngineHTTPError):
            return False
        return True

    def shutdown(self) -> None:
        """The server outlives its clients: nothing to close."""


def _check_success(result: Any, path: str) -> None:
    if isinstance(result, dict) and not result.get("success", False):
        raise RuntimeError(f"{path} failed: {result.get('message')}")


def _status_error(status: int, raw: bytes, path: str) -> Exception:
    try:
        message = json.loads(raw).get("error", raw.decode(errors="replace"))
    except (ValueError, AttributeError):
        message = raw.decode(errors="replace")
    if status == 400:
        return ValueError(f"{path}: {message}")
    return EngineHTTPError(status, path, message)
