"""The contract every rollout backend implements, shaped after SGLang's HTTP API (see DESIGN.md).

`RolloutEngine.generate` is SGLang's `/generate` with `return_logprob=True` and `logprob_start_len=-1`;
`update_weights` is `/update_weights_from_tensor` (HF parameter names, full tensors); `release_memory` /
`resume_memory` are `/release_memory_occupation` / `/resume_memory_occupation`; `abort` is `/abort_request`
for everything in flight. The driver talks to engines only through this protocol.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from lcot_mega.rollout.sampling import check_sampling_args
from lcot_mega.types import Prompt, Sample, SampleStatus

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""Tags of `release_memory` / `resume_memory`, as SGLang names them; None means all."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one `generate` call (SGLang `sampling_params`, same defaults except n)."""

    max_new_tokens: int = 128
    """Response length limit; a response that reaches it ends TRUNCATED."""
    temperature: float = 1.0
    """Logits are divided by it before any truncation; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 keeps the full distribution."""
    top_k: int = -1
    """Keep only the k most probable tokens; -1 is off."""
    min_p: float = 0.0
    """Keep tokens with p >= min_p * p_max; 0 is off."""
    n: int = 1
    """Samples per prompt (the group size G)."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded response; the match is cut from `Completion.text`."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a response (kept in `token_ids`, like EOS)."""
    ignore_eos: bool = False
    """Do not stop on the model's EOS ids (explicit `stop`/`stop_token_ids` still apply)."""
    seed: int | None = None
    """Base seed of per-sample random streams (SGLang `sampling_seed`); None draws from the engine's RNG."""
    return_routed_experts: bool = False
    """A mixture of experts: report the experts each token was routed to (`Completion.routed_experts`). SGLang takes
    it beside `sampling_params`, not inside (`return_routed_experts`, with the server's
    `--enable-return-routed-experts`)."""

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples, so the dataclass stays hashable and immutable.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")

    def to_sglang(self) -> dict[str, Any]:
        """The `sampling_params` object of an SGLang `/generate` request."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "n": self.n,
            "ignore_eos": self.ignore_eos,
        }
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


@dataclass
class Completion:
    """One sampled response, as SGLang's `/generate` reports it (`output_ids` + `meta_info`)."""

    token_ids: list[int]
    logprobs: list[float]
    """Per token: log-prob of the sampled token under the distribution it was drawn from (temperature-scaled
    and, when top-p/top-k/min-p truncate, renormalized over the kept tokens); 0 for every greedy token."""
    finish: SampleStatus
    """COMPLETED on EOS / stop id / stop string, TRUNCATED on max_new_tokens, ABORTED when cancelled."""
    matched_stop: str | int | None = None
    """The stop string or token id that ended the response (SGLang `finish_reason.matched`)."""
    text: str = ""
    """Decoded response without special tokens and without the matched stop ("" without a tokenizer)."""
    weight_version: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = field(default=-1)
    """Defaults to len(token_ids)."""
    routed_experts: torch.Tensor | None = None
    """With `SamplingParams.return_routed_experts`: the top-k experts of every MoE layer for each token the engine
    ran, [prompt_tokens + len(token_ids) - 1, layers * top_k] int32 (token-major, then layer, then slot: SGLang's
    `meta_info["routed_experts"]`; the last sampled token never went through the model)."""

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        if self.routed_experts is not None and self.routed_experts.dim() != 2:
            raise ValueError(f"routed_experts must be [tokens, layers * top_k], got {tuple(self.routed_experts.shape)}")
        if self.completion_tokens < 0:
            self.completion_tokens = len(self.token_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    """A rollout backend: the embedded transformers engine, SGLang servers, vLLM."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample `params.n` responses per prompt; outer list in prompt order, inner the n samples."""
        ...

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced log-probs [len(response_ids)] of `response_ids` after `prompt_ids` (temperature 1, no
        truncation), under the weights now loaded. SGLang: `/generate` with `max_new_tokens=0`,
        `return_logprob=True`, `logprob_start_len` at the prompt's end, read `input_token_logprobs`."""
        ...

    def abort(self) -> None:
        """Make in-flight generation return promptly; unfinished samples come back ABORTED with their tokens
        so far. A no-op when nothing is in flight."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load full tensors under HF parameter names (any subset); then `weight_version == version`.
        Unknown names or wrong shapes raise ValueError."""
        ...

    @property
    def weight_version(self) -> int:
        """Version of the weights now loaded; every Completion carries the version that produced it."""
        ...

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free the memory of `tags` (MEMORY_TAGS; None = all) while the trainer needs it. Idle engines only."""
        ...

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what `release_memory` freed; released weights must be loaded again before generating."""
        ...

    def flush_cache(self) -> None:
        """Drop cached prefixes (stale after a weight update)."""
        ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...


def check_memory_tags(tags: Sequence[str] | None) -> tuple[str, ...]:
    """`tags` validated against MEMORY_TAGS; None -> all of them."""
    if tags is None:
        return MEMORY_TAGS
    if isinstance(tags, str):
        tags = [tags]
    bad = [t for t in tags if t not in MEMORY_TAGS]
    if bad:
        raise ValueError(f"unknown memory tag(s) {bad}; allowed: {list(MEMORY_TAGS)}")
    return tuple(tags)


def encode_routed_experts(routed: torch.Tensor) -> str:
    """`Completion.routed_experts` as SGLang sends it in `meta_info["routed_experts"]`: the int32 values, flattened
    token-major, base64-encoded (no shape: the reader knows the tokens)."""
    return base64.b64encode(routed.to(torch.int32).contiguous().numpy().tobytes()).decode("ascii")


def decode_routed_experts(text: str, tokens: int) -> torch.Tensor:
    """The inverse of `encode_routed_experts` for a response whose engine ran `tokens` tokens: [tokens, layers * k]."""
    flat = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.int32)
    if tokens <= 0 or flat.numel() % tokens:
        raise ValueError(f"routed_experts holds {flat.numel()} values: not a whole number for each of {tokens} tokens")
    return flat.reshape(tokens, -1)


def to_samples(prompt: Prompt, completions: Sequence[Completion]) -> list[Sample]:
    """The stage contract for one prompt's completions (the samples of one `Group`)."""
    return [
        Sample(
            prompt=prompt,
            response_ids=list(c.token_ids),
            response_text=c.text,
            rollout_logprobs=list(c.logprobs),
            status=c.finish,
            weight_version=c.weight_version,
            routed_experts=c.routed_experts,
        )
        for c in completions
    ]
