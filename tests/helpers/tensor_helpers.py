"""Short constructors for hand-worked tensors in the RL-math tests, and a one-thread context."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def ids(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def b(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.bool)


def bits(mask: torch.Tensor) -> list[int]:
    assert mask.dtype == torch.bool
    return [int(x) for x in mask.tolist()]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny-model references with one intra-op thread: spinning threads cost 10x on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
