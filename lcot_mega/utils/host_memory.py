"""Give the C heap's free pages back to the operating system between the trainer's phases.

glibc's malloc serves large blocks with mmap only up to a threshold that rises, after the first large block is
freed, to 32 MiB (its dynamic mmap threshold): after that, tensors up to 32 MiB come from the heap arenas, and
when a phase (a rollout, an actor step, a checkpoint) frees them, the arenas keep the pages, free but resident.
Each phase has other sizes, so the heap grows by fragments: on the CPU quick start the trainer's resident
memory climbed from 3.3 to 6.1 GB over six steps while its live tensors stayed at 2.0 GB (docs/LOG.md,
session 8). `malloc_trim(0)` (glibc >= 2.8) returns every whole free page of every arena (madvise), not only
the heap's top; after each phase the trainer rests at its live size (2.8 GB there) for about 1 ms of system
time per call. Fixing the threshold instead (MALLOC_MMAP_THRESHOLD_) did the same but cost 7x the page faults
(41.7 M vs 5.6 M) and 2.6x the system time on that run.

Other C libraries (musl, macOS) have no `malloc_trim`: the call does nothing there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; True if any were returned (False also where unsupported)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
