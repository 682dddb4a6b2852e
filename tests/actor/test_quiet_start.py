"""A newcomer's console shows only what the user can act on: the adapter filters the known harmless library
warnings (megatron-core without TE/apex, its old collective names), and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import warnings
warnings.simplefilter("default")  # show every warning once, as a plain `python` run does for these
import lcot_mega.actor.megatron_adapter
import megatron.core.optimizer, megatron.core.optimizer.clip_grads, megatron.core.models.gpt.gpt_layer_specs
from megatron.core.distributed import DistributedDataParallel
warnings.warn("an unrelated warning", UserWarning)
warnings.warn("Transformer Engine and Apex are not installed, said by someone else", UserWarning)
"""


def _stderr_of(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_megatron_imports_after_the_adapter_print_no_known_harmless_warning():
    err = _stderr_of(SCRIPT)
    assert "Falling back" not in err and "Apex is not installed" not in err
    assert "an unrelated warning" in err  # other warnings still show
    assert "said by someone else" in err  # filtered by module too: only megatron-core's own


def test_without_the_adapter_the_same_imports_do_warn():
    """The reference: the filters are what removes them (the test above can fail)."""
    err = _stderr_of(SCRIPT.replace("import lcot_mega.actor.megatron_adapter\n", ""))
    assert "Transformer Engine and Apex are not installed" in err
