"""A trainer killed mid-save takes the processes megatron's checkpoint writer forked with it (they used to be left
behind, blocked on a lock of the dead parent, with the run directory's files open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

FORKER = """
import multiprocessing as mp, sys, time
from lcot_mega.actor import checkpoint

def writer(path):
    open(path, "w").write(str(__import__("os").getpid()))
    time.sleep(120)

def fork_one(path):
    child = mp.get_context("fork").Process(target=writer, args=(path,))
    child.start()

if sys.argv[2] == "saving":
    with checkpoint._writers_die_with_us():
        fork_one(sys.argv[1])
else:
    fork_one(sys.argv[1])
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _fork_and_kill_parent(tmp_path: Path, mode: str) -> int:
    pid_file = tmp_path / f"{mode}.pid"
    parent = subprocess.Popen([sys.executable, "-c", FORKER, str(pid_file), mode])
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    return child


def test_a_process_forked_during_a_save_dies_with_the_killed_trainer(tmp_path):
    child = _fork_and_kill_parent(tmp_path, "saving")
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_process_forked_outside_a_save_is_left_alone(tmp_path):
    """The control: without the save's context the same fork outlives its killed parent (what used to happen)."""
    child = _fork_and_kill_parent(tmp_path, "plain")
    try:
        time.sleep(1.0)
        assert _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
