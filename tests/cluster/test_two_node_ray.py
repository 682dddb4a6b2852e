"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`: a head and a second raylet, one logical CPU each):
`lcot-mega train` joins them through `cluster.ray_address`, passes the fit check, and runs one colocated step
whose two actor ranks (DP=2, one CPU each) can only be placed one per node, so the step's gloo collectives and
rank 0's engine really cross the node boundary. The placement-group table (kept after the group is removed)
shows where each bundle landed. The fit check and `examples/multinode/ray_job_submit.sh` read the same live
cluster (the submission itself goes to a stand-in `ray`: job submission needs the dashboard, off here)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lcot_mega.observe import read_metrics

ray = pytest.importorskip("ray")
pytest.importorskip("megatron.core")
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
SUBMIT = ROOT / "examples" / "multinode" / "ray_job_submit.sh"
RUN = {"capture_output": True, "text": True, "timeout": 120}


def _node_labels() -> dict[str, str]:
    """Node id -> the custom resource naming it ('node_a' on the head, 'node_b' on the added node)."""
    return {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes() if n["Alive"]}


def _actor_rank_nodes(labels: dict[str, str]) -> list[str]:
    """Labels of the nodes the actor ranks' bundles landed on, by bundle index (ranks reserve {CPU: 1} each)."""
    groups = [
        g
        for g in ray.util.placement_group_table().values()
        if list(g["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]
    ]
    assert len(groups) == 1, groups
    return [labels[g] for _, g in sorted(groups[0]["bundles_to_node_id"].items())]


@pytest.fixture(scope="module")
def two_nodes():
    """A head ('node_a') and a second node ('node_b'), one logical CPU each; this process is not connected."""
    if ray.is_initialized():
        pytest.skip("a Ray instance is already up in this process")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# In the default tier on purpose (about 50 s): CI must show a step running across two Ray nodes.
def test_one_train_step_runs_its_actor_ranks_on_two_ray_nodes(two_nodes, model_dir, tmp_path):
    steps = ["trainer.steps=1", "trainer.eval_every=0", "eval.at_start=false", "trainer.save_every=0"]
    layout = ["cluster.mode=colocated", "cluster.actor_ranks=2", f"cluster.ray_address={two_nodes.address}"]
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model_dir}", *steps, *layout]
    run_dir = tmp_path / "run"
    proc = subprocess.run([*args, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "rollout/logp_gap_max" in r] == [1]

    ray.init(address=two_nodes.address)
    try:
        labels = _node_labels()
        assert sorted(labels.values()) == ["node_a", "node_b"]
        assert sorted(_actor_rank_nodes(labels)) == ["node_a", "node_b"]
    finally:
        ray.shutdown()


def test_fit_check_and_job_submit_script_read_the_live_two_node_cluster(two_nodes, tmp_path):
    fit = [sys.executable, "-m", "lcot_mega.cluster.fit", str(TINY), "cluster.mode=colocated"]
    ok = subprocess.run([*fit, "cluster.actor_ranks=2", "--ray-address", two_nodes.address], **RUN)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.splitlines()[0].endswith("on 2 nodes x 1 CPU: fits, 0 CPUs spare")
    bad = subprocess.run([*fit, "--ray-address", two_nodes.address, "cluster.actor_ranks=3"], **RUN)
    assert bad.returncode == 1 and "asks for 3 CPUs" in bad.stdout, bad.stdout + bad.stderr[-2000:]

    # the submit script: the fit check against the live cluster, then `ray job submit` (a stand-in that records)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ray"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RAY_ARGS_OUT"\n')
    fake.chmod(0o755)
    env = os.environ | {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_ARGS_OUT": str(tmp_path / "args"),
        "RAY_ADDRESS": "http://127.0.0.1:8265",
        "RAY_GCS_ADDRESS": two_nodes.address,
        "RUN_DIR": "runs/two",
        "JOB_ID": "job-1",
    }
    script = [str(SUBMIT), str(TINY), "cluster.mode=colocated", "cluster.actor_ranks=2", "rollout.stop=[a b]"]
    proc = subprocess.run(["bash", *script], env=env, **RUN)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:6] == ["job", "submit", "--submission-id", "job-1", "--working-dir", "."]
    assert args[-2] == "--"
    entry = shlex.split(args[-1])
    assert entry[:4] == ["python", "-m", "lcot_mega.cli", "train"]
    assert entry[4:] == [
        str(TINY),
        "cluster.ray_address=auto",
        "cluster.mode=colocated",
        "cluster.actor_ranks=2",
        "rollout.stop=[a b]",
        "--run-dir",
        "runs/two",
    ]
    # a layout that does not fit is never submitted
    (tmp_path / "args").unlink()
    proc = subprocess.run(["bash", *script[:2], "cluster.actor_ranks=3"], env=env, **RUN)
    assert proc.returncode == 1 and not (tmp_path / "args").exists()
