"""Several optimizer steps per rollout batch (`actor.updates_per_batch`, PPO's mini-batches).

The batch is cut into that many consecutive mini-batches of near-equal sequence counts (groups stay together when
the count divides evenly, as in verl's ppo_mini_batch_size), and each is one gated optimizer step with its own loss
denominator. The clip is taken against the policy at the start of the step for all of them: its log-probs are
computed once, before the first update (`TrainBatch.old_logprobs`; the proximal policy of decoupled PPO), so from
the second mini-batch on the ratio pi_theta / pi_old moves away from 1 and the clip binds (Schulman et al. 2017).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

from lcot_mega.actor.train_step import TrainBatch

PER_SEQUENCE_FIELDS = (
    "prompt_ids",
    "response_ids",
    "advantages",
    "old_logprobs",
    "ref_logprobs",
    "rollout_logprobs",
    "offline",
    "routing",
)
"""The `TrainBatch` fields that hold one entry per sequence (what a mini-batch slices)."""
_SUMMED = ("actor/micro_batches", "actor/response_tokens")
_MAXED = ("actor/ratio_max", "rollout/logp_gap_max", "moe/expert_load_max")
_LAST = ("actor/lr",)


def split_batch(batch: TrainBatch, parts: int) -> list[TrainBatch]:
    """`batch` cut into `parts` consecutive mini-batches whose sizes differ by at most one sequence (fewer when the
    batch has fewer sequences than `parts`)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    n = len(batch.prompt_ids)
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        fields = {name: _slice(getattr(batch, name), lo, hi) for name in PER_SEQUENCE_FIELDS}
        out.append(replace(batch, **fields))
    return out


def _slice(values: Sequence | None, lo: int, hi: int) -> list | None:
    return None if values is None else list(values[lo:hi])


def combine_metrics(per_update: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from its mini-batches' (in order): counts summed, maxima maxed, the learning rate of the
    last update, everything else averaged (`actor/update_ok` becomes the share of updates applied, so a step with
    any update applied still syncs its weights); `actor/updates` is how many there were."""
    if len(per_update) == 1:
        return dict(per_update[0]) | {"actor/updates": 1.0}
    out: dict[str, float] = {}
    for key in per_update[0]:
        values = [m[key] for m in per_update]
        if key in _SUMMED:
            out[key] = float(sum(values))
        elif key in _MAXED:
            out[key] = float(max(values))
        elif key in _LAST:
            out[key] = float(values[-1])
        else:
            out[key] = float(sum(values) / len(values))
    out["actor/updates"] = float(len(per_update))
    return out
