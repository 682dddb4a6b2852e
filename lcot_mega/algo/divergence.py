"""Per-token divergences: KL penalty estimators against a reference policy, and policy entropy."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lcot_mega.algo._checks import as_bool_mask, check_finite, check_same_shape, masked_finite

# k3 reaches the [-10, 10] clamp at |kl| ~ 11 already; clamping kl itself at 20 therefore changes no value,
# it only keeps exp() finite so the clamped (zero) gradient does not turn into 0 * inf = NaN.
_K3_MAX_LOG_GAP = 20.0
_K3_CLAMP = 10.0


def _k1(delta: torch.Tensor) -> torch.Tensor:
    return delta


def _k2(delta: torch.Tensor) -> torch.Tensor:
    return 0.5 * delta.square()


def _k3(delta: torch.Tensor) -> torch.Tensor:
    kl = (-delta).clamp(-_K3_MAX_LOG_GAP, _K3_MAX_LOG_GAP)  # ref_logp - logp
    # expm1(kl) - kl == exp(kl) - kl - 1 but exact near kl = 0, where exp(kl) - 1 cancels and can go below 0
    return (torch.expm1(kl) - kl).clamp(-_K3_CLAMP, _K3_CLAMP)


def _abs(delta: torch.Tensor) -> torch.Tensor:
    return delta.abs()


KL_KINDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "low_var_kl": _k3,
    "abs": _abs,
}


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "k3",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman 2020, "Approximating KL").

    With delta = logp - ref_logp: `k1` = delta; `k2` = delta^2 / 2; `k3` (alias `low_var_kl`, the study's
    KL loss) = exp(-delta) + delta - 1 clamped to [-10, 10]; `abs` = |delta|. Same shape as the inputs.
    Without `mask` every value must be finite; with `mask` only masked positions are checked and the
    result is 0 at padding.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; known: {sorted(KL_KINDS)}")
    check_same_shape(logp=logp, ref_logp=ref_logp)
    ref_logp = ref_logp.detach()
    if mask is None:
        check_finite("logp", logp)
        check_finite("ref_logp", ref_logp)
        return KL_KINDS[kind](logp - ref_logp)
    mask = as_bool_mask("mask", mask, logp.shape)
    delta = masked_finite("logp", logp, mask) - masked_finite("ref_logp", ref_logp, mask)  # [B, T]
    return torch.where(mask, KL_KINDS[kind](delta), 0.0)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim: H = logsumexp(z) - sum softmax(z) z.

    [..., V] -> [...]. Shifting z by its (detached) max leaves H unchanged but keeps both terms small, so
    logits of magnitude 1e4 lose no precision; -inf entries (masked vocabulary) count as probability 0.
    Each row needs at least one finite logit. Computed in the input dtype (upcast bf16 logits first).
    Logits are not scanned for NaN: a [.., V] check would cost a full pass and a sync per call.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits / temperature if temperature != 1.0 else logits  # [..., V]
    z = z - z.detach().amax(dim=-1, keepdim=True)  # [..., V], max entry 0
    p = torch.softmax(z, dim=-1)  # [..., V]
    # p == 0 exactly where z == -inf; 0 * -inf would be NaN
    pz = p * torch.where(p > 0, z, 0.0)  # [..., V]
    return torch.logsumexp(z, dim=-1) - pz.sum(dim=-1)
