"""Test-run settings shared by every test directory.

The default run spreads tests over worker processes (pytest-xdist, `-n auto` in pyproject.toml), one per core,
but never more than memory allows: the heaviest tests (a Megatron actor plus an engine, or a Ray cluster) peak
near 3 GiB each.
"""

from __future__ import annotations

import os

import pytest

GIB_PER_WORKER = 3
SLOW_FIRST = ("tests/trainer/", "tests/cluster/", "tests/evaluation/test_eval_command.py")
"""Files whose tests take minutes in all: handed out first, so the last file a worker gets is a short one."""
FAST_LAST = ("tests/algo/", "tests/guards/", "tests/observe/", "tests/config/", "tests/data/", "tests/types")
"""Pure-Python files of many quick tests: handed out last, where they even out the two workers' finish."""


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


def pytest_xdist_auto_num_workers(config) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, int(_memory_gib() // GIB_PER_WORKER), 8))


def pytest_collection_modifyitems(session, config, items) -> None:
    """Slow files first, each file's tests in their own order (deterministic, the same on every worker)."""

    def slow_rank(item) -> int:
        path = item.nodeid.split("::")[0]
        if path.startswith(FAST_LAST):
            return len(SLOW_FIRST) + 1
        return next((i for i, prefix in enumerate(SLOW_FIRST) if path.startswith(prefix)), len(SLOW_FIRST))

    items[:] = sorted(items, key=slow_rank)  # stable: the order within a rank is the collection order


@pytest.fixture(scope="session")
def char_tok(tmp_path_factory):
    """The one-character-per-token tokenizer of the tiny models (no chat template)."""
    from helpers.tiny_models import save_char_tokenizer
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("char_tok")
    save_char_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)
