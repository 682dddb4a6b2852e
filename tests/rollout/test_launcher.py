"""Server processes: healthy start with per-server logs, crash -> dead() -> restart on the same URL, a failed start
reported with its log tail within the deadline, and no process left after shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcot_mega.rollout.launcher import (
    ServerProcess,
    ServerStartError,
    ServerSupervisor,
    embedded_command,
    sglang_command,
)

SERVE_ENV = {"OMP_NUM_THREADS": "1"}


def group_gone(pgid: int) -> bool:
    """No running process is left in the process group `pgid` (each server leads its own). Zombies count as gone:
    an orphan's exit status waits for init to reap it, which may take seconds."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):  # fields: state, ppid, pgrp, ...
            return False
    return True


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def supervisor(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    with ServerSupervisor(lambda i, port: embedded_command(model_dir, port), 2, log_dir, 60, env=SERVE_ENV) as sup:
        yield sup


def test_sglang_command_uses_sglang_server_arg_names():
    cmd = sglang_command(
        "/m", 30001, tp_size=2, api_key="k", mem_fraction_static=0.5, random_seed=3, enable_memory_saver=True,
        extra_args=["--dtype", "bfloat16"],
    )  # fmt: skip
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    args = cmd[3:]
    assert args == [
        "--model-path", "/m", "--host", "127.0.0.1", "--port", "30001", "--tp-size", "2", "--api-key", "k",
        "--mem-fraction-static", "0.5", "--random-seed", "3", "--enable-memory-saver", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert "--api-key" not in sglang_command("/m", 1) and "--random-seed" not in sglang_command("/m", 1)


def test_embedded_command_runs_lcot_mega_serve_with_this_interpreter():
    cmd = embedded_command("/m", 8000, host="127.0.0.1", api_key="k", dtype="bfloat16")
    assert cmd == [sys.executable, "-m", "lcot_mega.cli", "serve", "/m", "--port", "8000", "--host", "127.0.0.1",
                   "--dtype", "bfloat16", "--api-key", "k"]  # fmt: skip


def test_servers_start_healthy_on_distinct_urls_and_log_to_their_own_files(supervisor):
    assert len(set(supervisor.urls)) == 2 and supervisor.dead() == []
    assert all(c.health() for c in supervisor.clients(retries=0))
    for i, p in enumerate(supervisor.processes):
        text = (supervisor.log_dir / f"server-{i}.log").read_text()
        assert text.startswith(f"===== server {i} launch 1 at ") and "lcot-mega serve:" in text
        assert p.url in text


def test_a_killed_server_is_reported_dead_and_restarts_healthy_on_the_same_url(supervisor):
    victim = supervisor.processes[1]
    url, old_pid = victim.url, victim.pid
    os.kill(old_pid, signal.SIGKILL)
    assert wait_until(lambda: supervisor.dead() == [1])
    assert not supervisor.client(1, retries=0).health()
    supervisor.restart(1)
    assert supervisor.dead() == [] and victim.url == url and victim.pid != old_pid and victim.launches == 2
    assert supervisor.client(1, retries=0).health()
    log = (supervisor.log_dir / "server-1.log").read_text()
    assert log.count("===== server 1 launch") == 2 and "launch 2 at" in log


def test_a_bad_model_dir_fails_within_the_deadline_with_the_log_tail(tmp_path):
    missing = tmp_path / "no-such-model"
    start = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        ServerSupervisor(lambda i, port: embedded_command(missing, port), 1, tmp_path / "logs", 30, env=SERVE_ENV)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "exited with code 1" in message and "last lines of the log" in message
    assert str(missing) in message.split("last lines of the log")[1]  # the traceback names the directory


def test_a_server_that_never_answers_health_times_out_with_its_log(tmp_path):
    stuck = [sys.executable, "-c", "import time; print('stuck loading', flush=True); time.sleep(60)"]
    proc = ServerProcess(stuck, "http://127.0.0.1:9", tmp_path / "stuck.log").start()
    try:
        with pytest.raises(ServerStartError, match=r"did not answer .* within 1s") as info:
            proc.wait_healthy(1.0)
        assert wait_until(lambda: "stuck loading" in proc.log_tail()) and proc.alive()
        assert "stuck" in str(info.value)
    finally:
        assert proc.stop(grace_s=5) == -signal.SIGTERM
    assert not proc.alive() and group_gone(proc.pid)


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    script = "import signal, time\nsignal.signal(15, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(9)\n"
    proc = ServerProcess([sys.executable, "-c", script], "http://127.0.0.1:9", tmp_path / "x.log").start()
    assert wait_until(lambda: "up" in proc.log_tail())
    start = time.monotonic()
    assert proc.stop(grace_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - start < 5 and group_gone(proc.pid)


# A stand-in server that starts in a blink: answers /health, and spawns a child (as SGLang spawns its scheduler).
FAKE_SERVER = """
import subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("child", child.pid, flush=True)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_shutdown_leaves_no_server_process_nor_its_children(tmp_path):
    sup = ServerSupervisor(lambda i, port: [sys.executable, "-c", FAKE_SERVER, str(port)], 2, tmp_path, 30)
    pids = [p.pid for p in sup.processes]
    assert wait_until(lambda: all("child" in p.log_tail() for p in sup.processes))
    children = [int(p.log_tail().split("child ")[1].split()[0]) for p in sup.processes]
    assert [os.getpgid(c) for c in children] == pids  # the children share their server's process group
    sup.shutdown()
    assert sup.dead() == [0, 1]
    # the group got SIGKILL; on a loaded machine its members may take a moment to finish dying
    assert wait_until(lambda: all(group_gone(pid) for pid in pids), timeout_s=10)
    sup.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        sup.restart(0)


def test_servers_do_not_outlive_a_parent_that_exits_without_shutdown(tmp_path):
    parent = f"""
import sys
from lcot_mega.rollout.launcher import ServerSupervisor
sup = ServerSupervisor(lambda i, port: [sys.executable, "-c", {FAKE_SERVER!r}, str(port)], 2, {str(tmp_path)!r}, 30)
print(*[p.pid for p in sup.processes], flush=True)
raise SystemExit(3)  # no shutdown(): atexit must stop the servers
"""
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and all(group_gone(pid) for pid in pids)
