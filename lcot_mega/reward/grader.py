"""Grading responses in isolated worker processes, with a wall-clock deadline per grade.

math-verify bounds its own time with `signal.alarm` (whole seconds, main thread only), and with that
off a pathological answer such as `\\boxed{9^{9^{9^9}}}` holds the GIL forever. So each grade runs in
a worker process that is SIGKILLed and replaced when it overruns its deadline or dies; the item
scores 0 and the batch goes on (a `ProcessPoolExecutor` cannot kill one worker). Each worker is its
own interpreter, `python -m lcot_mega.reward.worker`, talking over an inherited socket: fork would
copy the locks of the trainer's torch threads, and multiprocessing's "spawn" re-imports the caller's
main module, which kills a plain script (or runs its work twice) unless it guards with
`if __name__ == "__main__":`; "forkserver" is process-global state shared with the rest of the trainer.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path
from typing import TYPE_CHECKING

from lcot_mega.reward.extract import validate_fallbacks
from lcot_mega.reward.registry import resolve_reward

if TYPE_CHECKING:
    from lcot_mega.config.schema import RewardConfig
    from lcot_mega.reward.worker import Options

__all__ = ["GradeResult", "Grader", "grade"]

_JOIN_S = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # holds the `lcot_mega` this process imported


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response."""

    reward: float
    correct: bool
    """`reward > 0.5`."""
    extracted: str | None = None
    """The answer found in the response (None: none found, or the grade overran or crashed)."""
    timed_out: bool = False
    """The grade overran its deadline; its worker was killed."""
    error: str | None = None
    """Why the grade failed (reward function raised, worker died); None when it ran normally."""


_SPAWNER: tuple[int, ThreadPoolExecutor] | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawner() -> ThreadPoolExecutor:
    """One long-lived thread that starts every worker, so PDEATHSIG never fires on a short-lived thread."""
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or _SPAWNER[0] != os.getpid():  # a forked child has the executor but not its thread
            _SPAWNER = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcot-grader-spawn"))
        return _SPAWNER[1]


def _start_process(fd: int) -> subprocess.Popen:
    """`python -m lcot_mega.reward.worker` on descriptor `fd`, importing the same `lcot_mega` as this process.

    `-P` keeps the working directory off the worker's path, so a `lcot_mega` folder there cannot shadow ours.
    """
    paths = [_PACKAGE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    argv = [sys.executable, "-P", "-m", "lcot_mega.reward.worker", str(fd), str(os.getpid())]
    return subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL, env=env)


def _exit_fd(pid: int) -> int | None:
    """A descriptor that turns readable when `pid` exits (Linux pidfd); None where there is none.

    EOF on the connection says the same unless a fork of the trainer holds a copy of the worker's end.
    """
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class _Worker:
    """One grader process as the trainer sees it: starting, idle or busy with one task."""

    def __init__(self, fn_path: str, start_timeout_s: float) -> None:
        self.conn, child_conn = Pipe()
        try:
            self.proc = _spawner().submit(_start_process, child_conn.fileno()).result()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child_conn.close()  # so the trainer sees EOF when the worker dies
        self.exit_fd = _exit_fd(self.proc.pid)
        self.ready = False
        self.index: int | None = None  # position in the batch of the task being graded
        self.task_id = -1
        self.deadline = time.monotonic() + start_timeout_s
        self.stopped = False
        with contextlib.suppress(OSError):  # died already: the first wait() sees it
            self.conn.send((list(sys.path), fn_path))

    @property
    def waiting(self) -> bool:
        """Starting up or grading: a message (or death) is expected."""
        return not self.ready or self.index is not None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_code(self) -> int | None:
        """The exit status (negative: killed by that signal), waiting a little for a worker seen dying."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_JOIN_S)
        return self.proc.returncode

    def signals(self) -> list[Connection | int]:
        """What `wait()` watches for this worker: its connection and, where there is one, its exit."""
        return [self.conn] if self.exit_fd is None else [self.conn, self.exit_fd]

    def ask_exit(self) -> None:
        """Tell an idle worker to return from its loop (a clean exit, no SIGKILL)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)

    def stop(self, grace_s: float = 0.0) -> None:
        """Reap the process, SIGKILLing it if it has not exited within `grace_s`; leaves no zombie."""
        self.stopped = True
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=_JOIN_S)
        self.conn.close()
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None


class Grader:
    """Grades responses against gold answers in `num_workers` isolated, pre-warmed processes.

    `fn` is a registered reward name or a dotted path (see `registry`); it must be importable in a
    fresh interpreter. Use as a context manager or call `close()`; open graders are closed at exit.
    Workers are fresh interpreters that never import the caller's main module, so a plain script,
    `python -c` or a notebook can grade without an `if __name__ == "__main__":` guard.
    """

    def __init__(
        self,
        fn: str = "math",
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        require_think_close: bool = False,
        fallbacks: Sequence[str] = (),
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        _check_timeout(timeout_s)
        self.timeout_s = float(timeout_s)
        self._options: Options = (bool(require_think_close), validate_fallbacks(fallbacks))
        self._fn_path = _worker_path(fn)
        self._start_timeout_s = start_timeout_s
        self._workers: list[_Worker | None] = [None] * num_workers
        self._task_ids = itertools.count()
        self._closed = False
        self._owner_pid = os.getpid()
        _OPEN.add(self)
        try:
            self._start_missing()
            while any(w.waiting for w in self._live()):
                self._collect([], deque(), set())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (they change when a worker is replaced)."""
        return [w.proc.pid for w in self._live()]

    def grade_batch(self, responses: Sequence[str], answers: Sequence[str]) -> list[GradeResult]:
        """Grade `responses[i]` against `answers[i]`; results in input order. Never raises per item."""
        return self._run(responses, answers, self._options, self.timeout_s)

    def close(self) -> None:
        """Stop every worker and reap it; the grader cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._owner_pid:  # a forked copy: the workers belong to the original
            return
        idle = [w for w in self._live() if not w.waiting]
        for w in idle:
            w.ask_exit()
        for w in self._live():
            w.stop(grace_s=1.0 if w in idle else 0.0)
        self._workers = [None] * len(self._workers)
        _OPEN.discard(self)

    def _run(
        self, responses: Sequence[str], answers: Sequence[str], options: Options, timeout_s: float
    ) -> list[GradeResult]:
        if self._closed:
            raise RuntimeError("this Grader is closed")
        if os.getpid() != self._owner_pid:
            raise RuntimeError("a Grader cannot be used in a forked copy of its process; create one there")
        _check_inputs(responses, answers)
        results: list[GradeResult | None] = [None] * len(responses)
        pending = deque(range(len(responses)))
        retried: set[int] = set()  # items whose worker died under them once already
        try:
            while pending or any(w.index is not None for w in self._live()):
                self._start_missing()
                self._dispatch(pending, responses, answers, options, timeout_s)
                self._collect(results, pending, retried)
        except BaseException:
            self._recycle_busy()  # their late answers would be taken for the next batch's
            raise
        self._start_missing()  # replacements warm up while the trainer does something else
        return results  # type: ignore[return-value]  # every slot was filled

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None]

    def _start_missing(self) -> None:
        """Start a worker in every empty slot and in place of any that died while idle."""
        for slot, w in enumerate(self._workers):
            if w is not None and w.alive():
                continue
            if w is not None:
                w.stop()
            self._workers[slot] = _Worker(self._fn_path, self._start_timeout_s)

    def _dispatch(
        self, pending: deque[int], responses: Sequence[str], answers: Sequence[str], options: Options, timeout_s: float
    ) -> None:
        for w in self._live():
            if not pending:
                return
            if w.waiting:
                continue
            i = pending.popleft()
            w.task_id = next(self._task_ids)
            try:
                w.conn.send((w.task_id, responses[i], answers[i], options))
            except OSError:  # died since the liveness check: not this item's fault, so retry it
                pending.appendleft(i)
                self._replace(w)
                continue
            w.index = i
            w.deadline = time.monotonic() + timeout_s

    def _collect(self, results: list[GradeResult | None], pending: deque[int], retried: set[int]) -> None:
        """Wait for the next message, death or deadline among waiting workers, and handle it."""
        waiting = [w for w in self._live() if w.waiting]
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        ready = set(wait([s for w in waiting for s in w.signals()], timeout))
        for w in waiting:
            if not ready.isdisjoint(w.signals()):
                self._receive(w, results, pending, retried)
        now = time.monotonic()
        for w in waiting:
            if w.stopped or not w.waiting or now < w.deadline:
                continue
            if not w.ready:
                raise RuntimeError(f"grader worker did not start within {self._start_timeout_s} s")
            results[w.index] = GradeResult(reward=0.0, correct=False, timed_out=True)
            self._replace(w)

    def _receive(self, w: _Worker, results: list[GradeResult | None], pending: deque[int], retried: set[int]) -> None:
        try:
            msg = w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            msg = None
        if msg is None:  # died: crashed in the reward function, or killed from outside
            if not w.ready:
                raise RuntimeError(f"grader worker died during start-up (exit code {w.exit_code()})")
            if w.index is not None and w.index not in retried:
                retried.add(w.index)  # maybe killed from outside, not this item's fault: one more try
                pending.appendleft(w.index)
            elif w.index is not None:
                error = f"grader worker died twice on this item (exit code {w.exit_code()})"
                results[w.index] = GradeResult(reward=0.0, correct=False, error=error)
            self._replace(w)
        elif not w.ready:
            if msg[0] != "ready":
                raise RuntimeError(f"grader worker failed to start: {msg[1]}")
            w.ready = True
        elif msg[0] == w.task_id and w.index is not None:
            _, reward, extracted, error = msg
            results[w.index] = GradeResult(reward, reward > 0.5, extracted, error=error)
            w.index = None

    def _replace(self, w: _Worker) -> None:
        """Kill `w`; `_start_missing` starts its successor at the top of the next round."""
        w.stop()
        self._workers[self._workers.index(w)] = None

    def _recycle_busy(self) -> None:
        for w in self._live():
            if w.index is not None:
                self._replace(w)


def grader_for(reward: RewardConfig) -> Grader:
    """The grader a run's `reward.*` config asks for (training and `lcot-mega eval` grade alike)."""
    return Grader(
        reward.fn,
        num_workers=reward.num_workers,
        timeout_s=reward.timeout_s,
        require_think_close=reward.require_think_close,
        fallbacks=reward.fallbacks,
    )


def _check_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")


def _check_inputs(responses: Sequence[str], answers: Sequence[str]) -> None:
    if len(responses) != len(answers):
        raise ValueError(f"got {len(responses)} responses and {len(answers)} answers")
    for name, seq in (("responses", responses), ("answers", answers)):
        bad = next((i for i, x in enumerate(seq) if not isinstance(x, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] is {type(seq[bad]).__name__}, not str")


def _worker_path(fn: str) -> str:
    """`fn` as a `module:function` path a fresh worker can import (names registered at run time included)."""
    func = resolve_reward(fn)
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not module or not qualname or "<" in qualname:
        raise ValueError(f"reward function {fn!r} must be defined at the top level of an importable module")
    if module == "__main__":  # workers never import the caller's script: that would run its top level again
        raise ValueError(f"reward function {fn!r} is defined in the main script; move it to an importable module")
    return f"{module}:{qualname}"


_OPEN: weakref.WeakSet[Grader] = weakref.WeakSet()


@atexit.register
def _close_open_graders() -> None:
    for g in list(_OPEN):
        g.close()


# ---------------------------------------------------------------------------------------------------
# One-off grading

_SHARED: Grader | None = None
_SHARED_LOCK = threading.Lock()


def grade(
    response: str,
    gold: str,
    *,
    timeout_s: float = 5.0,
    require_think_close: bool = False,
    fallbacks: Sequence[str] = (),
) -> bool:
    """Whether `response` answers `gold` (math reward), graded in a shared, lazily started worker."""
    global _SHARED
    _check_timeout(timeout_s)
    options: Options = (bool(require_think_close), validate_fallbacks(fallbacks))
    _check_inputs([response], [gold])  # before the lock: a bad argument must not discard the worker
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED.closed or _SHARED._owner_pid != os.getpid():
            _SHARED = Grader("math", num_workers=1, timeout_s=timeout_s)
        try:
            [result] = _SHARED._run([response], [gold], options, timeout_s)
        except BaseException:
            _SHARED.close()  # broken: the next call starts afresh
            _SHARED = None
            raise
    return result.correct
