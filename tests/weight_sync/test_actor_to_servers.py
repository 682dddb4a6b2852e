"""Disaggregated sync end to end: a TP=2 Megatron actor broadcasts its weights over a separate gloo group into
two served engines (other weights before); afterwards both servers' log-probs equal the actor's."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import free_port, run_gloo
from helpers.tiny_models import make_tiny_hf

pytest.importorskip("megatron.core")

PROMPTS = [[5, 17, 3], [88, 42, 7]]
PROBE_IDS = (3, 14, 15, 92, 65, 35, 89, 79)


def _run(rank: int, world: int, actor_dir: str, engine_dir: str, port: int) -> dict:
    import torch.distributed as dist
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine, RolloutServer, SamplingParams, ServeConfig, SGLangHTTPEngine
    from lcot_mega.weight_sync import BroadcastSync, ProbeCheck, logprob_gap, sync_weights

    arch = arch_from_hf_config(AutoConfig.from_pretrained(actor_dir))
    actor = MegatronActor(arch, ActorConfig(tensor_parallel=2), AlgoConfig(), actor_dir)
    servers, clients, transport = [], [], None
    if rank == 0:  # two engine servers on loopback, each its own rank in the weight group
        servers = [RolloutServer(EmbeddedEngine(engine_dir), ServeConfig(port=0)).start() for _ in range(2)]
        clients = [SGLangHTTPEngine(s.url) for s in servers]
        transport = BroadcastSync(clients, "127.0.0.1", port, group_name="test_weights")
    before = clients[0].score(PROBE_IDS[:1], PROBE_IDS[1:]) if rank == 0 else None
    report = sync_weights(
        actor.chunks, arch, clients, 3, transport=transport, bucket_bytes=50_000, verify=ProbeCheck(PROBE_IDS, 1e-4)
    )
    sampled = None
    if rank == 0:
        params = SamplingParams(max_new_tokens=6, n=2, seed=1, ignore_eos=True)
        sampled = [
            [
                (p, c.token_ids, c.logprobs, c.weight_version)
                for p, g in zip(PROMPTS, cl.generate(PROMPTS, params), strict=True)
                for c in g
            ]
            for cl in clients
        ]
    box = [sampled]
    dist.broadcast_object_list(box, src=0)
    gaps, versions = [], []
    for per_server in box[0]:
        actor_lp = actor.compute_logprobs([(p, r) for p, r, _, _ in per_server], temperature=1.0)
        gaps.append(logprob_gap([torch.tensor(lp) for _, _, lp, _ in per_server], actor_lp)["rollout/logp_gap_max"])
        versions.append({v for *_, v in per_server})
    if rank == 0:
        transport.close()
        for s in servers:
            s.shutdown()
    actor_probe = actor.compute_logprobs([(list(PROBE_IDS[:1]), list(PROBE_IDS[1:]))], temperature=1.0)[0]
    return dict(
        gaps=gaps,
        versions=versions,
        probe=report.probe_max_diff,
        buckets=report.buckets,
        before=None if before is None else float((before - actor_probe).abs().max()),
    )


def test_broadcast_into_two_served_engines_gives_the_actors_logprobs(tmp_path):
    actor_dir = make_tiny_hf(tmp_path / "a", "qwen2", seed=0, initializer_range=0.2)
    engine_dir = make_tiny_hf(tmp_path / "b", "qwen2", seed=1, initializer_range=0.2)
    rank0, rank1 = run_gloo(_run, 2, str(actor_dir), str(engine_dir), free_port())
    assert rank0["before"] > 0.1  # the servers started from other weights
    assert rank0["buckets"] > 1 and rank0["probe"] < 1e-5
    for out in (rank0, rank1):
        assert all(g < 1e-4 for g in out["gaps"]), out["gaps"]
        assert out["versions"] == [{3}, {3}]
