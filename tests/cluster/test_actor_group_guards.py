"""The guards' levers through the actor group: `set_lr_scale`, and `apply` (here the entropy-collapse drill's
`sharpen`), reach every rank (one rank in this process, or two data-parallel Ray actors)."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo

from lcot_mega.actor.train_step import TrainBatch

pytest.importorskip("megatron.core")

SEQUENCES = [([5, 17, 3], [8, 9, 10, 11]), ([88, 42, 7, 9], [1, 2, 3]), ([4, 4], [60, 61, 62]), ([7], [30, 31])]
BATCH = TrainBatch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES], advantages=[1.0, -1.0, 0.5, -0.5])
SHARPEN = 30.0
LR = 1e-3  # the `ray_config` fixture's, constant schedule


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True))


def _local_group_run(rank: int, world: int, cfg) -> dict:
    from lcot_mega.cluster.actor_group import ActorGroup, ActorRank, local_actor
    from lcot_mega.trainer.faults import sharpen_rank

    torch.set_num_threads(1)
    group = local_actor(lambda: ActorRank(cfg))
    out = {"is_actor_group": isinstance(group, ActorGroup)}
    out["lr"] = [group.train_step(BATCH)["actor/lr"]]
    group.set_lr_scale(0.5)
    out["lr"].append(group.train_step(BATCH)["actor/lr"])
    cold = group.compute_logprobs(SEQUENCES, 1 / SHARPEN)
    group.apply(sharpen_rank, SHARPEN)
    out["sharp_is_cold"] = _close(group.compute_logprobs(SEQUENCES, 1.0), cold)
    group.shutdown()
    return out


def test_local_group_scales_the_lr_and_sharpens(ray_config):
    (out,) = run_gloo(_local_group_run, 1, ray_config())
    assert out["is_actor_group"]
    assert out["lr"] == pytest.approx([LR, LR / 2], rel=1e-12)
    assert out["sharp_is_cold"]  # logits x 30 at temperature 1 = the old logits at temperature 1/30


def test_ray_group_scales_the_lr_and_sharpens_every_rank(ray_config):
    ray = pytest.importorskip("ray")
    from lcot_mega.cluster.actor_group import ActorGroup
    from lcot_mega.cluster.ray_group import RayRanks
    from lcot_mega.cluster.ray_runtime import start_ray
    from lcot_mega.trainer.faults import sharpen_rank

    cfg = ray_config(mode="colocated", actor_ranks=2)  # DP=2: each replica scores half of the sequences
    stop = start_ray(cfg.cluster)
    group = ActorGroup(RayRanks(cfg))
    try:
        cold = group.compute_logprobs(SEQUENCES, 1 / SHARPEN)
        group.apply(sharpen_rank, SHARPEN)
        sharp = group.compute_logprobs(SEQUENCES, 1.0)
        group.set_lr_scale(0.5)
        # every rank's own metrics: actor/lr is read from that rank's optimizer
        per_rank = ray.get([w.call.remote("train_step", BATCH) for w in group.ranks.workers])
    finally:
        group.shutdown()
        if stop is not None:
            stop()
    assert _close(sharp, cold)
    assert [m["actor/lr"] for m in per_rank] == pytest.approx([LR / 2, LR / 2], rel=1e-12)
