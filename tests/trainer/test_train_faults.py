"""`lcot-mega train` with injected faults (debug.inject): each guard and recovery path through a real run.

Every run is a real process on the tiny model; outcomes are read back from what the run left on disk
(metrics.jsonl, guards.log, checkpoints re-loaded tensor by tensor), never from the code under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import make_tiny_model_dir

from lcot_mega.checkpoint.store import CheckpointStore, verify_checkpoint_dir
from lcot_mega.observe import read_metrics

pytest.importorskip("megatron.core")

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
QUIET = ("trainer.eval_every=0", "eval.at_start=false")
PASSING = ("ok", "log", "warn")


def _train(run_dir: Path, model: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model}", *QUIET, *overrides]
    return subprocess.run([*args, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The policy weights of a checkpoint, read straight from its torch_dist files (no actor involved)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt / "model"))
    meta = reader.read_metadata().state_dict_metadata
    tensors = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata) and not k.endswith("_extra_state")
    }
    load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def _steps(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}


def test_nan_gradient_skips_the_step_and_leaves_the_weights_unchanged(tmp_path, model):
    run = tmp_path / "run"
    _ok(_train(run, model, "trainer.steps=3", "trainer.save_every=1", "debug.inject.nan_grad_at_step=[2]"))
    m = _steps(run)
    assert m[2]["guard/action"] == "skip" and "nan not finite" in m[2]["guard/reason"]
    assert (m[2]["actor/update_ok"], m[2]["actor/gate_skipped"], m[2]["actor/skipped"]) == (0.0, 1.0, 1.0)
    assert m[1]["guard/action"] in PASSING and m[3]["guard/action"] in PASSING
    assert m[3]["actor/update_ok"] == 1.0  # training goes on after the skipped step
    store = CheckpointStore(run / "checkpoints", is_writer=False)
    w1, w2, w3 = (_model_tensors(store.path_for(s)) for s in (1, 2, 3))
    assert w1.keys() == w2.keys() and len(w1) > 3
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # step 2 changed nothing
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # step 3 did train (the comparison can fail)
    assert "step 2 skip" in (run / "guards.log").read_text()


def test_entropy_collapse_rolls_back_to_the_last_good_checkpoint_with_a_lower_lr(tmp_path, model):
    run = tmp_path / "run"
    proc = _train(
        run,
        model,
        "trainer.steps=9",
        "trainer.save_every=1",
        "guards.entropy.window=2",  # patience stays at its default, 3 steps in a row
        "debug.inject.entropy_collapse_at_step=[4]",  # after step 4's update: step 5 samples from a sharp policy
    )
    _ok(proc)
    m = _steps(run)
    assert sorted(m) == list(range(1, 10))
    assert [m[s]["guard/action"] for s in (1, 2, 3, 4)] == [m[1]["guard/action"]] * 4
    for s in (5, 6):  # waiting out the patience: warnings, the updates kept
        assert m[s]["guard/action"] == "warn" and f"{s - 4} of 3 steps in a row" in m[s]["guard/reason"]
    assert m[7]["guard/action"] == "rollback" and "entropy" in m[7]["guard/reason"]
    assert m[5]["actor/entropy"] < 0.25 * m[4]["actor/entropy"]
    lr = m[4]["actor/lr"]
    assert m[8]["actor/lr"] == pytest.approx(0.5 * lr) and m[9]["actor/lr"] == pytest.approx(0.5 * lr)
    assert m[9]["guard/rollbacks"] == 1.0 and m[9]["guard/lr_scale"] == 0.5
    # the restored policy is the step-3 one again (4, 5 and 6 confirmed nothing good): its entropy is back
    assert m[8]["actor/entropy"] == pytest.approx(m[3]["actor/entropy"], rel=0.3)
    log = (run / "guards.log").read_text()
    assert "step 7 rollback" in log and "rolled back to good checkpoint step 3" in log
    assert "rolled back to step 3" in proc.stdout
    store = CheckpointStore(run / "checkpoints", is_writer=False)
    assert not {4, 5, 6} & set(store.steps())  # the abandoned timeline is gone
    assert store.last_good().step >= 3


def test_a_rollback_drops_the_batch_sampled_ahead_with_the_abandoned_weights(tmp_path, model):
    """trainer.max_staleness=1: the batch step 8 would have trained was sampled during step 7 by the collapsed
    policy; the rollback drops it (counted) and step 8 samples afresh with the restored weights."""
    run = tmp_path / "run"
    scenario = ("trainer.steps=8", "trainer.save_every=1", "guards.entropy.window=2")
    _ok(_train(run, model, *scenario, "debug.inject.entropy_collapse_at_step=[4]", "trainer.max_staleness=1"))
    m = _steps(run)
    assert m[7]["guard/action"] == "rollback"
    assert m[7]["rollout/rollback_dropped_groups"] == 4.0  # trainer.prompts_per_step of the tiny config
    assert m[8]["rollout/dropped_groups_total"] == 4.0
    assert m[8]["rollout/staleness_max"] == 0.0 and m[6]["rollout/staleness_max"] == 1.0
    assert m[8]["actor/entropy"] == pytest.approx(m[3]["actor/entropy"], rel=0.3)  # the step-3 policy sampled it


def test_sigterm_saves_and_exits_cleanly_and_the_same_command_resumes(tmp_path, model):
    run = tmp_path / "run"
    args = ("trainer.steps=4", "trainer.save_every=0", "debug.inject.sigterm_at_step=[2]")
    first = _train(run, model, *args)
    _ok(first)
    assert "SIGTERM received" in first.stdout and "stopped by SIGTERM after step 2" in first.stdout
    assert sorted(_steps(run)) == [1, 2]  # step 2 ran to its end
    assert CheckpointStore(run / "checkpoints", is_writer=False).latest_valid().step == 2
    second = _train(run, model, "trainer.steps=4", "trainer.save_every=0")
    _ok(second)
    assert "at step 2" in second.stdout
    assert sorted(_steps(run)) == [1, 2, 3, 4]


def test_sigterm_to_the_whole_process_group_still_saves_the_step_in_flight(tmp_path, model):
    """A scheduler's preemption (scancel, SLURM's SIGTERM) and Ctrl-C signal every process of the job, helpers
    included: megatron's writer-queue server and the grading workers must outlive it long enough for the final save
    (session 21: the queue server died with the group and the save failed with a broken pipe)."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model}", *QUIET]
    args += ["trainer.steps=30", "trainer.save_every=1", "--run-dir", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() or 2 not in _steps(run):  # a save (and its helpers) happened
            assert proc.poll() is None and time.monotonic() < deadline, "training did not reach step 2"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    last = max(_steps(run))
    assert f"stopped by SIGTERM after step {last}" in out and last < 30
    assert CheckpointStore(run / "checkpoints", is_writer=False).latest_valid().step == last


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_uses_it(tmp_path, model):
    run = tmp_path / "run"
    crashed = _train(run, model, "trainer.steps=4", "trainer.save_every=1", "debug.inject.crash_in_save_at_step=[3]")
    # returning at all shows no child outlived the crash holding our pipes (megatron's writer-queue server did)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    root = run / "checkpoints"
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the half-written step 3
    verify_checkpoint_dir(CheckpointStore(root, is_writer=False).path_for(2))
    resumed = _train(run, model, "trainer.steps=4", "trainer.save_every=1")
    _ok(resumed)
    assert "at step 2" in resumed.stdout
    assert sorted(_steps(run)) == [1, 2, 3, 4]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_full_disk_at_save_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, model):
    run = tmp_path / "run"
    full = _train(run, model, "trainer.steps=3", "trainer.save_every=1", "debug.inject.disk_full_at_step=[2]")
    assert full.returncode == 4, full.stderr[-2000:]
    assert "no space left on device" in full.stderr and "previous checkpoint is intact" in full.stderr
    store = CheckpointStore(run / "checkpoints", is_writer=False)
    assert store.steps() == [1] and store.latest_valid().step == 1
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, model):
    run = tmp_path / "run"
    _ok(_train(run, model, "trainer.steps=3", "trainer.save_every=1"))
    newest = CheckpointStore(run / "checkpoints", is_writer=False).path_for(3)
    victim = next(p for p in sorted((newest / "model").iterdir()) if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    resumed = _train(run, model, "trainer.steps=4", "trainer.save_every=1")
    _ok(resumed)
    assert "falling back" in resumed.stderr and "at step 2" in resumed.stdout
    assert sorted(_steps(run)) == [1, 2, 3, 4]


def test_halt_saves_the_state_and_exits_3_with_a_report(tmp_path, model):
    run = tmp_path / "run"
    # a reward floor no run can meet: the first step halts
    halted = _train(run, model, "trainer.steps=3", "guards.reward.action=halt", "guards.reward.min=2.0")
    assert halted.returncode == 3, halted.stderr[-2000:]
    assert "halted by the guards" in halted.stderr and "reward" in halted.stderr
    m = _steps(run)
    assert sorted(m) == [1] and m[1]["guard/action"] == "halt"
    assert "halted" in (run / "guards.log").read_text()
    assert CheckpointStore(run / "checkpoints", is_writer=False).latest_valid().step == 1


def test_a_grader_that_hangs_times_out_scores_zero_and_the_run_goes_on(tmp_path, model):
    """The grader is isolated per process (tests/reward); here the loop around it: a reward function that hangs on
    every response of even length (tests/helpers/hanging_reward.py) costs reward.timeout_s per grade, never the run."""
    run = tmp_path / "run"
    tests = str(Path(__file__).parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model}", *QUIET]
    args += ["trainer.steps=2", "trainer.prompts_per_step=2", "reward.fn=helpers.hanging_reward:hang_on_even_length"]
    args += ["reward.timeout_s=1"]
    proc = subprocess.run([*args, "--run-dir", str(run)], capture_output=True, text=True, timeout=300, env=env)
    _ok(proc)
    m = _steps(run)
    assert sorted(m) == [1, 2]
    assert all(0 < m[s]["reward/timeout_frac"] < 1 for s in (1, 2)), [m[s]["reward/timeout_frac"] for s in (1, 2)]
