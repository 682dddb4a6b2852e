"""The CPU shim redirects exactly what megatron-core needs, in a fresh process (it changes global state)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("megatron.core")

PROBE = textwrap.dedent(
    """
    import torch
    from lcot_mega.actor import cpu_compat
    assert not cpu_compat.is_enabled()
    assert cpu_compat.enable() and cpu_compat.enable()  # idempotent
    x = torch.empty(3, device="cuda")
    y = torch.zeros(2, device=torch.cuda.current_device(), pin_memory=True)
    z = torch.ones(2).cuda().to("cuda:0")
    print(x.device, y.device, z.device, torch.ones(1).type(), torch.ones(1, dtype=torch.int64).type())
    torch.cuda.manual_seed(7)
    a = torch.rand(2)
    state = torch.cuda.get_rng_state()
    b = torch.rand(2)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(2), b)
    torch.cuda.manual_seed(7)
    assert torch.equal(torch.rand(2), a)
    torch.cuda.synchronize(); torch.cuda.set_device(0)
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(None)
    print("cuda available:", torch.cuda.is_available())
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op where CUDA exists")
def test_cuda_devices_rng_and_type_names_are_redirected_to_cpu():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "cpu cpu cpu torch.cuda.FloatTensor torch.LongTensor"
    assert out[1] == "cuda available: False"  # megatron must keep choosing its CPU paths
