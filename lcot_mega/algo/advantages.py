"""Group-relative advantage estimators for outcome rewards, picked by name from a small registry.

Every estimator maps per-sample rewards [N] and group ids [N] to per-sample advantages [N]; the
actor broadcasts a sample's advantage to all its response tokens. Add one with
`@register_advantage("name")` on a function `(rewards, group_ids, eps) -> advantages` that may assume
validated, non-empty, finite 1-D inputs.

Contract: an estimator gives a group all-zero advantages (|A| <= 1e-8) exactly when the group's rewards
are all equal. Dynamic sampling relies on it to keep informative groups (`selection.informative_groups`)
before advantages exist, then computes advantages once over the groups that train. The built-ins meet it:
grpo, drgrpo and rloo centre on the group mean; reinforce_pp whitens group-centred rewards over the batch,
whose mean is 0, so a constant group stays 0 (up to rounding) while its values depend on the whole batch.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from lcot_mega.algo.groups import check_per_sample, group_index, group_moments

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "available_advantages",
    "group_advantages",
    "register_advantage",
]

AdvantageEstimator = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

_REGISTRY: dict[str, AdvantageEstimator] = {}
ADVANTAGE_ESTIMATORS: Mapping[str, AdvantageEstimator] = MappingProxyType(_REGISTRY)
"""Read-only view of the registered estimators by name."""


def register_advantage(name: str, *, override: bool = False) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator that registers an estimator under `name`; re-registering a name needs `override=True`."""

    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in _REGISTRY and not override:
            raise ValueError(f"advantage estimator {name!r} is already registered; pass override=True to replace it")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_advantages() -> list[str]:
    """Registered estimator names, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> AdvantageEstimator:
    if name in _REGISTRY:
        return _REGISTRY[name]
    names = available_advantages()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
    hint = f"; closest: {close[0]!r}" if close else ""
    raise ValueError(f"unknown advantage estimator {name!r}; registered: {names}{hint}")


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample advantages [N] float32 of outcome `rewards` [N] under the named group estimator.

    Raises ValueError for an unknown estimator (listing the registered ones), NaN/Inf rewards,
    shape mismatches and a negative `eps`. Empty input gives an empty tensor.
    """
    fn = _lookup(estimator)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n = check_per_sample(group_ids, rewards=rewards)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    adv = fn(rewards, group_ids, eps)
    if adv.shape != rewards.shape:
        raise ValueError(
            f"estimator {estimator!r} returned shape {tuple(adv.shape)} for rewards {tuple(rewards.shape)}"
        )
    return adv.float()


def _centered(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (r - group mean) [N], group std [N] and group size [N]."""
    inv, g = group_index(group_ids)
    mean, std, count = group_moments(rewards, inv, g)
    return rewards.to(torch.float64) - mean[inv], std[inv], count[inv]


def _safe_div(x: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (std + eps), and 0 where std == 0 (then x == 0 too; keeps eps=0 from giving 0/0)."""
    return torch.where(std > 0, x / (std + eps), torch.zeros_like(x))


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1.2): (r - mean_g) / (std_g + eps), unbiased std.

    A single-sample group gets advantage 0: a lone sample has no group baseline. (verl 0.3, the
    study's code base, sets mean 0, std 1 there, i.e. advantage = r; we do not.) Constant groups get 0.
    """
    x, std, _ = _centered(rewards, group_ids)
    return _safe_div(x, std, eps)


@register_advantage("drgrpo")
def drgrpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3): r - mean_g, no std division."""
    return _centered(rewards, group_ids)[0]


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"): r_i - mean of the other samples of the group.

    Equals n / (n - 1) * (r_i - mean_g); a single-sample group (no other sample) gets 0.
    """
    x, _, count = _centered(rewards, group_ids)
    return torch.where(count > 1, x * count / (count - 1).clamp(min=1), torch.zeros_like(x))


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++"): x = r - mean_g, then normalized over
    the whole batch, (x - mean_batch) / (std_batch + eps), with the unbiased std over samples.

    The paper whitens over tokens; here every sample counts once. A batch of one sample (or one where
    every x is equal) gets 0.
    """
    x, _, _ = _centered(rewards, group_ids)
    inv = torch.zeros_like(group_ids)
    mean, std, _ = group_moments(x, inv, 1)
    return _safe_div(x - mean[inv], std[inv], eps)
