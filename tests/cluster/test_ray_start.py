"""Starting Ray: a local instance is sized to the placement groups and stopped by its closer; a bad cluster
address, a placement that cannot fit and a missing Ray each fail at once with a message naming what to change."""

from __future__ import annotations

import sys
import time

import pytest

from lcot_mega.cluster.ray_runtime import RayStartError, import_ray, placement_group, reserved_cpus, start_ray
from lcot_mega.cluster.runtime import build_runtime
from lcot_mega.config import ClusterConfig
from lcot_mega.utils.distributed import free_port

ray = pytest.importorskip("ray")


@pytest.fixture
def no_ray():
    if ray.is_initialized():
        pytest.skip("a Ray instance is already up in this process")


def test_reserved_cpus_counts_actor_ranks_and_served_engines():
    assert reserved_cpus(ClusterConfig(mode="colocated", actor_ranks=2, num_engines=4)) == 2
    assert reserved_cpus(ClusterConfig(mode="disaggregated", actor_ranks=2, num_engines=3, cpus_per_engine=0.5)) == 4


def test_unreachable_ray_address_fails_fast_naming_the_key(ray_config, no_ray):
    cfg = ray_config(mode="colocated", ray_address=f"127.0.0.1:{free_port()}")
    start = time.perf_counter()
    with pytest.raises(RayStartError, match=r"cluster\.ray_address"):
        build_runtime(cfg)
    assert time.perf_counter() - start < 15  # Ray alone retries an unreachable address for minutes
    assert not ray.is_initialized()


def test_local_ray_is_bounded_and_a_placement_that_cannot_fit_names_the_resources(no_ray):
    stop = start_ray(ClusterConfig(mode="colocated", actor_ranks=2))
    try:
        assert stop is not None and ray.cluster_resources()["CPU"] == 2
        assert start_ray(ClusterConfig(mode="colocated")) is None  # already up: reused, not ours to stop
        with pytest.raises(RayStartError, match=r"actor ranks .*CPU.*cluster\.actor_ranks"):
            placement_group([{"CPU": 3.0, "GPU": 0.0}], "actor ranks", timeout_s=2)
    finally:
        if stop is not None:
            stop()
    assert not ray.is_initialized()


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayStartError, match="pip install ray"):
        import_ray()
