"""Token sampling as pure tensor functions: the processed distribution and a draw from it.

`process_logits` returns the log-probs of the distribution a token is ACTUALLY drawn from, so the log-prob a
rollout reports for its token is exactly the one of the policy that produced it (the behaviour policy of the
importance ratio). Order of the processors as in SGLang and vLLM: temperature, top-k, top-p, min-p. Each
truncation acts on the distribution the previous one left (renormalized), as in vLLM's sampler; SGLang's torch
fallback applies top-p to the distribution before top-k renormalization, which keeps a different nucleus only
when both are set.
"""

from __future__ import annotations

import math

import torch

_BLOCK = 256  # tokens per block of the two-level CDF in `sample`
_FIRST_NUCLEUS = 64  # first prefix tried for top-p without top-k


def check_sampling_args(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    """Raise ValueError naming the argument when a sampling setting is out of range."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k == 0 or top_k < -1:
        raise ValueError(f"top_k must be -1 (off) or >= 1, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p}")


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """Log-probs [B, V] (float32) of the distribution sampled from; -inf at truncated tokens.

    temperature 0 is greedy: log-prob 0 at the arg-max token (the first one on ties), -inf elsewhere.
    top_k -1, top_p 1 and min_p 0 switch the respective truncation off. top-p keeps the smallest prefix of the
    tokens sorted by probability whose mass reaches top_p (Holtzman et al. 2020, sec. 3.1), at least one token;
    min-p keeps tokens with p >= min_p * p_max (Nguyen et al. 2024). Ties at a cut are broken by sort order.
    """
    check_sampling_args(temperature, top_k, top_p, min_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    logits = logits.float()
    vocab = logits.shape[-1]
    if temperature == 0.0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    if temperature != 1.0:
        logits = logits / temperature
    use_k, use_p, use_min_p = 0 < top_k < vocab, top_p < 1.0, min_p > 0.0
    if not (use_k or use_p):
        if use_min_p:  # no order needed: a threshold relative to the top token
            logits = logits.masked_fill(logits < logits.amax(-1, keepdim=True) + math.log(min_p), float("-inf"))
        return torch.log_softmax(logits, dim=-1)
    vals, idx, probs = _sorted_candidates(logits, top_k if use_k else vocab, top_p)  # [B, K] each
    keep = torch.ones_like(vals, dtype=torch.bool)
    if use_p:
        mass_before = probs.cumsum(-1) - probs  # [B, K]
        keep &= mass_before < top_p  # the first token always has mass_before 0 < top_p
    if use_min_p:
        # Renormalization does not change ratios to the top token, so min-p can test the candidates' probabilities.
        keep &= probs >= min_p * probs[:, :1]
    vals = vals.masked_fill(~keep, float("-inf"))
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(-1, idx, torch.log_softmax(vals, dim=-1))


def _sorted_candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, ...]:
    """The top_k most probable tokens, sorted (values, ids, probabilities renormalized over them).

    Without top-k (top_k = V) and with top-p, only a prefix holding at least top_p of the mass is needed: try
    growing prefixes with `topk` (a full sort of a 50k vocabulary is ~100x slower than a top-64) and fall back to
    the full sort for flat distributions. Probabilities are then those of the whole distribution.
    """
    vocab = logits.shape[-1]
    if top_k < vocab:
        vals, idx = logits.topk(top_k, dim=-1)
        return vals, idx, torch.softmax(vals, dim=-1)
    log_total = logits.logsumexp(-1, keepdim=True)  # [B, 1]
    k = _FIRST_NUCLEUS
    while k <= vocab // 4:
        vals, idx = logits.topk(k, dim=-1)
        probs = (vals - log_total).exp()
        # Every token past the prefix has at least the prefix's mass before it, so top-p drops it.
        if bool((probs.sum(-1) >= top_p).all()):
            return vals, idx, probs
        k *= 8
    vals, idx = logits.sort(dim=-1, descending=True)
    return vals, idx, (vals - log_total).exp()


def sample(
    logprobs: torch.Tensor, generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw one token id per row [B] from `logprobs` [B, V] by inverse-CDF sampling.

    The only randomness is one uniform number in [0, 1) per row: drawn from `generator`, or given as
    `uniforms` [B] (a counter-based stream per row makes draws independent of batch composition). Tokens with
    log-prob -inf are never drawn. The CDF is accumulated in float64, so a tail token of probability ~1e-12 is
    still reachable, in two levels (blocks of _BLOCK tokens, then inside the chosen block) because a float64
    cumsum over a whole 50k vocabulary costs as much as a small model's output layer on CPU.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, V], got shape {tuple(logprobs.shape)}")
    rows, vocab = logprobs.shape
    if uniforms is None:
        uniforms = torch.rand(rows, generator=generator, dtype=torch.float64, device=logprobs.device)
    elif uniforms.shape != (rows,):
        raise ValueError(f"uniforms must be [B]={rows}, got shape {tuple(uniforms.shape)}")
    probs = logprobs.float().exp()  # [B, V]
    if vocab % _BLOCK:
        probs = torch.nn.functional.pad(probs, (0, _BLOCK - vocab % _BLOCK))
    blocks = probs.view(rows, -1, _BLOCK)  # [B, NB, BLK]
    block_cdf = blocks.sum(-1).double().cumsum_(-1)  # [B, NB]
    total = block_cdf[:, -1:]  # [B, 1], 1 up to rounding
    # Strictly below the total, so the search ends in a block of positive mass.
    target = torch.minimum(
        uniforms.to(total).clamp(min=0.0).unsqueeze(-1) * total, torch.nextafter(total, total.new_zeros(()))
    )
    # First block / token whose CDF exceeds the target: a zero-probability one never has CDF[i] > CDF[i-1].
    block = torch.searchsorted(block_cdf, target, right=True)  # [B, 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)  # [B, 1]
    inner = blocks.gather(1, block.unsqueeze(-1).expand(rows, 1, _BLOCK)).squeeze(1).double()  # [B, BLK]
    pos = torch.searchsorted(inner.cumsum(-1), target - before, right=True)  # [B, 1]
    # The two levels sum in different orders: a target rounding past the block's own total takes its last
    # token of positive probability.
    last_positive = _BLOCK - 1 - (inner > 0).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    return (block * _BLOCK + torch.minimum(pos, last_positive)).squeeze(-1)
