"""The placement fit check: hand-worked layouts that fit, one misfit per reason (each naming the key to change),
first-fit-decreasing packing where totals alone would pass, the wiring into `build_ray_runtime`, and the dry-run
command line with its exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lcot_mega.cluster import fit
from lcot_mega.cluster.fit import Bundle, NodeResources, check_fit, first_unpacked, nodes_from_ray, uniform_nodes
from lcot_mega.config import ActorConfig, ClusterConfig, Config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
TWO_BY_8 = uniform_nodes(2, cpus=64, gpus=8)


def _cfg(tp: int = 1, pp: int = 1, **cluster) -> Config:
    return Config(actor=ActorConfig(tensor_parallel=tp, pipeline_parallel=pp), cluster=ClusterConfig(**cluster))


def _gpu_disagg(**cluster) -> dict:
    return dict(mode="disaggregated", gpus_per_rank=1, gpus_per_engine=1) | cluster


def test_tp2_pp2_dp2_plus_two_engines_fits_two_nodes_of_8_with_6_spare():
    report = check_fit(_cfg(2, 2, **_gpu_disagg(actor_ranks=8, num_engines=2)), TWO_BY_8)
    assert report.fits and report.problems == []
    assert (
        report.summary
        == "8 actor ranks (TP 2 x PP 2 x DP 2) + 2 engines x 1 GPU on 2 nodes x 8 GPUs: fits, 6 GPUs spare"
    )


def test_cpu_colocated_two_ranks_fill_two_one_cpu_nodes_exactly():
    report = check_fit(_cfg(actor_ranks=2, mode="colocated"), uniform_nodes(2, cpus=1, gpus=0))
    assert report.fits
    assert report.summary == (
        "2 actor ranks (TP 1 x PP 1 x DP 2) + 1 engine inside rank 0 on 2 nodes x 1 CPU: fits, 0 CPUs spare"
    )


def test_ranks_not_divisible_by_tp_times_pp():
    report = check_fit(_cfg(2, 2, **_gpu_disagg(actor_ranks=6, num_engines=2)), TWO_BY_8)
    assert len(report.problems) == 1 and report.placement == [] and not report.fits
    assert "cluster.actor_ranks = 6 is not divisible" in report.layout[0]
    assert "multiple of 4" in report.problems[0]
    assert "DP ?" in report.summary and report.summary.endswith("does not fit")


def test_tensor_parallel_wider_than_a_node():
    # 16 ranks x 1 GPU = 16 GPUs fit 2 x 8 in total and packed, but one TP group of 16 would cross nodes
    report = check_fit(_cfg(16, 1, actor_ranks=16, mode="colocated", gpus_per_rank=1), TWO_BY_8)
    assert len(report.problems) == 1 and report.layout == []
    assert report.placement[0].startswith("actor.tensor_parallel = 16 needs 16 GPUs")
    assert "the largest has 8" in report.problems[0]


def test_tensor_parallel_is_not_a_node_question_on_cpu():
    assert check_fit(_cfg(4, 1, actor_ranks=4, mode="colocated"), uniform_nodes(2, cpus=2, gpus=0)).fits


def test_total_gpus_count_served_engines_in_disaggregated_mode_only():
    # 8 x 1 + 5 x 2 = 18 > 16
    report = check_fit(_cfg(**_gpu_disagg(actor_ranks=8, num_engines=5, gpus_per_engine=2)), TWO_BY_8)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("the layout asks for 18 GPUs")
    assert "cluster.num_engines 5 x cluster.gpus_per_engine 2" in report.problems[0]
    # colocated: the engine sits on rank 0's GPU, so 16 ranks x 1 GPU exactly fill the nodes
    colocated = check_fit(_cfg(actor_ranks=16, mode="colocated", gpus_per_rank=1, gpus_per_engine=4), TWO_BY_8)
    assert colocated.fits and colocated.summary.endswith("fits, 0 GPUs spare")


def test_total_cpus():
    # 4 x 10 + 2 x 4 = 48 > 2 x 16
    cfg = _cfg(**_gpu_disagg(actor_ranks=4, num_engines=2, cpus_per_rank=10, cpus_per_engine=4))
    report = check_fit(cfg, uniform_nodes(2, cpus=16, gpus=8))
    assert len(report.problems) == 1
    assert report.problems[0].startswith("the layout asks for 48 CPUs")


def test_an_engine_larger_than_any_node():
    # 1 + 9 = 10 GPUs <= 16 in total, but 9 GPUs of one engine cannot sit on an 8-GPU node
    report = check_fit(_cfg(**_gpu_disagg(actor_ranks=1, num_engines=1, gpus_per_engine=9)), TWO_BY_8)
    assert len(report.problems) == 1  # and no packing message repeating it
    assert report.problems[0].startswith("cluster.gpus_per_engine = 9: one engine needs that many GPUs")


def test_three_five_gpu_bundles_do_not_pack_into_two_nodes_of_8():
    # 15 <= 16 GPUs, each bundle <= 8, but after two 5s each node has 3 left
    report = check_fit(_cfg(actor_ranks=3, mode="colocated", gpus_per_rank=5), TWO_BY_8)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("actor rank 2 (5 GPU, 1 CPU) cannot be placed")
    assert "node0 3 GPU 63 CPU, node1 3 GPU 63 CPU" in report.problems[0]
    assert "cluster.cpus_per_rank / gpus_per_rank" in report.problems[0]


def test_engines_are_placed_before_the_ranks_as_ray_runtime_creates_them():
    # 3 engines x 5 + 1 rank x 1 = 16: the engines go first, so engine 2 is the one left over
    report = check_fit(_cfg(**_gpu_disagg(actor_ranks=1, num_engines=3, gpus_per_engine=5)), TWO_BY_8)
    assert len(report.problems) == 1 and report.problems[0].startswith("engine 2 (5 GPU, 1 CPU) cannot be placed")


def test_packing_is_decreasing_first_fit():
    nodes = [NodeResources("a", 8, 8), NodeResources("b", 8, 1)]
    small, big = Bundle("small", 1, 1, "k"), Bundle("big", 1, 8, "k")
    assert first_unpacked([[small, big]], nodes) is None  # in given order, small would take a's 8th GPU from big
    assert first_unpacked([[small], [big]], nodes).startswith("big (8 GPU, 1 CPU)")  # groups keep their order


def test_local_mode_uses_no_cluster():
    report = check_fit(_cfg(mode="local"), TWO_BY_8)
    assert not report.fits and "cluster.mode=colocated or disaggregated" in report.problems[0]


def test_nodes_from_ray_keeps_alive_nodes_and_reads_missing_gpus_as_zero():
    records = [
        {
            "NodeID": "abcdef0123",
            "NodeManagerAddress": "10.0.0.1",
            "Alive": True,
            "Resources": {"CPU": 64.0, "GPU": 8.0},
        },
        {"NodeID": "dead", "NodeManagerAddress": "10.0.0.2", "Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
        {"NodeID": "99887766", "NodeManagerAddress": "10.0.0.3", "Alive": True, "Resources": {"CPU": 16.0}},
    ]
    nodes = nodes_from_ray(records)
    assert nodes == [NodeResources("10.0.0.1 (abcdef01)", 64.0, 8.0), NodeResources("10.0.0.3 (99887766)", 16.0, 0.0)]
    report = check_fit(_cfg(**_gpu_disagg(actor_ranks=4, num_engines=2)), nodes)
    assert report.summary == (
        "4 actor ranks (TP 1 x PP 1 x DP 4) + 2 engines x 1 GPU on 2 nodes (8+0 GPUs): fits, 2 GPUs spare"
    )


def test_build_ray_runtime_refuses_a_misfit_before_placing_anything(ray_config, monkeypatch):
    from lcot_mega.cluster import ray_runtime

    monkeypatch.setattr(ray_runtime, "start_ray", lambda cluster: None)
    monkeypatch.setattr(fit, "nodes_from_ray", lambda: uniform_nodes(1, cpus=1, gpus=0))
    with pytest.raises(ray_runtime.RayStartError, match=r"(?s)does not fit.*asks for 2 CPUs.*cluster\.actor_ranks 2"):
        ray_runtime.build_ray_runtime(ray_config(mode="colocated", actor_ranks=2))


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lcot_mega.cluster.fit", str(TINY), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_cli_dry_run_exits_0_when_it_fits_and_1_when_it_does_not():
    layout = ["cluster.mode=disaggregated", "cluster.gpus_per_rank=1", "cluster.gpus_per_engine=1"]
    layout += ["cluster.actor_ranks=8", "actor.tensor_parallel=2", "actor.pipeline_parallel=2"]
    ok = _cli(*layout, "cluster.num_engines=2", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-node", "64")
    assert ok.returncode == 0, ok.stderr
    assert (
        ok.stdout.strip()
        == "8 actor ranks (TP 2 x PP 2 x DP 2) + 2 engines x 1 GPU on 2 nodes x 8 GPUs: fits, 6 GPUs spare"
    )
    bad = _cli("--nodes", "1", *layout, "cluster.num_engines=9", "--gpus-per-node", "8", "--cpus-per-node", "64")
    assert bad.returncode == 1, bad.stderr
    lines = bad.stdout.splitlines()
    assert lines[0].endswith("on 1 node x 8 GPUs: does not fit")
    assert lines[1] == (
        "  - the layout asks for 17 GPUs (cluster.actor_ranks 8 x cluster.gpus_per_rank 1 + cluster.num_engines 9"
        " x cluster.gpus_per_engine 1), the cluster has 8 on 1 node(s): lower those keys or add nodes"
    )


def test_build_ray_runtime_leaves_an_indivisible_layout_to_the_ranks_own_build(monkeypatch):
    from lcot_mega.cluster import ray_runtime

    monkeypatch.setattr(fit, "nodes_from_ray", lambda: uniform_nodes(1, cpus=8, gpus=0))
    ray_runtime.check_cluster_fits(_cfg(2, 1, mode="colocated", actor_ranks=3))  # ActorSetupError says it later
    with pytest.raises(ray_runtime.RayStartError, match=r"asks for 9 CPUs"):
        ray_runtime.check_cluster_fits(_cfg(2, 1, mode="colocated", actor_ranks=3, cpus_per_rank=3))
