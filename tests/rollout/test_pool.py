"""EnginePool: least-loaded dispatch, prompt order, failover on engine failures only, restart + resync before
rejoining, one weight version; and for real: a served engine SIGKILLed mid-generation loses no prompt."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from lcot_mega.rollout.http_client import EngineHTTPError
from lcot_mega.rollout.launcher import ServerSupervisor, embedded_command
from lcot_mega.rollout.pool import EnginePool, NoLiveEngineError, chunk_seed
from lcot_mega.rollout.protocol import Completion, SamplingParams
from lcot_mega.types import SampleStatus

PROMPTS = [[10 + i, 3, 4] for i in range(6)]
PROBE = [3, 14, 15, 92, 65, 35, 89, 79]


class FakeEngine:
    """Answers prompt p with token ids [ident, p[0], k] for sample k; can fail, block, or hold a version."""

    def __init__(self, ident: int, version: int = 0, error: Exception | None = None, delay_s: float = 0.0) -> None:
        self.ident, self.version, self.error, self.delay_s = ident, version, error, delay_s
        self.base_url = f"fake://{ident}"
        self.calls: list[list[list[int]]] = []
        self.seeds: list[int | None] = []
        self.log: list[str] = []
        self.generate_gate, self.score_gate = threading.Event(), threading.Event()
        self.generate_gate.set()
        self.score_gate.set()
        self.entered = threading.Event()

    def generate(self, prompt_ids, params: SamplingParams) -> list[list[Completion]]:
        self.calls.append([list(p) for p in prompt_ids])
        self.seeds.append(params.seed)
        self.entered.set()
        self.generate_gate.wait(10)
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return [
            [Completion([self.ident, p[0], k], [-1.0] * 3, SampleStatus.TRUNCATED, weight_version=self.version)
             for k in range(params.n)]
            for p in prompt_ids
        ]  # fmt: skip

    def score(self, prompt_ids, response_ids) -> torch.Tensor:
        self.log.append("score")
        self.entered.set()
        self.score_gate.wait(10)
        return torch.full((len(response_ids),), float(self.ident))

    def update_weights(self, named_tensors, version: int) -> None:
        self.log.append(f"update_weights:{len(list(named_tensors))}")
        self.version = version

    @property
    def weight_version(self) -> int:
        return self.version

    def abort(self) -> None:
        self.log.append("abort")

    def release_memory(self, tags=None) -> None:
        self.log.append(f"release:{tags}")

    def resume_memory(self, tags=None) -> None:
        self.log.append(f"resume:{tags}")

    def flush_cache(self) -> None:
        self.log.append("flush_cache")

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.log.append("shutdown")


def sources(groups: list[list[Completion]]) -> list[int]:
    return [c.token_ids[0] for g in groups for c in g]


# ------------------------------------------------------------------------------------------ dispatch


def test_a_one_chunk_pool_equals_its_engine(engine):
    params = SamplingParams(max_new_tokens=8, n=2, seed=5, temperature=0.8)
    pooled = EnginePool([engine]).generate(PROMPTS[:3], params)
    direct = engine.generate(PROMPTS[:3], params)
    assert [[c.token_ids for c in g] for g in pooled] == [[c.token_ids for c in g] for g in direct]
    assert [[c.logprobs for c in g] for g in pooled] == [[c.logprobs for c in g] for g in direct]


def test_each_chunk_goes_to_the_least_loaded_live_engine():
    e0, e1, e2 = (FakeEngine(i) for i in range(3))
    pool = EnginePool([e0, e1, e2], chunk_size=2)
    e0.score_gate.clear()
    scorer = threading.Thread(target=pool.score, args=([1], [2]))
    scorer.start()
    assert e0.entered.wait(5) and pool.loads() == [1, 0, 0]
    for e in (e0, e1, e2):  # no chunk may finish before all are assigned
        e.generate_gate.clear()
        threading.Timer(0.3, e.generate_gate.set).start()
    # loads (1, 0, 0): chunk 0 -> e1 (1, 2, 0), chunk 1 -> e2 (1, 2, 2), chunk 2 -> e0 (3, 2, 2)
    groups = pool.generate(PROMPTS, SamplingParams(n=1))
    assert e1.calls == [PROMPTS[0:2]] and e2.calls == [PROMPTS[2:4]] and e0.calls == [PROMPTS[4:6]]
    assert sources(groups) == [1, 1, 2, 2, 0, 0]
    e0.score_gate.set()
    scorer.join(5)
    assert pool.loads() == [0, 0, 0]


def test_results_come_back_in_prompt_order_with_n_samples_each():
    pool = EnginePool([FakeEngine(0, delay_s=0.05), FakeEngine(1)], chunk_size=1)
    groups = pool.generate(PROMPTS, SamplingParams(n=3))
    assert [[c.token_ids[1:] for c in g] for g in groups] == [[[p[0], k] for k in range(3)] for p in PROMPTS]
    assert set(sources(groups)) == {0, 1}


def test_chunks_get_distinct_seeds_and_the_first_keeps_the_callers():
    e = FakeEngine(0)
    EnginePool([e], chunk_size=2).generate(PROMPTS, SamplingParams(seed=7))
    assert e.seeds[0] == 7 and len(set(e.seeds)) == 3
    assert e.seeds == [chunk_seed(7, s) for s in (0, 2, 4)] and chunk_seed(None, 4) is None


# ------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    "error", [ConnectionError("refused"), TimeoutError("no answer"), EngineHTTPError(503, "/generate", "busy")]
)
def test_a_chunk_whose_engine_fails_is_resent_to_another_engine(error):
    bad, good = FakeEngine(0, error=error), FakeEngine(1)
    pool = EnginePool([bad, good], backoff_s=0.01)
    groups = pool.generate(PROMPTS[:4], SamplingParams(n=2))
    assert bad.calls == [PROMPTS[0:2]] and sorted(good.calls) == [PROMPTS[0:2], PROMPTS[2:4]]
    assert sources(groups) == [1] * 8 and [c.token_ids[1] for g in groups for c in g][::2] == [10, 11, 12, 13]
    assert pool.dead() == [0] and pool.failovers == 1 and pool.last_errors[0] is error


@pytest.mark.parametrize(
    "error", [ValueError("/generate: bad input_ids"), EngineHTTPError(409, "/generate", "released")]
)
def test_a_4xx_error_is_raised_and_never_resent(error):
    bad, good = FakeEngine(0, error=error), FakeEngine(1)
    pool = EnginePool([bad, good], backoff_s=0.01)
    bad.generate_gate.clear()  # fail only after both chunks are assigned
    threading.Timer(0.2, bad.generate_gate.set).start()
    with pytest.raises(type(error)) as info:
        pool.generate(PROMPTS[:4], SamplingParams())
    assert info.value is error
    assert good.calls == [PROMPTS[2:4]] and pool.dead() == [] and pool.failovers == 0


def test_without_a_live_engine_the_error_names_every_engine_and_its_last_error():
    pool = EnginePool([FakeEngine(i, error=ConnectionError(f"boom-{i}")) for i in range(2)], backoff_s=0.01)
    with pytest.raises(NoLiveEngineError) as info:
        pool.generate(PROMPTS[:4], SamplingParams())
    message = str(info.value)
    assert all(s in message for s in ("fake://0", "fake://1", "boom-0", "boom-1"))
    assert pool.dead() == [0, 1] and not pool.health()
    with pytest.raises(NoLiveEngineError):
        pool.score([1], [2])


def test_on_dead_and_resync_run_once_and_the_replacement_rejoins_only_after_resync():
    bad, good = FakeEngine(0, error=ConnectionError("reset")), FakeEngine(1)
    replacement = FakeEngine(5)
    seen: dict[str, list] = {"on_dead": [], "resync": [], "dead_during_resync": []}

    def on_dead(i: int) -> FakeEngine:
        seen["on_dead"].append(i)
        return replacement

    def resync(i: int, engine: FakeEngine) -> None:
        seen["resync"].append((i, engine))
        seen["dead_during_resync"].append(pool.dead())
        engine.update_weights([("w", torch.zeros(1))], 7)

    pool = EnginePool([bad, good], chunk_size=1, backoff_s=0.01, on_dead=on_dead, resync=resync)
    pool.update_weights(iter([("w", torch.ones(1))]), 7)  # an iterator: every engine must still get the tensor
    assert bad.log == good.log == ["update_weights:1"]
    bad.generate_gate.clear()  # fail only once chunks 0 and 2 are both assigned to it
    threading.Timer(0.2, bad.generate_gate.set).start()
    groups = pool.generate(PROMPTS[:4], SamplingParams())
    assert len(bad.calls) == 2 and len(groups) == 4
    assert pool.wait_recovered(10)
    assert seen["on_dead"] == [0] and seen["resync"] == [(0, replacement)] and seen["dead_during_resync"] == [[0]]
    assert pool.dead() == [] and pool.engines[0] is replacement and pool.rejoined == 1
    assert pool.weight_version == 7
    assert set(sources(pool.generate(PROMPTS[:4], SamplingParams()))) == {1, 5}


def test_counters_are_taken_once_and_version_is_the_last_loaded_through_the_pool():
    bad, good = FakeEngine(0, error=ConnectionError("reset")), FakeEngine(1)
    recovered = threading.Event()

    def resync(i: int, engine: FakeEngine) -> None:
        engine.update_weights([], pool.version)  # what a resync must bring a replacement to
        recovered.set()

    pool = EnginePool([bad, good], chunk_size=1, backoff_s=0.01, on_dead=lambda i: FakeEngine(5), resync=resync)
    assert pool.version == 0 and pool.take_counters() == {"failures": 0, "failovers": 0, "restarts": 0}
    pool.update_weights([], 4)
    bad.generate_gate.clear()  # fail only once chunks 0 and 2 are both assigned to it: two re-sends, one failure
    threading.Timer(0.2, bad.generate_gate.set).start()
    pool.generate(PROMPTS[:4], SamplingParams())
    assert pool.wait_recovered(10) and recovered.is_set()
    assert pool.version == 4 and pool.engines[0].version == 4 and pool.weight_version == 4
    assert pool.take_counters() == {"failures": 1, "failovers": 2, "restarts": 1}
    assert pool.take_counters() == {"failures": 0, "failovers": 0, "restarts": 0}  # since the last call


class GoneEngine(FakeEngine):
    """A server that died: every call is refused."""

    def update_weights(self, named_tensors, version: int) -> None:
        raise ConnectionError("refused")

    @property
    def weight_version(self) -> int:
        raise ConnectionError("refused")


def test_with_its_only_engine_restarting_a_weight_sync_goes_to_the_replacement():
    """One engine, dead between a rollout and the weight sync: the sync must not fail the run. The load is kept as
    the pool's version, resync brings the replacement to it, and weight_version waits for the replacement."""
    gate, replacement = threading.Event(), FakeEngine(5)

    def on_dead(i: int) -> FakeEngine:
        gate.wait(10)  # the server takes a while to restart
        return replacement

    pool = EnginePool(
        [GoneEngine(0)], on_dead=on_dead, resync=lambda i, e: e.update_weights([], pool.version), recovery_wait_s=10
    )
    pool.update_weights([("w", torch.ones(1))], 3)  # marks it dead, starts its recovery, does not raise
    pool.flush_cache()
    assert pool.dead() == [0] and pool.version == 3
    threading.Timer(0.3, gate.set).start()
    assert pool.weight_version == 3 and replacement.version == 3 and pool.live() == [0]
    assert pool.take_counters() == {"failures": 1, "failovers": 0, "restarts": 1}


def test_a_load_elsewhere_records_its_version_only_when_it_completes_and_excludes_a_resync():
    """A broadcast that bypasses the pool (disaggregated mode): a resync waits for it, then brings the replacement
    to its version; a load that raised records nothing."""
    a, b, replacement = FakeEngine(0), FakeEngine(1), FakeEngine(5)
    order: list[str] = []

    def resync(i: int, engine: FakeEngine) -> None:
        order.append(f"resync to {pool.version}")
        engine.update_weights([], pool.version)

    pool = EnginePool([a, b], on_dead=lambda i: replacement, resync=resync)
    with pytest.raises(RuntimeError), pool.loading_elsewhere(2):
        raise RuntimeError("the broadcast failed")
    assert pool.version == 0
    with pool.loading_elsewhere(3):
        pool.mark_dead(0, ConnectionError("failed its health check"))  # recovery starts, must wait for the load
        time.sleep(0.3)
        order.append("load")
        a.version = b.version = 3
    assert pool.wait_recovered(10)
    assert order == ["load", "resync to 3"]
    assert pool.engines[0] is replacement and pool.weight_version == 3
    pool.mark_dead(0, ConnectionError("again"))  # the new engine: a second failure, a second recovery
    assert pool.wait_recovered(10) and pool.take_counters()["failures"] == 2


def test_without_a_recovery_a_weight_load_with_no_live_engine_fails():
    pool = EnginePool([GoneEngine(0)])
    with pytest.raises(NoLiveEngineError):
        pool.update_weights([("w", torch.ones(1))], 3)
    with pytest.raises(NoLiveEngineError):
        pool.weight_version  # noqa: B018 (a property that calls the engines)


def test_a_replacement_at_another_weight_version_stays_out():
    pool = EnginePool(
        [FakeEngine(0, version=3, error=ConnectionError("reset")), FakeEngine(1, version=3)],
        backoff_s=0.01,
        on_dead=lambda i: FakeEngine(9, version=0),
        resync=lambda i, engine: None,  # forgets to load the weights
    )
    pool.generate(PROMPTS[:2], SamplingParams())
    assert pool.wait_recovered(10)
    assert pool.dead() == [0] and pool.rejoined == 0 and "resync" in str(pool.last_errors[0])


def test_weight_version_is_the_version_every_live_engine_holds():
    pool = EnginePool([FakeEngine(0, version=1), FakeEngine(1, version=2)])
    with pytest.raises(RuntimeError, match="disagree"):
        _ = pool.weight_version
    pool.update_weights([("w", torch.ones(1))], 4)
    assert pool.weight_version == 4
    assert all(c.weight_version == 4 for g in pool.generate(PROMPTS, SamplingParams(n=2)) for c in g)


def test_control_calls_fan_out_to_every_live_engine_and_score_goes_to_one():
    engines = [FakeEngine(i) for i in range(3)]
    pool = EnginePool(engines)
    pool.release_memory(["kv_cache"])
    pool.resume_memory(["kv_cache"])
    pool.flush_cache()
    pool.abort()
    for e in engines:
        assert e.log == ["release:['kv_cache']", "resume:['kv_cache']", "flush_cache", "abort"]
    assert pool.score([1], [2, 3]).tolist() == [0.0, 0.0]
    assert [e.log.count("score") for e in engines] == [1, 0, 0]
    assert pool.health()
    pool.shutdown()
    assert all(e.log[-1] == "shutdown" for e in engines)


def test_abort_returns_chunks_not_yet_sent_as_aborted_and_empty():
    e = FakeEngine(0, version=6)
    e.generate_gate.clear()
    pool = EnginePool([e], chunk_size=1, max_workers=1)
    out: dict[str, list] = {}
    worker = threading.Thread(target=lambda: out.setdefault("groups", pool.generate(PROMPTS[:3], SamplingParams())))
    worker.start()
    assert e.entered.wait(5)
    pool.abort()
    e.generate_gate.set()
    worker.join(5)
    first, *rest = out["groups"]
    assert first[0].finish is SampleStatus.TRUNCATED and len(e.calls) == 1
    assert all(g[0].finish is SampleStatus.ABORTED and g[0].token_ids == [] for g in rest)
    assert all(g[0].weight_version == 6 and g[0].prompt_tokens == 3 for g in rest)


# ------------------------------------------------------------------------------------------ real servers


def _kill_when_busy(pool: EnginePool, victim, after_s: float, report: dict) -> None:
    """SIGKILL the server `victim` while the pool has prompts in flight on it."""
    deadline = time.monotonic() + 30
    while pool.loads()[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(after_s)
    report["busy"] = pool.loads()[1] > 0
    os.kill(victim.pid, signal.SIGKILL)


def test_a_server_killed_mid_generation_loses_no_prompt_and_rejoins_resynced(model_dir, other_dir, tmp_path):
    """Two `lcot-mega serve` processes; server 1 is SIGKILLed while generating. Its chunks go to server 0, the
    supervisor restarts it (from `model_dir`'s weights), resync loads the pool's weights (`other_dir`, version 1),
    and then both servers score alike and report one version."""
    prompts = [[5 + i, 6, 7] for i in range(16)]
    params = SamplingParams(max_new_tokens=300, ignore_eos=True, n=2, seed=3)
    factory = lambda i, port: embedded_command(model_dir, port)  # noqa: E731
    with ServerSupervisor(factory, 2, tmp_path / "logs", 60, env={"OMP_NUM_THREADS": "1"}) as sup:
        restarted, resynced = [], []

        def on_dead(i: int):
            sup.restart(i)
            restarted.append(i)
            return sup.client(i, retries=0, timeout_s=120)

        def resync(i: int, engine) -> None:
            resynced.append((i, engine.weight_version, engine.score(PROBE[:1], PROBE[1:])))
            engine.load_from_disk(str(other_dir), 1)

        pool = EnginePool(sup.clients(retries=0, timeout_s=120), chunk_size=4, backoff_s=0.1, on_dead=on_dead,
                          resync=resync)  # fmt: skip
        pool.for_each_live(lambda e: e.load_from_disk(str(other_dir), 1))  # the pool's weights
        report: dict[str, bool] = {}
        killer = threading.Thread(target=_kill_when_busy, args=(pool, sup.processes[1], 0.3, report))
        killer.start()
        groups = pool.generate(prompts, params)
        killer.join()

        assert report["busy"] and pool.failovers >= 1
        assert len(groups) == 16 and all(len(g) == 2 for g in groups)
        for g in groups:
            for c in g:
                assert c.finish is SampleStatus.TRUNCATED and len(c.token_ids) == 300 and c.weight_version == 1

        assert pool.wait_recovered(60)
        assert restarted == [1] and sup.processes[1].launches == 2 and sup.dead() == [] and pool.dead() == []
        (index, version_before, probe_before), *more = resynced
        assert index == 1 and not more and version_before == 0
        a, b = (e.score(PROBE[:1], PROBE[1:]) for e in pool.engines)
        assert (probe_before - a).abs().max() > 0.1  # it came back with other weights: resync made it agree
        assert (a - b).abs().max() < 1e-5
        assert [e.weight_version for e in pool.engines] == [1, 1] and pool.weight_version == 1
        pool.shutdown()
