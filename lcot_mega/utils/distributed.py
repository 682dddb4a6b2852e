"""Local multi-process launch: N spawned processes joined by one process group, results collected.

Used by the converters, the benchmarks and the tests (gloo on CPU, NCCL when CUDA is present). A
cluster launch (torchrun, Ray) does not go through here.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A free TCP port on loopback (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int) -> None:
    """Join the default process group on loopback: NCCL (one GPU per rank) when CUDA is present, else gloo."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def _entry(rank: int, world_size: int, port: int, threads: int | None, fn: Callable, args: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        init_process_group(rank, world_size, port)
        # pickled to bytes here: torch would share tensors by file descriptor, gone when this process exits
        queue.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(
    fn: Callable, world_size: int, *args: Any, threads: int | None = None, timeout_s: float = 300.0
) -> list[Any]:
    """Per-rank return values of `fn(rank, world_size, *args)` on `world_size` spawned processes.

    `fn` must be importable (top level of a module). A failure in any rank is raised here with that
    rank's traceback; stragglers are killed.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, threads, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout_s)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
