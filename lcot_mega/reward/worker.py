"""One grader worker: `python -m lcot_mega.reward.worker FD PARENT_PID`, started by `lcot_mega.reward.grader`.

A fresh interpreter, not a multiprocessing child, so the user's main module is never imported here (spawn
would re-run a script that lacks `if __name__ == "__main__":`). It speaks over the
`multiprocessing.connection.Connection` inherited as descriptor FD:
  trainer -> worker: (sys.path, "module:function") once, then (task_id, response, answer, options) or None;
  worker -> trainer: ("ready", pid) or ("error", why) once, then (task_id, reward, extracted, error).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
from multiprocessing.connection import Connection

from lcot_mega.reward.extract import extract_answer
from lcot_mega.reward.registry import RewardFn, resolve_reward, reward_kwargs

_MAX_ERROR_CHARS = 500

# Per-task extraction options: (require_think_close, fallbacks).
Options = tuple[bool, tuple[str, ...]]


def main(argv: list[str]) -> None:
    """Set up the process, then serve the trainer on the inherited connection."""
    fd, parent_pid = int(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    # Ctrl-C and a scheduler's SIGTERM to the process group are the trainer's to handle: it finishes its step (grading
    # included) and closes us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.set_inheritable(fd, False)  # a subprocess of the reward function must not keep the channel open
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns once that its timeouts are off
    with Connection(fd) as conn:
        serve(conn)


def serve(conn: Connection) -> None:
    """Resolve the reward function as the trainer does, warm up, report ready, grade until told to stop."""
    try:
        path, fn_path = conn.recv()
        sys.path[:] = path  # so `module:function` (test-only modules too) resolves exactly as in the trainer
        fn = resolve_reward(fn_path)
    except (EOFError, OSError):
        return
    except Exception as err:
        conn.send(("error", describe(err)))
        return
    grade_one(fn, "\\boxed{1}", "1", (False, ()))  # first math-verify call is ~40 ms: pay it now
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, response, answer, options = msg
        conn.send((task_id, *grade_one(fn, response, answer, options)))


def grade_one(fn: RewardFn, response: str, answer: str, options: Options) -> tuple[float, str | None, str | None]:
    """(reward, extracted answer, error) of one response; never raises."""
    require_think_close, fallbacks = options
    try:
        extracted = extract_answer(response, require_think_close=require_think_close, fallbacks=fallbacks)
        kwargs = reward_kwargs(fn, require_think_close=require_think_close, fallbacks=fallbacks)
        reward = float(fn(response, answer, **kwargs))
        if not math.isfinite(reward):
            raise ValueError(f"reward function returned {reward}")
    except Exception as err:
        return 0.0, None, describe(err)
    return reward, extracted, None


def describe(err: BaseException) -> str:
    """`Type: message`, capped, for a GradeResult's error."""
    try:
        text = str(err)
    except Exception:  # str() of a sympy object can itself fail
        text = "<unprintable>"
    return f"{type(err).__name__}: {text}"[:_MAX_ERROR_CHARS]


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the trainer dies, even mid-grade while holding the GIL.

    PR_SET_PDEATHSIG fires when the *thread* that started the worker ends, hence the grader's `_spawner`.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
