import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lcot_mega.reward import Grader, GradeResult, grade

BOMB = r"\boxed{9^{9^{9^9}}}"  # math-verify evaluates the power: holds the GIL forever


@pytest.fixture(scope="module")
def grader():
    with Grader("math", num_workers=2, timeout_s=10.0) as g:
        yield g


def _wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Until `pid` is a zombie or gone, so the grader cannot still see it alive."""
    stat = Path(f"/proc/{pid}/stat")
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still running")


def _children() -> set[int]:
    """Process ids whose parent is this process (any thread), read from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _correct(results: list[GradeResult]) -> list[bool]:
    return [r.correct for r in results]


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\{2, 1\}}", r"\{1,2\}"),
        (r"\boxed{(0,1]}", "(0, 1]"),
        (r"\boxed{1+x}", "x+1"),
        (r"\boxed{1,234}", "1234"),
        (r"first \boxed{7}, finally \boxed{\dfrac{3}{4}}", "0.75"),
    ],
)
def test_equivalent_answers_are_correct(grader, response, gold):
    [r] = grader.grade_batch([response], [gold])
    assert r == GradeResult(reward=1.0, correct=True, extracted=r.extracted)
    assert r.extracted is not None


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{0.6}", "0.5"),
        (r"\boxed{(0,1)}", "(0, 1]"),
        (r"\boxed{\frac{1}{}}", "0.5"),  # malformed LaTeX
        (r"\boxed{\frac{", "0.5"),  # unbalanced: no answer at all
        (r"\boxed{7} then \boxed{8}", "7"),  # only the last box counts
        ("the answer is 7", "7"),  # no box, no fallbacks
    ],
)
def test_wrong_or_malformed_answers_are_incorrect(grader, response, gold):
    [r] = grader.grade_batch([response], [gold])
    assert (r.reward, r.correct, r.timed_out, r.error) == (0.0, False, False, None)


def test_extraction_options_reach_the_worker():
    with Grader(num_workers=1, require_think_close=True, fallbacks=("last_number",)) as g:
        results = g.grade_batch(
            [r"<think>\boxed{3}</think> so 4", r"\boxed{4} no think close", r"</think>\boxed{4}"], ["4", "4", "4"]
        )
    assert _correct(results) == [True, False, True]
    assert [r.extracted for r in results] == ["4", None, "4"]


def test_results_in_input_order_with_more_items_than_workers(grader):
    golds = [str(i) for i in range(12)]
    responses = [rf"\boxed{{{i if i % 3 else i + 1}}}" for i in range(12)]  # every third is off by one
    results = grader.grade_batch(responses, golds)
    assert _correct(results) == [i % 3 != 0 for i in range(12)]
    assert [r.extracted for r in results] == [str(i if i % 3 else i + 1) for i in range(12)]


def test_hostile_inputs_give_results_not_exceptions(grader):
    responses = [
        "x" * 100_000 + r"\boxed{2}",
        r"\boxed{" + "{" * 3000 + "2" + "}" * 3000 + "}",  # extracted answer over the length cap
        "{" * 3000 + "}" * 3000 + r"\boxed{2}",
        "".join(chr(c) for c in range(256)) * 100 + "\ud800" + r"\boxed{2}",
        "\x00" * 1000,
        r"\boxed{\x00\x01}",
    ]
    results = grader.grade_batch(responses, ["2"] * len(responses))
    assert _correct(results) == [True, False, True, True, False, False]
    assert not any(r.timed_out or r.error for r in results)


def test_overrunning_grade_times_out_and_worker_is_replaced():
    with Grader(num_workers=1, timeout_s=2.0) as g:
        [pid] = g.worker_pids()
        start = time.monotonic()
        results = g.grade_batch([BOMB, r"\boxed{2}"], ["1", "2"])
        elapsed = time.monotonic() - start
        assert results[0] == GradeResult(reward=0.0, correct=False, extracted=None, timed_out=True)
        assert results[1].correct and not results[1].timed_out
        [new_pid] = g.worker_pids()
    assert new_pid != pid
    assert 2.0 <= elapsed < 30.0
    _wait_dead(pid, timeout_s=1.0)


def test_worker_killed_from_outside_is_replaced(grader):
    old = grader.worker_pids()
    os.kill(old[0], signal.SIGKILL)
    _wait_dead(old[0])
    results = grader.grade_batch([r"\boxed{3}"] * 4, ["3"] * 4)
    assert _correct(results) == [True] * 4, results
    new = grader.worker_pids()
    assert len(new) == 2 and old[0] not in new and old[1] in new


def test_item_whose_worker_is_killed_mid_grade_is_retried_elsewhere():
    with Grader("reward_fns_for_tests:slow_contains", num_workers=1, timeout_s=10.0) as g:
        [pid] = g.worker_pids()
        killer = threading.Timer(0.3, os.kill, (pid, signal.SIGKILL))
        killer.start()
        results = g.grade_batch(["answer 5"], ["5"])
        killer.join()
        assert results[0].correct and results[0].error is None
        assert g.worker_pids() != [pid]


def test_crash_and_exception_in_reward_function():
    with Grader("reward_fns_for_tests:crashy", num_workers=1) as g:
        [pid] = g.worker_pids()
        results = g.grade_batch(["raise", "ok 7", "segfault", "ok 7"], ["7"] * 4)
        assert results[0].error == "RuntimeError: boom" and not results[0].correct
        assert results[1].correct
        assert results[2].error is not None and "died twice" in results[2].error and "-11" in results[2].error
        assert results[3].correct
        assert g.worker_pids() != [pid]


def test_workers_die_with_the_trainer_even_mid_grade():
    """A SIGKILLed trainer cannot close its grader; the kernel must kill workers stuck on a bomb."""
    script = (
        "from lcot_mega.reward import Grader\n"
        "if __name__ == '__main__':\n"
        "    g = Grader(num_workers=2, timeout_s=100.0)\n"
        "    print(*g.worker_pids(), flush=True)\n"
        f"    g.grade_batch([{BOMB!r}] * 2, ['1'] * 2)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(0.5)  # let both workers start on the bomb
    finally:
        trainer.kill()
        trainer.wait()
        trainer.stdout.close()
    for pid in pids:
        _wait_dead(pid)


def test_close_leaves_no_child_processes():
    g = Grader(num_workers=2)
    pids = g.worker_pids()
    assert set(pids) <= _children()  # the check below can see them
    g.close()
    g.close()  # idempotent
    assert g.closed
    assert not set(pids) & _children()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # reaped: no zombies
    with pytest.raises(RuntimeError, match="closed"):
        g.grade_batch(["x"], ["1"])


def test_bad_arguments_fail_before_starting_workers():
    with pytest.raises(ValueError, match="last_number"):
        Grader(fallbacks=("last-number",))
    with pytest.raises(ValueError, match="closest: 'math'"):
        Grader("maths")
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0)


def test_batch_argument_checks(grader):
    with pytest.raises(ValueError, match="2 responses and 1 answers"):
        grader.grade_batch(["a", "b"], ["1"])
    with pytest.raises(TypeError, match=r"answers\[0\] is int"):
        grader.grade_batch(["a"], [1])
    assert grader.grade_batch([], []) == []


def test_grade_convenience():
    assert grade(r"\boxed{\frac{1}{2}}", "0.5") is True
    assert grade(r"\boxed{3}", "0.5") is False
    assert grade(r"<think>\boxed{3}</think>", "3", require_think_close=True) is False
    assert grade("so it is 3", "3", fallbacks=("last_number",)) is True


PLAIN_SCRIPT = 'from lcot_mega.reward import grade\nprint(grade(r"\\boxed{\\frac{1}{2}}", "0.5"))\n'
REPO = Path(__file__).resolve().parents[2]


def _run_user_code(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_plain_script_without_main_guard_can_grade(tmp_path):
    # multiprocessing's spawn would re-import plain.py in each worker and die on its top-level grade() call.
    (tmp_path / "plain.py").write_text(PLAIN_SCRIPT)
    out = _run_user_code(["plain.py"], tmp_path)
    assert (out.returncode, out.stdout) == (0, "True\n"), out.stderr


def test_python_dash_c_can_grade(tmp_path):
    out = _run_user_code(["-c", PLAIN_SCRIPT], tmp_path)
    assert (out.returncode, out.stdout) == (0, "True\n"), out.stderr


def test_reward_function_from_the_main_script_is_refused(monkeypatch):
    # A worker would have to run the caller's script to find it; say so before starting any worker.
    def local_reward(response: str, answer: str) -> bool:
        return True

    local_reward.__module__, local_reward.__qualname__ = "__main__", "local_reward"
    monkeypatch.setattr(sys.modules["__main__"], "local_reward", local_reward, raising=False)
    with pytest.raises(ValueError, match="main script"):
        Grader("__main__:local_reward")


def test_grader_workers_do_not_import_torch():
    # Workers import lcot_mega.reward; torch there would add about 1.5 s to every worker (re)start.
    code = "import sys, lcot_mega.reward.grader; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
