"""Policy-gradient losses and how their per-token values are reduced to one scalar.

Conventions shared by every function here (and by `divergence`/`importance`):
- token tensors are [B, T] (B sequences, T response tokens, right-padded); `mask` [B, T] is bool or 0/1 and
  marks real response tokens;
- NaN/Inf at a masked position raises ValueError; values at padding may be garbage and are ignored: they are
  replaced by zeros before any arithmetic, so they can poison neither values nor gradients;
- inputs are never modified in place; gradients flow through `logp` only (old log-probs, advantages and
  weights are treated as constants).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch

from lcot_mega.algo._checks import as_bool_mask, check_same_shape, count, masked_finite, require_2d

# (loss_tokens [B, T] zero at padding, mask [B, T] bool, max_len) -> (numerator, denominator), both scalars.
AggregationFn = Callable[[torch.Tensor, torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]
_AGGREGATIONS: dict[str, AggregationFn] = {}
_USES_MAX_LEN: set[str] = set()

# exp() of a larger log-ratio overflows float32, and the zero gradient of a clipped token then becomes
# 0 * inf = NaN in backward; e^20 is far outside any clip range, so the clamp changes no clipped value.
_MAX_LOG_RATIO = 20.0


def _broadcast_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[B] (one advantage per sequence, GRPO) or [B, T] -> [B, T]."""
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages.unsqueeze(-1).expand(shape)
    if tuple(advantages.shape) == tuple(shape):
        return advantages
    raise ValueError(f"advantages must be [B]={shape[0]} or [B, T]={tuple(shape)}, got {tuple(advantages.shape)}")


# --------------------------------------------------------------------------------------------- aggregation


def register_aggregation(name: str, *, uses_max_len: bool = False) -> Callable[[AggregationFn], AggregationFn]:
    """Register a loss aggregation under `name` (decorator).

    The function gets `(loss_tokens, mask, max_len)` with `loss_tokens` [B, T] already zero at padding and
    `mask` [B, T] bool, and returns `(numerator, denominator)`: two scalar tensors whose ratio is the loss.
    The denominator must be additive over sequences (a count of tokens, of sequences, B * max_len, ...), so
    that a loss split over micro-batches or ranks can be rebuilt by dividing by the summed denominators.
    `uses_max_len`: the function reads `max_len` (`algo.loss_max_len`); the preflight refuses that key with an
    aggregation that ignores it, so a run never silently drops a normaliser its config names.
    """

    def wrap(fn: AggregationFn) -> AggregationFn:
        if name in _AGGREGATIONS:
            raise ValueError(f"aggregation {name!r} is already registered")
        _AGGREGATIONS[name] = fn
        if uses_max_len:
            _USES_MAX_LEN.add(name)
        return fn

    return wrap


def available_aggregations() -> list[str]:
    """Registered aggregation names, sorted."""
    return sorted(_AGGREGATIONS)


def aggregation_uses_max_len(agg: str) -> bool:
    """Whether the aggregation registered as `agg` reads `max_len` (registered with `uses_max_len=True`)."""
    _get_aggregation(agg)  # an unknown name raises, with the closest known one
    return agg in _USES_MAX_LEN


def _get_aggregation(agg: str) -> AggregationFn:
    if agg in _AGGREGATIONS:
        return _AGGREGATIONS[agg]
    close = difflib.get_close_matches(agg, list(_AGGREGATIONS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown agg {agg!r}; known: {sorted(_AGGREGATIONS)}{hint}")


@register_aggregation("token-mean")
def _token_mean(loss_tokens: torch.Tensor, mask: torch.Tensor, max_len: int | None) -> tuple[torch.Tensor, ...]:
    """Every masked token of the batch weighs the same (DAPO, Yu et al. 2025, sec. 3.3)."""
    return loss_tokens.sum(), count(mask)


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(
    loss_tokens: torch.Tensor, mask: torch.Tensor, max_len: int | None
) -> tuple[torch.Tensor, ...]:
    """Mean over each sequence's tokens, then over non-empty sequences (GRPO, Shao et al. 2024, eq. 3)."""
    lengths = mask.sum(-1)  # [B]
    per_seq = loss_tokens.sum(-1) / lengths.clamp_min(1).to(loss_tokens.dtype)  # [B], 0 for empty rows
    return per_seq.sum(), count(lengths > 0)


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(loss_tokens: torch.Tensor, mask: torch.Tensor, max_len: int | None) -> tuple[torch.Tensor, ...]:
    """Sum over each sequence's tokens, mean over non-empty sequences."""
    return loss_tokens.sum(), count(mask.any(-1))


@register_aggregation("seq-mean-token-sum-norm", uses_max_len=True)
def _seq_mean_token_sum_norm(
    loss_tokens: torch.Tensor, mask: torch.Tensor, max_len: int | None
) -> tuple[torch.Tensor, ...]:
    """Token sum over B * max_len with a constant max_len: no length bias (Dr.GRPO, Liu et al. 2025)."""
    if max_len is None or isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(
            f"agg='seq-mean-token-sum-norm' (Dr.GRPO) needs max_len, a positive int constant such as the maximum "
            f"response length; got max_len={max_len!r}"
        )
    longest = int(mask.sum(-1).max()) if mask.numel() else 0
    if longest > max_len:
        raise ValueError(f"a sequence has {longest} masked tokens, more than max_len={max_len}")
    return loss_tokens.sum(), torch.tensor(float(mask.shape[0] * max_len), device=loss_tokens.device)


def _aggregate(
    loss_tokens: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    max_len: int | None,
    denominator: float | torch.Tensor | None,
) -> torch.Tensor:
    numerator, den = _get_aggregation(agg)(torch.where(mask, loss_tokens, 0.0), mask, max_len)
    if denominator is not None:
        if not isinstance(denominator, torch.Tensor) and not denominator > 0:
            raise ValueError(f"denominator must be > 0, got {denominator!r}")
        den = torch.as_tensor(denominator, dtype=den.dtype, device=den.device)
    # an all-padding batch has numerator 0 (still attached to the graph) and denominator 0: return 0, not NaN
    return numerator / torch.where(den > 0, den, torch.ones_like(den))


def aggregate(
    loss_tokens: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    max_len: int | None = None,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token losses [B, T] to a scalar with the aggregation registered as `agg`.

    Built in: `token-mean` (DAPO), `seq-mean-token-mean` (GRPO), `seq-mean-token-sum`,
    `seq-mean-token-sum-norm` (Dr.GRPO, needs `max_len`). Empty sequences add nothing to numerator or
    count; an all-empty mask gives 0 with a graph. `denominator` replaces the batch's own normalizer,
    e.g. the sum of `aggregation_denominator` over all micro-batches, so the micro-batch losses add up
    to the loss of the whole batch.
    """
    require_2d(loss_tokens=loss_tokens)
    mask = as_bool_mask("mask", mask, loss_tokens.shape)
    loss_tokens = masked_finite("loss_tokens", loss_tokens, mask)  # [B, T]
    return _aggregate(loss_tokens, mask, agg, max_len, denominator)


def aggregation_denominator(mask: torch.Tensor, agg: str = "token-mean", max_len: int | None = None) -> torch.Tensor:
    """The normalizer `agg` would divide by for this mask (float32 scalar); additive across micro-batches."""
    require_2d(mask=mask)
    mask = as_bool_mask("mask", mask, mask.shape)
    zeros = torch.zeros(mask.shape, device=mask.device)  # [B, T]
    return _get_aggregation(agg)(zeros, mask, max_len)[1]


# --------------------------------------------------------------------------------------------- losses


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1] (the lower bound is 1 - clip_low), got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0 (inf disables the upper clip), got {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020) or None, got {dual_clip}")


def _prepare_policy_inputs(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and sanitize: returns bool mask, logp, detached old_logp, advantages [B, T], padding zeroed."""
    require_2d(logp=logp)
    check_same_shape(logp=logp, old_logp=old_logp)
    mask = as_bool_mask("mask", mask, logp.shape)
    adv = _broadcast_advantages(advantages.detach(), logp.shape)  # [B, T]
    logp = masked_finite("logp", logp, mask)  # [B, T]
    old_logp = masked_finite("old_logp", old_logp.detach(), mask)  # [B, T]
    return mask, logp, old_logp, masked_finite("advantages", adv, mask)


@torch.no_grad()
def _policy_metrics(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clipped: torch.Tensor,
    dual_clipped: torch.Tensor,
    bounds: tuple[float, float],
) -> dict[str, float]:
    """Token means over the mask (0 when it is empty); one device->host copy for all of them."""
    n = count(mask).clamp_min(1)
    ratio = log_ratio.exp()  # [B, T]

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, 0).sum(dtype=torch.float32) / n

    ratio_max = torch.where(mask, ratio, 0).amax() if mask.numel() else n.new_zeros(())
    values = {
        "actor/clipfrac": mean(clipped),
        "actor/clipfrac_upper": mean((ratio > bounds[1]) & (adv > 0)),
        "actor/clipfrac_lower": mean((ratio < bounds[0]) & (adv < 0)),
        "actor/dual_clipfrac": mean(dual_clipped),
        "actor/ppo_kl": mean(-log_ratio),
        # k3 = (r - 1) - log r with r = pi/pi_old: KL(pi_old || pi) from tokens sampled by pi_old (Schulman 2020)
        "actor/approx_kl_k3": mean(torch.expm1(log_ratio) - log_ratio),
        "actor/ratio_mean": mean(ratio),
        "actor/ratio_max": ratio_max.to(torch.float32),
    }
    return dict(zip(values, torch.stack(list(values.values())).tolist(), strict=True))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
    is_weights: torch.Tensor | None = None,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7) with clip-higher (DAPO, Yu et al. 2025, eq. 10).

    Per token: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp); with `dual_clip`
    c > 1, tokens with A < 0 are further capped at -A c (Ye et al. 2020, dual-clip PPO). `is_weights` [B, T]
    (e.g. from `importance_correction`) multiply the per-token loss as constants. `clip_low=1,
    clip_high=inf` gives the unclipped -A r. Metrics are token means over the mask; `actor/ppo_kl` is
    mean(old_logp - logp) (verl) and `actor/approx_kl_k3` the k3 estimate of KL(old || new).
    """
    _check_clip(clip_low, clip_high, dual_clip)
    mask, logp, old_logp, adv = _prepare_policy_inputs(logp, old_logp, advantages, mask)
    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    surrogate = -adv * ratio  # [B, T]
    surrogate_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    loss_tokens = torch.maximum(surrogate, surrogate_clipped)  # [B, T]
    dual_clipped = torch.zeros_like(mask)  # [B, T]
    if dual_clip is not None:
        dual_clipped = (adv < 0) & (loss_tokens > -adv * dual_clip)
        loss_tokens = torch.where(dual_clipped, -adv * dual_clip, loss_tokens)
    if is_weights is not None:
        check_same_shape(logp=logp, is_weights=is_weights)
        loss_tokens = loss_tokens * masked_finite("is_weights", is_weights.detach(), mask)
    loss = _aggregate(loss_tokens, mask, agg, max_len, denominator)
    bounds = (1.0 - clip_low, 1.0 + clip_high)
    metrics = _policy_metrics(log_ratio, adv, mask, surrogate_clipped > surrogate, dual_clipped, bounds)
    return loss, metrics


def offpolicy_shaped_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.1,
    agg: str = "token-mean",
    max_len: int | None = None,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Policy-shaping loss for injected offline tokens (LUFFY, Yan et al. 2025): -A p / (p + gamma).

    p = exp(logp); no importance ratio, no clip. The shaping reweights the gradient by gamma / (p + gamma),
    boosting low-probability tokens: d/dlogp p/(p+gamma) = gamma p / (p+gamma)^2. To aggregate it jointly
    with on-policy tokens, pass both calls the same `denominator` and add the losses.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    require_2d(logp=logp)
    mask = as_bool_mask("mask", mask, logp.shape)
    adv = masked_finite("advantages", _broadcast_advantages(advantages.detach(), logp.shape), mask)  # [B, T]
    logp = masked_finite("logp", logp, mask)  # [B, T]
    # p / (p + gamma) = sigmoid(logp - log gamma): never forms p + gamma, stable for any logp
    shaped = torch.sigmoid(logp - math.log(gamma))  # [B, T]
    return _aggregate(-adv * shaped, mask, agg, max_len, denominator)
