"""PPO mini-batches (`actor.updates_per_batch`): how a batch is cut and how the updates' metrics combine."""

from __future__ import annotations

import pytest
import torch

from lcot_mega.actor.mini_batches import combine_metrics, split_batch
from lcot_mega.actor.train_step import TrainBatch


def _batch(n: int) -> TrainBatch:
    return TrainBatch(
        prompt_ids=[[i] for i in range(n)],
        response_ids=[[i, i] for i in range(n)],
        advantages=[float(i) for i in range(n)],
        rollout_logprobs=[torch.full((2,), float(i)) for i in range(n)],
        temperature=0.7,
        offline=[i == 3 for i in range(n)],
    )


def test_consecutive_parts_of_near_equal_size_keep_every_field_aligned():
    parts = split_batch(_batch(7), 3)
    assert [p.prompt_ids for p in parts] == [[[0], [1]], [[2], [3]], [[4], [5], [6]]]  # bounds 0, 2, 4, 7
    for p in parts:
        assert [a for a in p.advantages] == [float(ids[0]) for ids in p.prompt_ids]
        assert [float(r[0]) for r in p.rollout_logprobs] == p.advantages
        assert p.offline == [ids[0] == 3 for ids in p.prompt_ids]
        assert p.old_logprobs is None and p.temperature == 0.7
    assert len(split_batch(_batch(2), 4)) == 2  # never an empty mini-batch
    with pytest.raises(ValueError, match="parts"):
        split_batch(_batch(2), 0)


def test_metrics_sum_counts_max_maxima_keep_the_last_lr_and_average_the_rest():
    a = {
        "actor/loss": 1.0,
        "actor/response_tokens": 10.0,
        "actor/ratio_max": 1.5,
        "actor/lr": 1e-6,
        "actor/update_ok": 1.0,
    }
    b = {
        "actor/loss": 3.0,
        "actor/response_tokens": 6.0,
        "actor/ratio_max": 1.2,
        "actor/lr": 2e-6,
        "actor/update_ok": 0.0,
    }
    assert combine_metrics([a, b]) == {
        "actor/loss": 2.0,
        "actor/response_tokens": 16.0,
        "actor/ratio_max": 1.5,
        "actor/lr": 2e-6,
        "actor/update_ok": 0.5,  # one of two applied: the step still syncs its weights
        "actor/updates": 2.0,
    }
    assert combine_metrics([a]) == a | {"actor/updates": 1.0}
