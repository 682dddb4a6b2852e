"""`release_free_heap` returns a fragmented heap's free pages: resident memory measured before and after, in a fresh
process (the kernel's VmRSS), against the bytes the process freed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")

_PROBE = textwrap.dedent(
    """
    import torch
    from lcot_mega.utils.host_memory import release_free_heap

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    big = torch.ones(16 << 20, dtype=torch.uint8)  # mmapped; freeing it raises glibc's mmap threshold to 16 MiB
    del big
    blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(200)]  # 800 MiB from the heap now
    del blocks[::2]  # 400 MiB of holes under live blocks: the heap's top cannot shrink over them
    before = rss_mib()
    released = release_free_heap()
    print(before, rss_mib(), released)
    """
)


def test_free_heap_pages_go_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    before, after, released = out.split()
    assert released == "True"
    assert float(before) - float(after) > 300  # of the 400 MiB freed in holes
