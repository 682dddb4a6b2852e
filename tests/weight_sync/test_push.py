"""Weight sync: after `sync_weights` an engine that started from other weights samples with the actor's log-probs.

One gloo launch (2 processes) runs TP=2, then PP=2: the actor loads model A, an embedded engine on rank 0 loads
model B (same architecture, other seed); the tests below each check one behaviour of its results.
"""

from __future__ import annotations

import time

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf

from lcot_mega.weight_sync import ProbeCheck, SyncReport, logprob_gap

pytest.importorskip("megatron.core")

PROMPTS = [[5, 17, 3], [88, 42], [7, 61, 0, 9, 23], [11]]
BUCKET = 20_000  # bytes: the tiny qwen2 (0.59 MB of fp32 tensors) goes out in 27 buckets
PROBE = ProbeCheck(probe_ids=(3, 14, 15, 92, 65, 35, 89, 79, 32, 38), tolerance=1e-4)
LAYOUTS = [("tp2", 2, 1), ("pp2", 1, 2)]


def _sample_and_score(engine, actor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Rank 0's engine samples 4 prompts x 2; every rank scores the same sequences with the actor."""
    import torch.distributed as dist

    from lcot_mega.rollout import SamplingParams

    sampled = None
    if engine is not None:
        params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, n=2, seed=7, ignore_eos=True)
        comps = [c for group in engine.generate(PROMPTS, params) for c in group]
        sampled = [
            (p, c.token_ids, c.logprobs, c.weight_version)
            for p, c in zip([p for p in PROMPTS for _ in range(2)], comps, strict=True)
        ]
    box = [sampled]
    dist.broadcast_object_list(box, src=0)
    sequences = [(p, r) for p, r, _, _ in box[0]]
    rollout = [torch.tensor(lp) for _, _, lp, _ in box[0]]
    return rollout, actor.compute_logprobs(sequences, temperature=1.0), [v for *_, v in box[0]]


class _FailingEngine:
    """Wraps an engine; its third `update_weights` call raises, as a shape mismatch would."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def update_weights(self, named_tensors, version: int) -> None:
        self.calls += 1
        if self.calls == 3:
            raise ValueError("update_weights: 'model.norm.weight' has shape (3,), the model expects (64,)")
        self.engine.update_weights(named_tensors, version)

    def flush_cache(self) -> None:
        self.engine.flush_cache()


def _failed_sync(actor, engine) -> tuple[str, int | None]:
    """A sync whose third bucket fails on rank 0: the error on this rank, and the engine's version after."""
    from lcot_mega.weight_sync import WeightSyncError, sync_weights

    engines = [_FailingEngine(engine)] if engine else []
    try:
        sync_weights(actor.chunks, actor.arch, engines, 2, bucket_bytes=BUCKET)
    except WeightSyncError as e:
        return str(e), engine.weight_version if engine else None
    return "no error", None


def _corrupted_probe(actor, engine) -> str:
    """The probe check after one engine weight is changed: the WeightSyncError message (every rank)."""
    from lcot_mega.weight_sync import WeightSyncError, verify_weights

    if engine is not None:
        with torch.no_grad():
            engine._model.model.embed_tokens.weight[PROBE.probe_ids[1], 0] += 5.0
    try:
        verify_weights(actor.chunks, actor.arch, [engine] if engine else [], PROBE)
    except WeightSyncError as e:
        return str(e)
    return "no error"


class _Unreachable:
    def score(self, prompt_ids, response_ids):
        raise ConnectionError("server gone")


def _unscorable_probe(actor, engine) -> str:
    """The probe check with an engine that cannot answer: the WeightSyncError message (every rank, none hangs)."""
    from lcot_mega.weight_sync import WeightSyncError, verify_weights

    try:
        verify_weights(actor.chunks, actor.arch, [engine, _Unreachable()] if engine else [], PROBE)
    except WeightSyncError as e:
        return str(e)
    return "no error"


def _run(rank: int, world: int, a_dir: str, b_dir: str) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine
    from lcot_mega.weight_sync import sync_weights

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(a_dir))
    out = {}
    for name, tp, pp in LAYOUTS:
        actor = MegatronActor(arch, ActorConfig(tensor_parallel=tp, pipeline_parallel=pp), AlgoConfig(), a_dir)
        engine = EmbeddedEngine(b_dir) if rank == 0 else None
        before = _sample_and_score(engine, actor)
        t0 = time.perf_counter()
        report = sync_weights(actor.chunks, arch, [engine] if engine else [], 1, bucket_bytes=BUCKET, verify=PROBE)
        wall = time.perf_counter() - t0
        after = _sample_and_score(engine, actor)
        out[name] = dict(before=before, after=after, report=report, wall=wall, failed=_failed_sync(actor, engine))
        out[name]["unscorable"] = _unscorable_probe(actor, engine)
        out[name]["corrupted"] = _corrupted_probe(actor, engine)
        ma.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def synced(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sync")
    a_dir = make_tiny_hf(tmp / "a", "qwen2", seed=0)
    b_dir = make_tiny_hf(tmp / "b", "qwen2", seed=1)
    return run_gloo(_run, 2, str(a_dir), str(b_dir))


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_engine_logprobs_equal_the_actor_after_sync(synced, layout):
    for rank, results in enumerate(synced):
        rollout, actor, versions = results[layout]["after"]
        gap = logprob_gap(rollout, actor)
        assert gap["rollout/logp_gap_max"] < 1e-4, (rank, layout, gap)
        assert versions == [1] * 8


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_engine_logprobs_differ_before_sync(synced, layout):
    rollout, actor, versions = synced[0][layout]["before"]
    assert logprob_gap(rollout, actor)["rollout/logp_gap_max"] > 0.1
    assert versions == [0] * 8


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_report_is_the_same_on_every_rank_and_counts_every_bucket(synced, layout):
    reports: list[SyncReport] = [r[layout]["report"] for r in synced]
    assert reports[0] == reports[1]
    report = reports[0]
    assert report.buckets > 10 and report.bytes > 500_000  # tiny qwen2: 594,176 bytes in 27 buckets
    assert report.seconds > 0 and report.gb_per_s > 0
    assert report.probe_max_diff is not None and report.probe_max_diff < PROBE.tolerance


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_probe_check_stops_every_rank_on_a_corrupted_engine(synced, layout):
    for results in synced:
        assert "disagree on the probe sequence" in results[layout]["corrupted"]
        assert "could not score the probe: ConnectionError: server gone" in results[layout]["unscorable"]


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_failed_push_raises_on_every_rank_and_keeps_the_old_version(synced, layout):
    for rank, results in enumerate(synced):
        message, version = results[layout]["failed"]
        assert "failed on rank 0: ValueError" in message, rank
        assert version == (1 if rank == 0 else None)


def test_logprob_gap_is_mean_and_max_over_all_tokens():
    gap = logprob_gap(
        [torch.tensor([0.0, -1.0]), torch.tensor([-2.0])], [torch.tensor([0.5, -1.0]), torch.tensor([-1.0])]
    )
    assert gap == {"rollout/logp_gap_mean": pytest.approx(0.5), "rollout/logp_gap_max": pytest.approx(1.0)}
    assert logprob_gap([torch.zeros(0)], [torch.zeros(0)]) == {
        "rollout/logp_gap_mean": 0.0,
        "rollout/logp_gap_max": 0.0,
    }
    with pytest.raises(ValueError, match="sequence 0"):
        logprob_gap([torch.zeros(2)], [torch.zeros(3)])


def test_probe_check_rejects_a_probe_without_a_response():
    with pytest.raises(ValueError, match="at least 2"):
        ProbeCheck(probe_ids=(4,))
