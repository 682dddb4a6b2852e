"""Off-policy corrections by name (`algo.off_policy.correction`): how the policy loss weights a token sampled by a
policy other than the one it is clipped against.

Three policies meet in an update. mu (the behaviour policy) is the rollout engine's: the sample's
`rollout_logprobs`, from older weights under asynchronous training (issue 19) and from a lower-precision engine
always. pi_prox (the proximal policy) is the trainer's at the start of the step (`TrainBatch.old_logprobs`, or the
forward's own detached log-probs with one update per batch); the PPO clip is taken against it. pi_theta is the
policy being trained. Every correction here is a function of the per-token log ratio
log rho_t = log pi_prox(y_t) - log mu(y_t) and returns weights that multiply the clipped surrogate token by token
(`policy_loss(is_weights=...)`); a weight of 0 masks the token out of the gradient (it stays in the loss
denominator, so masking does not rescale the rest).

Named corrections (docs/ALGORITHMS.md, "Off-policy corrections"):
- `none`: no weights (the gap is still measured).
- `tis`: min(rho_t, high): truncated IS per token (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
  You Off-Policy RL Training").
- `seq_tis`: min(rho_seq, high) on every token of the sequence, rho_seq = prod_t rho_t (the same, per sequence).
- `mis`: rho_t if rho_t <= high else 0: masked IS per token (Liu et al. 2025, "When Speed Kills Stability:
  Demystifying RL Collapse from the Training-Inference Mismatch").
- `seq_mis`: rho_seq if rho_seq <= high else 0, per sequence (ibid.).
- `icepop`: rho_t if low <= rho_t <= high else 0: two-sided token masking (Ling Team 2025, "Every Step Evolves:
  Scaling Reinforcement Learning for Trillion-Scale Thinking Model", IcePop).
- `geo_mask`: 1 if low <= exp(mean_t log rho_t) <= high else 0, per sequence: geometric-mean sequence masking,
  a length-normalised rejection that does not reweight (verl's rollout correction, "geometric" rejection).
- `decoupled`: decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"; Fu et al. 2025,
  AReaL): clip against pi_prox, weight by pi_prox / mu per token; with `high` set, tokens above it are masked
  (AReaL's behaviour-weight cap). With a cap it computes what `mis` does; it differs from the truncating `tis`,
  and from leaving the weight out, which is what plain PPO on stale samples does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lcot_mega.algo._checks import as_bool_mask, check_same_shape, count, masked_finite, require_2d

_MAX_LOG_WEIGHT = 80.0
"""exp(80) is finite in float32; larger log weights (a sequence's summed gap) are clamped before exp."""


@dataclass(frozen=True)
class Bounds:
    """The thresholds a correction reads: `low` (two-sided ones) and `high` (cap or upper mask)."""

    low: float | None
    high: float | None


@dataclass(frozen=True)
class _Spec:
    compute: Callable[[torch.Tensor, torch.Tensor, Bounds], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """(log_rho [B, T], mask [B, T], bounds) -> (weights, truncated, masked), each [B, T]."""
    default: Bounds
    reads_low: bool = False
    reads_high: bool = False


def _sequence_log_ratio(log_rho: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: each row's summed log ratio (log rho_seq) on every position (padding holds 0)."""
    return log_rho.sum(-1, keepdim=True).expand_as(log_rho)


def _geometric_log_ratio(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: each row's mean log ratio over its response tokens (log of the geometric mean of rho)."""
    n = mask.sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    return (log_rho.sum(-1, keepdim=True) / n).expand_as(log_rho)


def _exp(log_w: torch.Tensor) -> torch.Tensor:
    return log_w.clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT).exp()


def _none(log_rho, mask, b):
    zeros = torch.zeros_like(mask)
    return torch.ones_like(log_rho), zeros, zeros


def _truncate(log_w, mask, b):
    truncated = (log_w > math.log(b.high)) & mask
    return _exp(log_w).clamp_max(b.high), truncated, torch.zeros_like(mask)


def _mask_outside(log_w, mask, b, *, reweight: bool = True):
    keep = torch.ones_like(mask)
    if b.high is not None:
        keep &= log_w <= math.log(b.high)
    if b.low is not None:
        keep &= log_w >= math.log(b.low)
    weights = torch.where(keep, _exp(log_w) if reweight else torch.ones_like(log_w), 0.0)
    return weights, torch.zeros_like(mask), ~keep & mask


_CORRECTIONS: dict[str, _Spec] = {
    "none": _Spec(_none, Bounds(None, None)),
    "tis": _Spec(lambda r, m, b: _truncate(r, m, b), Bounds(None, 2.0), reads_high=True),
    "seq_tis": _Spec(lambda r, m, b: _truncate(_sequence_log_ratio(r), m, b), Bounds(None, 2.0), reads_high=True),
    "mis": _Spec(lambda r, m, b: _mask_outside(r, m, Bounds(None, b.high)), Bounds(None, 2.0), reads_high=True),
    "seq_mis": _Spec(
        lambda r, m, b: _mask_outside(_sequence_log_ratio(r), m, Bounds(None, b.high)),
        Bounds(None, 2.0),
        reads_high=True,
    ),
    "icepop": _Spec(lambda r, m, b: _mask_outside(r, m, b), Bounds(0.5, 5.0), reads_low=True, reads_high=True),
    "geo_mask": _Spec(
        lambda r, m, b: _mask_outside(_geometric_log_ratio(r, m), m, b, reweight=False),
        Bounds(0.5, 2.0),
        reads_low=True,
        reads_high=True,
    ),
    "decoupled": _Spec(lambda r, m, b: _mask_outside(r, m, Bounds(None, b.high)), Bounds(None, None), reads_high=True),
}


def available_corrections() -> list[str]:
    return sorted(_CORRECTIONS)


def correction_bounds(name: str, low: float | None = None, high: float | None = None) -> Bounds:
    """The thresholds `name` uses: the given ones, else its defaults; a bound it never reads is refused."""
    if name not in _CORRECTIONS:
        raise ValueError(f"unknown off-policy correction {name!r}; known: {available_corrections()}")
    spec = _CORRECTIONS[name]
    reads_low, reads_high = spec.reads_low, spec.reads_high
    if low is not None and not reads_low:
        raise ValueError(f"off-policy correction {name!r} has no lower bound; leave algo.off_policy.low unset")
    if high is not None and not reads_high:
        raise ValueError(f"off-policy correction {name!r} has no upper bound; leave algo.off_policy.high unset")
    bounds = Bounds(spec.default.low if low is None else low, spec.default.high if high is None else high)
    if bounds.low is not None and not bounds.low > 0:
        raise ValueError(f"algo.off_policy.low must be > 0 (a ratio), got {bounds.low}")
    if bounds.high is not None and name in ("tis", "seq_tis") and not bounds.high >= 1.0:
        raise ValueError(f"a truncation cap below 1 would down-weight every token; got high={bounds.high}")
    if bounds.high is not None and not bounds.high > 0:
        raise ValueError(f"algo.off_policy.high must be > 0 (a ratio), got {bounds.high}")
    if bounds.low is not None and bounds.high is not None and not bounds.low < bounds.high:
        raise ValueError(f"algo.off_policy.low ({bounds.low}) must be below high ({bounds.high})")
    return bounds


@torch.no_grad()
def off_policy_weights(
    prox_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    correction: str = "none",
    low: float | None = None,
    high: float | None = None,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Weights [B, T] (detached, 0 at padding; None for `none`) for `policy_loss(is_weights=...)`, and metrics.

    `prox_logp` is pi_prox, `rollout_logp` mu, both [B, T] with one row per sequence; `mask` marks the response
    tokens to weigh. Metrics, token means over `mask`: `rollout/is_weight_mean`, `rollout/is_capped_frac` (weights
    truncated at `high`), `rollout/is_masked_frac` (weights set to 0), and the gap |log pi_prox - log mu|
    (`rollout/logp_gap_mean`, `rollout/logp_gap_max`).
    """
    bounds = correction_bounds(correction, low, high)
    require_2d(prox_logp=prox_logp)
    check_same_shape(prox_logp=prox_logp, rollout_logp=rollout_logp)
    mask = as_bool_mask("mask", mask, prox_logp.shape)
    log_rho = masked_finite("prox_logp", prox_logp, mask) - masked_finite("rollout_logp", rollout_logp, mask)  # [B, T]
    weights, truncated, masked = _CORRECTIONS[correction].compute(log_rho, mask, bounds)  # [B, T] each
    weights = torch.where(mask, weights, 0.0)  # [B, T]
    n = count(mask).clamp_min(1)
    gap = log_rho.abs()  # [B, T], 0 at padding
    values = torch.stack(
        [
            weights.sum(dtype=torch.float32) / n,
            count(truncated & mask) / n,
            count(masked & mask) / n,
            gap.sum(dtype=torch.float32) / n,
            gap.amax().to(torch.float32) if gap.numel() else n.new_zeros(()),
        ]
    ).tolist()
    names = (
        "rollout/is_weight_mean",
        "rollout/is_capped_frac",
        "rollout/is_masked_frac",
        "rollout/logp_gap_mean",
        "rollout/logp_gap_max",
    )
    return (None if correction == "none" else weights), dict(zip(names, values, strict=True))
