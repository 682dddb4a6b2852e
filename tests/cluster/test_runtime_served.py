"""The local runtime with served engines (`rollout.served`): two `lcot-mega serve` processes behind an EnginePool. A
server SIGKILLed or SIGSTOPped mid-generation loses no prompt, is restarted on its URL and rejoins with the actor's
current weights (not the model directory's); a resync waits for a train step in progress; close leaves no process."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from lcot_mega.cluster.runtime import Runtime, build_runtime
from lcot_mega.config import ActorConfig, ClusterConfig, Config, ModelConfig, RolloutConfig, TrainerConfig
from lcot_mega.rollout.protocol import SamplingParams
from lcot_mega.trainer.faults import fire_engine_fault
from lcot_mega.types import SampleStatus

pytest.importorskip("megatron.core")

PROBE = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9]
PROMPTS = [[5 + i, 6, 7] for i in range(12)]
PARAMS = SamplingParams(max_new_tokens=60, ignore_eos=True, n=2, seed=3)
TIMEOUT_S = 8.0  # a hung server is found after this long; a healthy one answers a chunk in well under a second


def group_gone(pgid: int) -> bool:
    """No running process is left in process group `pgid` (zombies count as gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return False
    return True


@pytest.fixture(scope="module")
def rt(model_dir, tmp_path_factory):
    cfg = Config(
        model=ModelConfig(path=str(model_dir)),
        rollout=RolloutConfig(served=True, request_timeout_s=TIMEOUT_S),
        actor=ActorConfig(micro_batch_tokens=1024),
        trainer=TrainerConfig(run_dir=str(tmp_path_factory.mktemp("run")), seed=3),
        cluster=ClusterConfig(num_engines=2),
    )
    runtime = build_runtime(cfg)
    yield runtime
    runtime.close()


def probes(rt: Runtime) -> list[torch.Tensor]:
    return [e.score(PROBE[:1], PROBE[1:]) for e in rt.engine.engines]


def generate_through(rt: Runtime, kind: str, victim: int) -> list:
    """Fire the fault right before a rollout, as the driver does for `debug.inject`; the rollout's answers."""
    rt.engine.take_counters()
    fault = fire_engine_fault(rt, kind, victim)
    groups = rt.engine.generate(PROMPTS, PARAMS)
    fault.join(timeout=30)
    return groups


def assert_all_answered(groups: list, version: int) -> None:
    assert len(groups) == len(PROMPTS) and all(len(g) == PARAMS.n for g in groups)
    for g in groups:
        for c in g:
            assert c.finish is SampleStatus.TRUNCATED and len(c.token_ids) == 60 and c.weight_version == version


def assert_rejoined_in_sync(rt: Runtime, version: int) -> None:
    assert rt.engine.wait_recovered(120) and rt.engine.live() == [0, 1]
    a, b = probes(rt)
    assert (a - b).abs().max() < 1e-5  # the restarted server holds what the other holds
    assert [e.weight_version for e in rt.engine.engines] == [version, version]


def test_served_runtime_starts_one_server_per_engine_with_its_own_log(rt):
    assert len(set(rt.servers.urls)) == 2 and rt.servers.dead() == [] and rt.engine.live() == [0, 1]
    assert all((rt.servers.log_dir / f"server-{i}.log").is_file() for i in range(2))
    assert rt.servers.log_dir.parent.name.startswith("run") and not rt.release_engine_memory  # CPU servers


def test_a_server_killed_mid_generation_loses_no_prompt_and_rejoins_with_the_actors_current_weights(rt):
    initial = probes(rt)[0]
    with torch.no_grad():  # weights no server can load from the model directory
        gen = torch.Generator().manual_seed(0)
        for p in rt.actor.ranks.rank.actor.chunks[0].parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    rt.sync_weights(1)
    old_pid = rt.servers.processes[1].pid

    groups = generate_through(rt, "kill", 1)

    assert_all_answered(groups, 1)
    assert_rejoined_in_sync(rt, 1)
    assert rt.servers.processes[1].pid != old_pid and group_gone(old_pid)
    assert (probes(rt)[1] - initial).abs().max() > 0.1  # resync loaded the actor's weights, not the model's
    metrics = rt.engine_metrics()
    assert metrics["rollout/engine_failures"] == 1 and metrics["rollout/engine_restarts"] == 1
    assert metrics["rollout/engine_failovers"] >= 1 and metrics["rollout/engines_live"] == 2
    assert "launch 2 at" in (rt.servers.log_dir / "server-1.log").read_text()


def test_a_hung_server_is_found_by_the_request_timeout_killed_and_restarted(rt):
    old_pid = rt.servers.processes[0].pid
    t0 = time.monotonic()
    groups = generate_through(rt, "hang", 0)
    assert time.monotonic() - t0 >= TIMEOUT_S  # the stopped server's chunk waited for its timeout

    assert_all_answered(groups, 1)
    assert_rejoined_in_sync(rt, 1)
    assert group_gone(old_pid)  # SIGKILLed: a SIGTERM would stay pending in the stopped process
    metrics = rt.engine_metrics()
    assert metrics["rollout/engine_failures"] == 1 and metrics["rollout/engine_restarts"] == 1


def test_a_resync_waits_for_a_train_step_in_progress(rt):
    launches = rt.servers.processes[1].launches
    with rt.actor.lock:  # what train_step holds while the optimizer changes the weights
        groups = generate_through(rt, "kill", 1)
        deadline = time.monotonic() + 60
        while not (rt.servers.processes[1].launches > launches and rt.servers.client(1, retries=0).health()):
            assert time.monotonic() < deadline, "server 1 did not come back"
            time.sleep(0.1)
        time.sleep(1.0)
        assert rt.engine.dead() == [1]  # restarted, but it may not read the weights yet
    assert_all_answered(groups, 1)
    assert_rejoined_in_sync(rt, 1)


def test_every_server_dead_between_rollout_and_sync_gets_the_sync_when_it_is_back(rt):
    before = probes(rt)[0]
    with torch.no_grad():  # the next step's weights
        gen = torch.Generator().manual_seed(1)
        for p in rt.actor.ranks.rank.actor.chunks[0].parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    for proc in rt.servers.processes:
        proc.signal(signal.SIGKILL)
    assert rt.engine.live() == [0, 1]  # nobody asked them anything yet
    rt.sync_weights(2)  # finds both dead: kept for the replacements, not an error
    assert_all_answered(rt.engine.generate(PROMPTS, PARAMS), 2)  # waits for a replacement
    assert_rejoined_in_sync(rt, 2)
    assert (probes(rt)[0] - before).abs().max() > 0.1


def test_a_sync_waiting_for_the_pool_lock_does_not_hold_the_actor_lock(rt):
    """A recovery holds the pool's weight lock, then reads the weights under the actor's: a sync that held the
    actor's lock while it waits for the pool's would wait for the recovery forever, and the recovery for it."""
    held, release = threading.Event(), threading.Event()

    def recovery_holding_the_pool_lock() -> None:
        with rt.engine._weights_lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=recovery_holding_the_pool_lock)
    holder.start()
    held.wait(10)
    errors = []

    def sync_in_a_thread() -> None:  # the probe check's actor forward included (rollout.verify_sync)
        try:
            rt.sync_weights(1)
        except Exception as e:
            errors.append(e)

    sync = threading.Thread(target=sync_in_a_thread)
    sync.start()
    time.sleep(0.5)
    assert sync.is_alive()  # waits for the pool's lock...
    assert rt.actor.lock.acquire(timeout=5)  # ...without holding the actor's meanwhile
    rt.actor.lock.release()
    release.set()
    sync.join(120)
    holder.join(10)
    assert not sync.is_alive() and rt.engine.weight_version == 1 and errors == []


def test_close_stops_every_server_process(rt):
    pids = [p.pid for p in rt.servers.processes]
    rt.close()
    assert rt.servers.dead() == [0, 1] and all(group_gone(pid) for pid in pids)
    rt.close()  # idempotent


def test_faults_need_served_engines_and_name_their_kinds():
    plain = Runtime(actor=None, engine=None, tokenizer=None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"rollout\.served=true"):
        fire_engine_fault(plain, "kill")
    with pytest.raises(ValueError, match="'hang', 'kill'"):
        fire_engine_fault(plain, "explode")
    assert plain.engine_metrics() == {} and not plain.release_engine_memory
