"""Distributed code is tested for real (STYLE.md rule 14): `run_gloo(fn, world_size, *args)` runs
`fn(rank, world_size, *args)` on real processes joined by gloo (NCCL on a GPU machine)."""

from lcot_mega.utils.distributed import free_port, run_local

__all__ = ["free_port", "run_gloo"]


def run_gloo(fn, world_size: int, *args, timeout_s: float = 300.0) -> list:
    return run_local(fn, world_size, *args, timeout_s=timeout_s)
