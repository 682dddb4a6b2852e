"""TP shards read in place through shared memory (`weight_sync.shared_shards`): a sync at TP=2 exports exactly what
the all-gather does, reads the peers' weights live after optimizer steps, and shares again when a checkpoint load
moves a parameter to other memory. Real gloo processes; the engine's log-probs are checked against the actor's."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf
from helpers.train_batches import random_train_batch

pytest.importorskip("megatron.core")

PROMPT, RESPONSE = [5, 17, 3, 42], [7, 61, 0, 9, 23, 11, 88]


def _export(actor, shared: bool) -> dict[str, torch.Tensor]:
    from lcot_mega.bridge.hf_export import gather_hf_state

    return {
        n: t.clone() for bucket in gather_hf_state(actor.chunks, actor.arch, 50_000, shared=shared) for n, t in bucket
    }


def _gap(actor, engine) -> float | None:
    """max |engine - actor| teacher-forced log-prob of one sequence (rank 0; None elsewhere)."""
    want = actor.compute_logprobs([(PROMPT, RESPONSE)], temperature=1.0)[0]
    return None if engine is None else float((engine.score(PROMPT, RESPONSE) - want).abs().max())


def _run(rank: int, world: int, a_dir: str, b_dir: str) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine
    from lcot_mega.weight_sync import shared_shards, sync_weights

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(a_dir))
    actor = MegatronActor(arch, ActorConfig(tensor_parallel=2, lr=1e-2), AlgoConfig(), a_dir)
    engine = EmbeddedEngine(b_dir) if rank == 0 else None
    engines = [engine] if engine else []
    out: dict = {"gathered": _export(actor, shared=False), "shared": _export(actor, shared=True)}
    out["why_not"] = shared_shards.why_not(actor.chunks)
    gaps = []
    for step in (1, 2):  # each sync reads the peer's weights as its optimizer left them
        actor.train_step(random_train_batch(step))
        sync_weights(actor.chunks, arch, engines, step)
        gaps.append(_gap(actor, engine))
    # a checkpoint load that assigns new memory to a parameter (here on rank 1 only): the group shares again
    if rank == 1:
        param = next(p for p in actor.chunks[0].parameters() if p.dim() == 2)
        param.data = param.data.clone() * 1.5
    sync_weights(actor.chunks, arch, engines, 3)
    gaps.append(_gap(actor, engine))
    out["gaps"] = gaps
    # shard to shard: rank 1 holds the engine's parameters mapped (it wrote its slices into them)
    views = shared_shards._PUBLISHED[0].views if rank == 1 else engine.parameter_views()
    out["engine_weights"] = {n: t.clone() for n, t in views.items()}
    ma.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("shards")
    a_dir = make_tiny_hf(tmp / "a", "qwen2", seed=0)
    b_dir = make_tiny_hf(tmp / "b", "qwen2", seed=1)
    return run_gloo(_run, 2, str(a_dir), str(b_dir))


def test_reading_the_peer_in_place_exports_exactly_what_the_all_gather_does(results):
    rank0 = results[0]
    assert rank0["why_not"] is None  # one host, gloo: the in-place path was taken
    assert rank0["shared"].keys() == rank0["gathered"].keys() and len(rank0["shared"]) > 10
    for name, t in rank0["gathered"].items():
        assert torch.equal(rank0["shared"][name], t), name


def test_syncs_after_optimizer_steps_and_after_a_parameter_moved_give_the_actors_logprobs(results):
    gaps = results[0]["gaps"]
    assert len(gaps) == 3 and max(gaps) < 1e-5, gaps


def test_the_peer_writes_its_own_slices_into_the_engines_parameters_it_maps(results):
    mine, peers = results[0]["engine_weights"], results[1]["engine_weights"]
    assert len(peers) > 10 and peers.keys() <= mine.keys()
    assert all(torch.equal(peers[n], mine[n]) for n in peers)  # the same memory, seen from both processes
