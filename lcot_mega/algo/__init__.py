"""Pure tensor math of the RL step (torch only): advantages, selection, shaping, losses, metrics.

Every formula, its source and its config key: docs/ALGORITHMS.md.
"""

from lcot_mega.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    available_advantages,
    group_advantages,
    register_advantage,
)
from lcot_mega.algo.divergence import entropy_from_logits, kl_penalty
from lcot_mega.algo.groups import group_stats
from lcot_mega.algo.injection import offline_injection_mask
from lcot_mega.algo.losses import (
    aggregate,
    aggregation_denominator,
    aggregation_uses_max_len,
    available_aggregations,
    offpolicy_shaped_loss,
    policy_loss,
    register_aggregation,
)
from lcot_mega.algo.metrics import batch_metrics
from lcot_mega.algo.off_policy import available_corrections, correction_bounds, off_policy_weights
from lcot_mega.algo.selection import (
    POLARITY_MODES,
    informative_groups,
    positive_weight,
    select_by_polarity,
    trim_to_multiple,
    zero_advantage_groups,
)
from lcot_mega.algo.shaping import overlong_penalty, relative_length_reward

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLARITY_MODES",
    "aggregate",
    "aggregation_denominator",
    "aggregation_uses_max_len",
    "available_advantages",
    "available_aggregations",
    "available_corrections",
    "batch_metrics",
    "correction_bounds",
    "entropy_from_logits",
    "group_advantages",
    "group_stats",
    "informative_groups",
    "kl_penalty",
    "off_policy_weights",
    "offline_injection_mask",
    "offpolicy_shaped_loss",
    "overlong_penalty",
    "policy_loss",
    "positive_weight",
    "register_advantage",
    "register_aggregation",
    "relative_length_reward",
    "select_by_polarity",
    "trim_to_multiple",
    "zero_advantage_groups",
]
