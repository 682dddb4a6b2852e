"""The Ray modes end to end on CPU: a group sampled through `runtime.engine` has the log-probs the actor computes,
a train step plus `sync_weights(1)` leaves the engines scoring exactly like the actor at version 1, checkpoints
round-trip, and `close()` leaves no Ray actor, placement group or server behind."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.cluster.runtime import Runtime, build_runtime
from lcot_mega.rollout.http_client import SGLangHTTPEngine
from lcot_mega.rollout.protocol import SamplingParams
from lcot_mega.types import SampleStatus

ray = pytest.importorskip("ray")
pytest.importorskip("megatron.core")

PROMPTS = [[5, 17, 3], [88, 42, 7, 9]]
GROUP = SamplingParams(max_new_tokens=8, n=4, seed=7, ignore_eos=True)
PROBE = ([3, 14], [15, 92, 65, 35, 89, 79])
TOL = 1e-4  # fp32 engine vs Megatron actor, temperature 1


def _max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _probe(rt: Runtime) -> torch.Tensor:
    return rt.actor.compute_logprobs([PROBE], 1.0)[0]


def _sample_and_compare(rt: Runtime, version: int) -> TrainBatch:
    """A group per prompt from the engine; the actor's log-probs of it match the engine's; as a TrainBatch."""
    groups = rt.engine.generate(PROMPTS, GROUP)
    flat = [(p, c) for p, g in zip(PROMPTS, groups, strict=True) for c in g]
    assert [len(g) for g in groups] == [GROUP.n] * len(PROMPTS)
    assert {c.weight_version for _, c in flat} == {version}
    actor = rt.actor.compute_logprobs([(p, c.token_ids) for p, c in flat], 1.0)
    assert _max_gap([torch.tensor(c.logprobs) for _, c in flat], actor) < TOL
    return TrainBatch(
        prompt_ids=[p for p, _ in flat],
        response_ids=[c.token_ids for _, c in flat],
        advantages=[1.0 if i % 2 else -1.0 for i in range(len(flat))],
    )


def _engine_versions(rt: Runtime) -> list[int]:
    engines = getattr(rt.engine, "engines", [rt.engine])  # an EnginePool holds one client per server
    return [e.weight_version for e in engines]


def _round_trip(rt: Runtime, *, release: bool = False) -> None:
    """The driver's sequence; `release`: free the engine's weights while the actor trains (colocated)."""
    assert _engine_versions(rt) and set(_engine_versions(rt)) == {0}
    batch = _sample_and_compare(rt, version=0)
    probe_before = _probe(rt)
    assert float((rt.engine.score(*PROBE) - probe_before).abs().max()) < TOL  # in sync at version 0

    if release:
        rt.engine.release_memory()
    metrics = rt.actor.train_step(batch)
    if release:
        rt.engine.resume_memory()  # uninitialized until the sync loads every tensor
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    probe_trained = _probe(rt)
    assert float((probe_trained - probe_before).abs().max()) > 1e-3  # the step moved the weights
    assert "sync/seconds" in rt.sync_weights(1)
    assert set(_engine_versions(rt)) == {1}
    for engine in getattr(rt.engine, "engines", [rt.engine]):
        assert float((engine.score(*PROBE) - probe_trained).abs().max()) < TOL
    _sample_and_compare(rt, version=1)

    path = rt.actor.save_checkpoint(1, {"prompts_seen": 8})
    assert rt.actor.latest_checkpoint() == path
    rt.actor.train_step(batch)
    assert float((_probe(rt) - probe_trained).abs().max()) > 1e-3
    assert rt.actor.load_checkpoint(path) == (1, {"prompts_seen": 8})
    assert float((_probe(rt) - probe_trained).abs().max()) < 1e-6


def _alive_actors() -> list[str]:
    from ray._private import state  # GCS view; the public state API needs the dashboard, which we do not start

    return [a["ActorClassName"] for a in state.actors().values() if a["State"] != "DEAD"]


def _placement_groups_left() -> list[dict]:
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def test_colocated_one_rank_round_trip_abort_and_its_own_ray_stops_on_close(ray_config):
    if ray.is_initialized():
        pytest.skip("a Ray instance is already up: this test checks the one build_runtime starts")
    rt = build_runtime(ray_config(mode="colocated", actor_ranks=1))
    try:
        assert ray.cluster_resources()["CPU"] == 1  # a local instance sized to what the placement groups reserve
        _round_trip(rt, release=True)
        out: list = []
        worker = threading.Thread(target=lambda: out.append(rt.engine.generate([[5, 6]], _long_generation())))
        worker.start()
        deadline = time.monotonic() + 60
        while worker.is_alive() and time.monotonic() < deadline:  # abort is a no-op until generate has begun
            time.sleep(0.5)
            rt.engine.abort()  # reaches the engine while generate runs in the same (threaded) Ray actor
        worker.join(timeout=10)
        assert not worker.is_alive() and out
        assert {c.finish for c in out[0][0]} == {SampleStatus.ABORTED}
    finally:
        rt.close()
    assert not ray.is_initialized()


def _long_generation() -> SamplingParams:
    return SamplingParams(max_new_tokens=4000, n=2, seed=1, ignore_eos=True)


def test_colocated_tensor_parallel_2_round_trip(ray_config, shared_ray):
    rt = build_runtime(ray_config(tensor_parallel=2, mode="colocated", actor_ranks=2))
    try:
        assert rt.actor.ranks.backend == "gloo" and len(rt.actor.ranks.workers) == 2
        _round_trip(rt, release=True)
    finally:
        rt.close()
    assert ray.is_initialized()  # not ours to stop
    assert _alive_actors() == [] and _placement_groups_left() == []


def test_disaggregated_data_parallel_2_into_two_served_engines_round_trip(ray_config, shared_ray):
    rt = build_runtime(ray_config(mode="disaggregated", actor_ranks=2, num_engines=2))  # DP=2
    try:
        urls = [e.base_url for e in rt.engine.engines]
        assert len(set(urls)) == 2
        _round_trip(rt)
    finally:
        rt.close()
    assert _alive_actors() == [] and _placement_groups_left() == []
    assert not any(SGLangHTTPEngine(u, retries=0).health() for u in urls)  # the servers are gone


def test_a_rank_that_cannot_build_fails_the_build_and_leaves_nothing(ray_config, shared_ray):
    from lcot_mega.actor.megatron_adapter import ActorSetupError

    with pytest.raises(ActorSetupError, match=r"not divisible by actor\.tensor_parallel"):
        build_runtime(ray_config(tensor_parallel=2, mode="colocated", actor_ranks=3))
    assert _alive_actors() == [] and _placement_groups_left() == []
