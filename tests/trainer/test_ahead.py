"""Rollout ahead of training (`trainer.max_staleness`): the schedule and its staleness, the bound, the checkpointed
state, and for real: a k=1 run killed at random points resumes on the very samples of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_model_dir

from lcot_mega.observe import read_metrics
from lcot_mega.trainer.ahead import RolloutAhead
from lcot_mega.trainer.collect import Collected
from lcot_mega.types import Batch, Group, Prompt, Sample, SampleStatus

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
_TIMING = ("perf/", "sync/seconds", "sync/gb_per_s")


class _Engine:
    """The weights version an engine holds, and whether anything aborted it."""

    def __init__(self) -> None:
        self.version, self.aborts = 0, 0
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborts += 1
        self.aborted.set()


def _collector(engine: _Engine, log: list, seconds: float = 0.0):
    """A collect function: one group of two samples per step, sampled with the engine's version (logged)."""

    def collect_fn(step: int) -> Collected:
        time.sleep(seconds)
        log.append((step, engine.version))
        prompt = Prompt(f"p{step}", f"q{step}", "1", (1, 2), "src")
        samples = [Sample(prompt, [3], weight_version=engine.version, reward=float(i)) for i in range(2)]
        return Collected(Batch([Group(prompt, samples)]), {"rollout/rounds": 1.0})

    return collect_fn


def _run(ahead: RolloutAhead, engine: _Engine, collect_fn, steps: int, *, skip: tuple[int, ...] = ()) -> list[dict]:
    """The driver's schedule: take, start, (train), join, sync unless the update was skipped."""
    out = []
    for step in range(1, steps + 1):
        batch = ahead.take(step, collect_fn)
        ahead.start(step, collect_fn)
        metrics = batch.metrics | ahead.join()
        if step not in skip:
            engine.version = step
            ahead.synced(step)
        out.append(metrics)
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_step_t_plus_k_is_sampled_during_step_t_with_the_weights_of_step_t_minus_1(k):
    engine, log = _Engine(), []
    ahead = RolloutAhead(k, 6, engine)
    metrics = _run(ahead, engine, _collector(engine, log), 6)
    # step 1 samples at once with version 0, and the first k+1 steps' batches all come from version 0; from then
    # on step j's batch was sampled during step j-k, with that step's starting weights (version j-k-1)
    assert log == [(j, max(0, j - k - 1)) for j in range(1, 7)]
    assert [m["rollout/staleness_max"] for m in metrics] == [min(j - 1, k) for j in range(1, 7)]
    assert all(m["rollout/stale_dropped_groups"] == 0 for m in metrics)
    assert all("perf/rollout_wait_s" in m for m in metrics)
    ahead.close()


def test_a_skipped_update_makes_the_next_batches_fresher():
    engine, log = _Engine(), []
    ahead = RolloutAhead(1, 5, engine)
    metrics = _run(ahead, engine, _collector(engine, log), 5, skip=(2,))
    # no sync after step 2: step 3 trains version 1 on step-3 samples of version 1 (age 0)
    assert [m["rollout/staleness_max"] for m in metrics] == [0, 1, 0, 1, 1]
    ahead.close()


def test_groups_over_the_bound_are_dropped_and_counted():
    engine = _Engine()
    ahead = RolloutAhead(1, 3, engine)
    prompt = Prompt("p", "q", "1", (1,), "")
    groups = [
        Group(prompt, [Sample(prompt, [2], weight_version=v), Sample(prompt, [2], weight_version=5)]) for v in (3, 4)
    ]
    ahead.pending[2] = Collected(Batch(groups), {})
    ahead.synced(5)  # ages 2 (over the bound of 1: the whole group goes) and 1
    got = ahead.take(2, _collector(engine, []))
    assert [g.samples[0].weight_version for g in got.batch.groups] == [4]
    assert got.metrics["rollout/stale_dropped_groups"] == 1.0 and got.metrics["rollout/staleness_max"] == 1.0
    assert got.metrics["rollout/staleness_mean"] == 0.5  # ages 1 and 0 of the kept group
    # an offline (injected) sample has no sampling policy: it never makes a group stale
    offline = Group(
        prompt, [Sample(prompt, [2], weight_version=0, offline=True), Sample(prompt, [2], weight_version=5)]
    )
    ahead.pending[3] = Collected(Batch([offline]), {})
    assert len(ahead.take(3, _collector(engine, [])).batch.groups) == 1


def test_state_round_trips_every_sample_field_exactly_through_json():
    engine = _Engine()
    ahead = RolloutAhead(2, 9, engine)
    prompt = Prompt("uid-7", "text", "42", (5, 6, 7), "chain_sum")
    sample = Sample(prompt, [1, 2], "ab", [-0.1234567890123, -1e-9], SampleStatus.TRUNCATED, 3, 0.75, True, -1.0 / 3)
    sample.token_versions = [3, 4]  # continued across a sync (partial rollout)
    offline = Sample(prompt, [4], "c", None, SampleStatus.COMPLETED, 3, 1.0, True, 0.5, offline=True)
    ahead.pending = {4: Collected(Batch([Group(prompt, [sample, offline])]), {"reward/mean": 0.875})}
    ahead.synced(3)
    ahead.dropped_groups = 2
    other = RolloutAhead(2, 9, engine)
    other.load_state_dict(json.loads(json.dumps(ahead.state_dict())))
    assert other.version == 3 and other.dropped_groups == 2
    got = other.pending[4]
    assert got.metrics == {"reward/mean": 0.875}
    for a, b in zip(got.batch.samples, [sample, offline], strict=True):
        for f in dataclasses.fields(Sample):  # a field added to Sample and not saved fails here
            assert getattr(a, f.name) == getattr(b, f.name), f.name


def test_close_aborts_what_is_being_sampled_and_a_rollback_discards_the_batches_ahead():
    engine = _Engine()
    ahead = RolloutAhead(2, 9, engine)
    ahead.start(1, _collector(engine, []))
    ahead.join()
    assert sorted(ahead.pending) == [2, 3]
    assert ahead.discard() == 2 and ahead.pending == {} and ahead.dropped_groups == 2

    def until_aborted(step: int) -> Collected:
        engine.aborted.wait(30)
        return _collector(engine, [])(step)

    ahead.start(3, until_aborted)
    ahead.close()  # the worker is still sampling: the engine is aborted, then the worker awaited
    assert engine.aborts == 1
    with pytest.raises(ValueError, match="depth"):
        RolloutAhead(0, 3, engine)


# ----------------------------------------------------------------------------- end to end, in real processes


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


COMMON = ("trainer.steps=6", "trainer.save_every=1", "trainer.eval_every=0", "eval.at_start=false")
ASYNC = ("trainer.max_staleness=1",)


def _args(run_dir: Path, model: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model}", *COMMON, *overrides]
    return [*args, "--run-dir", str(run_dir)]


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time" and not k.startswith(_TIMING)}


PARTIAL = (  # responses of up to 16 tokens in windows of 4; stopping on any letter gives the tiny model short ones
    "trainer.max_staleness=1",
    "rollout.partial=true",
    "rollout.max_new_tokens=16",
    f"rollout.stop=[{','.join(string.ascii_letters)}]",
)


# the sampling-ahead variant is in the slow tier (CI time); the partial one kills and resumes the same machinery
@pytest.mark.parametrize("mode", [pytest.param("ahead", marks=pytest.mark.slow), "partial"])
def test_a_k1_run_trains_one_version_old_samples_and_resumes_after_kills_at_random_points(tmp_path, model, mode):
    overrides = ASYNC if mode == "ahead" else PARTIAL
    straight = subprocess.run(
        _args(tmp_path / "straight", model, *overrides), capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in want] == list(range(1, 7))
    if mode == "ahead":
        assert [r["rollout/staleness_max"] for r in want] == [0, 1, 1, 1, 1, 1]
        assert all(r["rollout/staleness_mean"] == 1.0 for r in want[1:]) and want[3]["actor/response_tokens"] > 0
    else:  # finished surplus and unfinished responses carried into the next step: at most 1 version old
        assert all(r["rollout/staleness_max"] <= 1 for r in want) and any(r["rollout/staleness_max"] for r in want)
        assert any(r["rollout/multi_version_frac"] > 0 for r in want)  # trained responses sampled by two versions
        assert any(r["rollout/open_groups"] > 0 for r in want[1:-1])  # checkpoints hold unfinished responses

    rng = random.Random(19)
    run = tmp_path / "killed"
    kills = 0
    for after in (2, 4):  # SIGKILL once `after` steps are logged, a random moment later (mid rollout, update or save)
        proc = subprocess.Popen(
            _args(run, model, *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= after:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1  # at least one kill landed before the run could finish
    last = subprocess.run(_args(run, model, *overrides), capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    got = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(want, got, strict=True):  # the same samples trained: every reward, length, loss and norm
        assert _comparable(a) == _comparable(b), a["step"]


def test_k0_is_the_synchronous_loop(tmp_path, model):
    proc = subprocess.run(
        _args(tmp_path / "sync", model, "trainer.steps=2"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "sync" / "metrics.jsonl")
    assert not any(k.startswith("rollout/stale") or k == "perf/rollout_wait_s" for r in rows for k in r)


@pytest.mark.slow  # about 30 s: a k1 run to its second step, then the resume; a message, not a result
def test_resuming_a_k1_checkpoint_with_k0_says_what_it_drops(tmp_path, model):
    run = tmp_path / "run"
    proc = subprocess.Popen(_args(run, model, *ASYNC), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a checkpoint after the current step, with the batch sampled for the next
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stopped by SIGTERM" in out, err[-3000:]
    second = subprocess.run(_args(run, model), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # the tiny config's 4 prompts a step, sampled for the step after the one the checkpoint holds
    assert "the checkpoint holds 4 groups sampled ahead of the actor" in second.stdout
