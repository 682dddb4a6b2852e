"""Serve any `RolloutEngine` over HTTP with the subset of SGLang's API the trainer uses (same JSON shapes).

Endpoints: `POST /generate` (sampling, and teacher-forced scoring with `max_new_tokens: 0`), `GET /health`,
`GET /get_model_info`, `POST /flush_cache`, `POST /abort_request`, `POST /release_memory_occupation`,
`POST /resume_memory_occupation`, `POST /update_weights_from_disk`, the colocated update
(`POST /update_weights_from_tensor`: tensors in the sender's shared memory, handles in the body, see
`lcot_mega.rollout.tensor_ipc`; same host only) and the distributed update (`POST /init_weights_update_group`,
`/update_weights_from_distributed`, `/destroy_weights_update_group`: the trainer broadcasts the tensors from rank 0
of a process group, see `lcot_mega.weight_sync.broadcast`). Contract
violations answer 400 `{"error": ...}`; engine state conflicts (released weights, busy engine) 409; a bug in
the engine 500. The server keeps running after any of them.

Generate requests run one at a time, first come first served (the engine has one decode loop); each has a rid (the
request's own, else a fresh one). `/abort_request` ends queued ones at once and the running one at its next decode
step, as SGLang does (`abort_all`, or every request whose rid starts with `rid`).

Security: binding a non-loopback address requires an API key; with a key every endpoint needs
`Authorization: Bearer KEY` (401 otherwise). Weight and memory endpoints can be switched off (403).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lcot_mega.rollout.protocol import Completion, RolloutEngine, SamplingParams, encode_routed_experts
from lcot_mega.types import SampleStatus

log = logging.getLogger(__name__)

# SGLang sampling keys we accept only at their default value (anything else would be silently ignored).
_DEFAULT_ONLY_KEYS: dict[str, Any] = {
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "no_stop_trim": False,
    "min_new_tokens": 0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
}
_SAMPLING_KEYS = {
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "n": "n",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "sampling_seed": "seed",
}
_FINISH_TYPES = {SampleStatus.COMPLETED: "stop", SampleStatus.TRUNCATED: "length", SampleStatus.ABORTED: "abort"}
# A too-large body is drained (so the client reads our 400 instead of a reset) up to this multiple of the limit.
_DRAIN_FACTOR = 16


@dataclass
class ServeConfig:
    """How `RolloutServer` listens and what it allows."""

    host: str = "127.0.0.1"
    """Address to bind; anything but a loopback address requires `api_key`."""
    port: int = 30000
    """TCP port; 0 picks a free one (read it back from `RolloutServer.port`)."""
    api_key: str | None = None
    """When set, every request needs `Authorization: Bearer <api_key>`."""
    allow_weight_updates: bool = True
    """False answers 403 on every weight-update and memory endpoint (a tensor payload is then never opened)."""
    max_body_bytes: int = 64 << 20
    """Request bodies above this answer 400."""
    max_new_tokens_limit: int = 32768
    """Largest `max_new_tokens` a request may ask for."""
    max_n: int = 1024
    """Largest `n` a request may ask for."""


class HTTPError(Exception):
    """An answer other than 200, raised inside a handler: `status` and the `{"error": message}` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class _Ticket:
    """One `/generate` request, queued or running; `rids` are what `/abort_request` matches (by prefix)."""

    rids: list[str]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def matches(self, rid: str) -> bool:
        return any(r.startswith(rid) for r in self.rids)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose an engine beyond this machine without authentication."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"binding {host!r} (not loopback) requires an API key: pass --api-key, or use 127.0.0.1")


# ------------------------------------------------------------------------------------------ request parsing


def _sampling_params(raw: Any, cfg: ServeConfig) -> tuple[dict[str, Any], int]:
    """SamplingParams kwargs from SGLang `sampling_params`, and max_new_tokens (0 = scoring request)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HTTPError(400, f"sampling_params must be an object, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SAMPLING_KEYS:
            if value is not None:
                kwargs[_SAMPLING_KEYS[key]] = value
        elif key in _DEFAULT_ONLY_KEYS:
            if value is not None and value != _DEFAULT_ONLY_KEYS[key]:
                raise HTTPError(400, f"sampling_params.{key}={value!r} is not supported (only the default)")
        else:
            raise HTTPError(400, f"unknown sampling_params key {key!r}; allowed: {sorted(_SAMPLING_KEYS)}")
    max_new = kwargs.get("max_new_tokens", SamplingParams.max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 0 <= max_new <= cfg.max_new_tokens_limit:
        raise HTTPError(400, f"max_new_tokens must be an int in [0, {cfg.max_new_tokens_limit}], got {max_new!r}")
    n = kwargs.get("n", 1)
    if isinstance(n, int) and n > cfg.max_n:
        raise HTTPError(400, f"n must be <= {cfg.max_n}, got {n}")
    return kwargs, max_new


def _is_id_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompts(body: dict[str, Any], engine: RolloutEngine) -> tuple[list[list[int]], bool]:
    """Prompt token ids from `input_ids` or `text`, and whether the request named a single prompt."""
    if ("input_ids" in body) == ("text" in body):
        raise HTTPError(400, "give exactly one of input_ids and text")
    if "input_ids" in body:
        ids = body["input_ids"]
        if _is_id_list(ids) and ids:
            return [ids], True
        if isinstance(ids, list) and ids and all(_is_id_list(p) and p for p in ids):
            return ids, False
        raise HTTPError(400, "input_ids must be a non-empty list of ints or a non-empty list of such lists")
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise HTTPError(400, "text prompts need a tokenizer and this model has none; send input_ids")
    text = body["text"]
    if isinstance(text, str):
        return [tokenizer.encode(text)], True
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        return [tokenizer.encode(t) for t in text], False
    raise HTTPError(400, "text must be a string or a non-empty list of strings")


def _rids(body: dict[str, Any], count: int) -> list[str] | None:
    """SGLang's `rid`: one string, or one per prompt of a batch; None when the request names none."""
    rid = body.get("rid")
    if rid is None:
        return None
    if isinstance(rid, str) and rid:
        return [rid]
    if isinstance(rid, list) and len(rid) == count and all(isinstance(r, str) and r for r in rid):
        return rid
    raise HTTPError(400, f"rid must be a non-empty string or a list of {count} such strings, got {rid!r}")


def _logprob_start(body: dict[str, Any], length: int) -> int:
    start = body.get("logprob_start_len", -1)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < length:
        raise HTTPError(400, f"scoring (max_new_tokens=0) needs logprob_start_len in [0, {length}), got {start!r}")
    return start


# ----------------------------------------------------------------------------------------- response shapes


def _finish_reason(c: Completion) -> dict[str, Any]:
    kind = _FINISH_TYPES[c.finish]
    if kind == "stop":
        return {"type": "stop", "matched": c.matched_stop}
    if kind == "length":
        return {"type": "length", "length": c.completion_tokens}
    return {"type": "abort", "message": "aborted"}


def completion_to_sglang(c: Completion, *, return_logprob: bool) -> dict[str, Any]:
    """One SGLang `/generate` result for a Completion."""
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "finish_reason": _finish_reason(c),
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "cached_tokens": 0,
        "weight_version": c.weight_version,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
    if c.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(c.routed_experts)
    return {"text": c.text, "output_ids": list(c.token_ids), "meta_info": meta}


# ----------------------------------------------------------------------------------------------- server


class RolloutServer:
    """An engine behind SGLang-compatible HTTP endpoints; `start()` serves from a daemon thread."""

    def __init__(self, engine: RolloutEngine, config: ServeConfig | None = None, *, model_path: str = "") -> None:
        self.engine, self.config, self.model_path = engine, config or ServeConfig(), model_path
        check_bind(self.config.host, self.config.api_key)
        self._weights_lock = threading.Lock()
        self._queue: deque[_Ticket] = deque()  # generate requests in arrival order; the head runs
        self._queue_cond = threading.Condition()
        self._groups: dict[str, Any] = {}  # group_name -> sync.broadcast.WeightGroup
        self._groups_lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((self.config.host, self.config.port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any]], Any]] = {
            ("GET", "/health"): self._health,
            ("GET", "/get_model_info"): self._model_info,
            ("POST", "/generate"): self._generate,
            ("POST", "/flush_cache"): self._flush_cache,
            ("POST", "/abort_request"): self._abort,
            ("POST", "/release_memory_occupation"): self._release,
            ("POST", "/resume_memory_occupation"): self._resume,
            ("POST", "/update_weights_from_disk"): self._update_from_disk,
            ("POST", "/update_weights_from_tensor"): self._update_from_tensor,
            ("POST", "/init_weights_update_group"): self._init_group,
            ("POST", "/update_weights_from_distributed"): self._update_from_distributed,
            ("POST", "/destroy_weights_update_group"): self._destroy_group,
        }
        self.protected = {
            "/release_memory_occupation",
            "/resume_memory_occupation",
            "/update_weights_from_disk",
            "/update_weights_from_tensor",
            "/init_weights_update_group",
            "/update_weights_from_distributed",
            "/destroy_weights_update_group",
        }

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}"

    def requests(self) -> list[str]:
        """First rid of every generate request now running (first) or queued, in order."""
        with self._queue_cond:
            return [t.rids[0] for t in self._queue]

    def start(self) -> RolloutServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rollout-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def shutdown(self) -> None:
        self._abort({"abort_all": True})
        with self._groups_lock:
            groups, self._groups = list(self._groups.values()), {}
        for group in groups:
            group.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------ handlers

    def _health(self, body: dict[str, Any]) -> Any:
        if not self.engine.health():
            raise HTTPError(503, "engine unhealthy")
        return {}

    def _model_info(self, body: dict[str, Any]) -> Any:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path if getattr(self.engine, "tokenizer", None) is not None else None,
            "is_generation": True,
            "weight_version": self.engine.weight_version,
        }

    def _generate(self, body: dict[str, Any]) -> Any:
        kwargs, max_new = _sampling_params(body.get("sampling_params"), self.config)
        prompts, single = _prompts(body, self.engine)
        return_logprob = body.get("return_logprob", False)
        if not isinstance(return_logprob, bool):
            raise HTTPError(400, f"return_logprob must be a bool, got {return_logprob!r}")
        if max_new == 0:
            results = [self._score_one(p, body, return_logprob) for p in prompts]
            return results[0] if single else results
        start = body.get("logprob_start_len", -1)
        if start not in (-1, None):
            raise HTTPError(400, "logprob_start_len must be -1 when generating (input log-probs: max_new_tokens=0)")
        routed = body.get("return_routed_experts", False)
        if not isinstance(routed, bool):
            raise HTTPError(400, f"return_routed_experts must be a bool, got {routed!r}")
        try:
            params = SamplingParams(**kwargs, return_routed_experts=routed)
        except (TypeError, ValueError) as e:
            raise HTTPError(400, f"sampling_params: {e}") from e
        rids = _rids(body, len(prompts))
        groups = self._run_queued(_Ticket(rids or [uuid.uuid4().hex]), prompts, params)
        flat = [completion_to_sglang(c, return_logprob=return_logprob) for g in groups for c in g]
        if rids is not None:  # SGLang reports the request's rid as the result's id
            for k, result in enumerate(flat):
                result["meta_info"]["id"] = rids[min(k // params.n, len(rids) - 1)]
        return flat[0] if single and params.n == 1 else flat

    def _run_queued(self, ticket: _Ticket, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Generate when `ticket` reaches the head of the queue (the engine runs one call at a time, first come
        first served); a ticket cancelled while it waits answers at once, every sample ABORTED and empty."""
        with self._queue_cond:
            self._queue.append(ticket)
            self._queue_cond.wait_for(lambda: self._queue[0] is ticket or ticket.cancelled.is_set())
            cancelled = ticket.cancelled.is_set()
            if cancelled:
                self._queue.remove(ticket)
                self._queue_cond.notify_all()
        if cancelled:
            version = self.engine.weight_version
            return [[_aborted(p, version) for _ in range(params.n)] for p in prompts]
        try:
            return self.engine.generate(prompts, params)
        finally:
            with self._queue_cond:
                self._queue.remove(ticket)
                self._queue_cond.notify_all()

    def _score_one(self, ids: list[int], body: dict[str, Any], return_logprob: bool) -> dict[str, Any]:
        """SGLang's prefill-only answer: `input_token_logprobs[k]` is the log-prob of token `start + k` given
        the tokens before it (None for token 0, which has no context)."""
        if not return_logprob:
            raise HTTPError(400, "max_new_tokens=0 is a scoring request: set return_logprob=true")
        start = _logprob_start(body, len(ids))
        vocab = getattr(self.engine, "vocab_size", None)
        if vocab is not None and not 0 <= min(ids) <= max(ids) < vocab:
            raise HTTPError(400, f"input_ids outside [0, {vocab})")
        first = max(start, 1)
        logps = self.engine.score(ids[:first], ids[first:]).tolist()
        entries = [[None, ids[0], None]] if start == 0 else []
        entries += [[lp, t, None] for lp, t in zip(logps, ids[first:], strict=True)]
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": {"type": "length", "length": 0},
            "prompt_tokens": len(ids),
            "completion_tokens": 0,
            "cached_tokens": 0,
            "weight_version": self.engine.weight_version,
            "input_token_logprobs": entries,
            "output_token_logprobs": [],
        }
        return {"text": "", "output_ids": [], "meta_info": meta}

    def _flush_cache(self, body: dict[str, Any]) -> Any:
        self.engine.flush_cache()
        return {"success": True}

    def _abort(self, body: dict[str, Any]) -> Any:
        """SGLang's semantics: `abort_all` ends every generate request, queued or running; else `rid` ends those
        whose rid starts with it; an empty rid without `abort_all` ends nothing. Queued requests answer at once
        (ABORTED, no tokens); the running one stops at its next decode step with the tokens it has."""
        rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
        if not isinstance(rid, str) or not isinstance(abort_all, bool):
            raise HTTPError(400, f"rid must be a string and abort_all a bool, got {rid!r} and {abort_all!r}")
        if not abort_all and not rid:
            return {"success": True, "message": "nothing aborted: give a rid or abort_all=true"}
        with self._queue_cond:
            hit = [t for t in self._queue if abort_all or t.matches(rid)]
            running = bool(self._queue) and self._queue[0] in hit
            for t in hit:
                t.cancelled.set()
            self._queue_cond.notify_all()
        if running:
            self.engine.abort()
        return {"success": True, "message": f"aborted {len(hit)} request(s)"}

    def _tags(self, body: dict[str, Any]) -> list[str] | None:
        tags = body.get("tags")
        if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            raise HTTPError(400, f"tags must be null or a list of strings, got {tags!r}")
        return tags

    def _release(self, body: dict[str, Any]) -> Any:
        self.engine.release_memory(self._tags(body))
        return {"success": True}

    def _resume(self, body: dict[str, Any]) -> Any:
        self.engine.resume_memory(self._tags(body))
        return {"success": True}

    def _update_from_disk(self, body: dict[str, Any]) -> Any:
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise HTTPError(400, "model_path must be a non-empty string")
        version = _weight_version(body.get("weight_version"), self.engine.weight_version + 1)
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
        if not files:
            raise HTTPError(400, f"model_path {path!r} is not a directory with *.safetensors files")
        with self._weights_lock:
            self.engine.update_weights(_read_safetensors(files), version)
            self.model_path = path
        return {"success": True, "message": f"loaded {path} as weight version {version}", "num_paused_requests": 0}

    def _update_from_tensor(self, body: dict[str, Any]) -> Any:
        """SGLang's colocated update: entry r of `serialized_named_tensors` is tensor-parallel rank r's payload (this
        server is one rank); the tensors are mapped from the sender's shared memory and copied into the engine."""
        from lcot_mega.rollout.tensor_ipc import LOAD_FORMATS, loads_named_tensors

        entries = body.get("serialized_named_tensors")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise HTTPError(400, "serialized_named_tensors must be a list of base64 strings (one per TP rank)")
        if len(entries) != 1:
            raise HTTPError(400, f"serialized_named_tensors has {len(entries)} entries; this server has 1 TP rank")
        load_format = body.get("load_format")
        if load_format not in LOAD_FORMATS:
            raise HTTPError(400, f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
        flush, abort_all = body.get("flush_cache", True), body.get("abort_all_requests", False)
        if not isinstance(flush, bool) or not isinstance(abort_all, bool):
            raise HTTPError(400, "flush_cache and abort_all_requests must be booleans")
        version = _weight_version(body.get("weight_version"), self.engine.weight_version)
        if abort_all:
            self._abort({"abort_all": True})
        with self._weights_lock:
            named = loads_named_tensors(entries[0], load_format)  # PayloadError (a ValueError): 400
            self.engine.update_weights(named, version)  # copies: the sender may free its buffer once we answer
        if flush:
            self.engine.flush_cache()
        return {"success": True, "message": f"loaded {len(named)} tensors; weight version {version}"}

    def _init_group(self, body: dict[str, Any]) -> Any:
        from lcot_mega.weight_sync.broadcast import WeightGroup

        addr, port, offset, world = (
            body.get(k) for k in ("master_address", "master_port", "rank_offset", "world_size")
        )
        name, backend = body.get("group_name", "weight_update_group"), body.get("backend", "nccl")
        if not isinstance(addr, str) or not addr:
            raise HTTPError(400, "master_address must be a non-empty string")
        for key, value in (("master_port", port), ("rank_offset", offset), ("world_size", world)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HTTPError(400, f"{key} must be a non-negative int, got {value!r}")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "group_name must be a non-empty string")
        if backend not in ("gloo", "nccl"):
            raise HTTPError(400, f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if not 1 <= offset < world:  # rank 0 is the trainer (this server has one tensor-parallel rank)
            raise HTTPError(400, f"rank_offset must be in [1, world_size={world}), got {offset}")
        with self._groups_lock:
            if name in self._groups:
                raise HTTPError(409, f"weight update group {name!r} already exists; destroy it first")
            self._groups[name] = None  # reserved while joining (the constructor waits for every rank)
        try:
            group = WeightGroup(addr, port, offset, world, name, backend)
        except Exception as e:
            with self._groups_lock:
                self._groups.pop(name, None)
            raise HTTPError(500, f"could not join weight update group {name!r}: {type(e).__name__}: {e}") from e
        with self._groups_lock:
            self._groups[name] = group
        return {"success": True, "message": f"joined {name!r} as rank {offset} of {world}"}

    def _group(self, body: dict[str, Any]) -> Any:
        name = body.get("group_name", "weight_update_group")
        with self._groups_lock:
            group = self._groups.get(name) if isinstance(name, str) else None
        if group is None:
            raise HTTPError(400, f"no weight update group {name!r}; call /init_weights_update_group first")
        return group

    def _update_from_distributed(self, body: dict[str, Any]) -> Any:
        from lcot_mega.rollout.tensor_ipc import FLATTENED_BUCKET
        from lcot_mega.weight_sync.broadcast import parse_dtype

        group = self._group(body)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise HTTPError(400, "names, dtypes and shapes must be lists")
        if not len(names) == len(dtypes) == len(shapes):
            raise HTTPError(400, f"names, dtypes, shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
        if not all(isinstance(n, str) for n in names):
            raise HTTPError(400, "names must be strings")
        if not all(_is_id_list(s) and min(s, default=0) >= 0 for s in shapes):
            raise HTTPError(400, "shapes must be lists of non-negative ints")
        load_format = body.get("load_format")
        if load_format not in (None, "direct", FLATTENED_BUCKET):
            raise HTTPError(400, f"load_format {load_format!r} is not supported (null or {FLATTENED_BUCKET!r})")
        torch_dtypes = [parse_dtype(d) for d in dtypes]
        flat = load_format == FLATTENED_BUCKET
        if flat and len(set(torch_dtypes)) > 1:
            raise HTTPError(400, f"a {FLATTENED_BUCKET} holds tensors of one dtype, got {sorted(set(dtypes))}")
        version = _weight_version(body.get("weight_version"), self.engine.weight_version)
        with self._weights_lock:
            tensors = group.receive(torch_dtypes, shapes, flat=flat)  # the trainer is broadcasting: receive first
            self.engine.update_weights(list(zip(names, tensors, strict=True)), version)
        if body.get("flush_cache", True):
            self.engine.flush_cache()
        return {"success": True, "message": f"received {len(names)} tensors; weight version {version}"}

    def _destroy_group(self, body: dict[str, Any]) -> Any:
        name = body.get("group_name", "weight_update_group")
        self._group(body)
        with self._groups_lock:
            group = self._groups.pop(name)
        group.close()
        return {"success": True, "message": f"left {name!r}"}


def _aborted(prompt: list[int], version: int) -> Completion:
    return Completion([], [], SampleStatus.ABORTED, weight_version=version, prompt_tokens=len(prompt))


def _weight_version(raw: Any, default: int) -> int:
    """SGLang sends weight_version as a string; ours are ints."""
    if raw is None:
        return default
    try:
        if isinstance(raw, bool):
            raise ValueError
        return int(raw)
    except (TypeError, ValueError):
        raise HTTPError(400, f"weight_version must be an int (or a string of one), got {raw!r}") from None


def _read_safetensors(files: list[Path]):
    from safetensors import safe_open

    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, st.get_tensor(name)


# ---------------------------------------------------------------------------------------------- handler


def _make_handler(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    owner: RolloutServer
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may stall while sending a request; does not bound generation

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            self._check_auth()
            body = self._read_body() if method == "POST" else {}
            route = self.owner.routes.get((method, path))
            if route is None:
                raise HTTPError(404, f"no route {method} {path}")
            if path in self.owner.protected and not self.owner.config.allow_weight_updates:
                raise HTTPError(403, f"{path} is disabled on this server (--disable-weight-updates)")
            self._send(200, route(body))
        except HTTPError as e:
            self._send(e.status, {"error": str(e)})
        except ValueError as e:
            self._send(400, {"error": str(e)})
        except RuntimeError as e:
            self._send(409, {"error": str(e)})
        except Exception as e:
            log.exception("error serving %s %s", method, path)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def _check_auth(self) -> None:
        key = self.owner.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)")

    def _read_body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(400, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, "bad Content-Length") from None
        limit = self.owner.config.max_body_bytes
        if length > limit:
            self._drain(length, limit)
            raise HTTPError(400, f"request body of {length} bytes is over the {limit}-byte limit")
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"body must be a JSON object, got {type(body).__name__}")
        return body

    def _drain(self, length: int, limit: int) -> None:
        """Read and drop a too-large body, so the client sees our 400; beyond reason, just hang up."""
        if length > _DRAIN_FACTOR * limit:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
