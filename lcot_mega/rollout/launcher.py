"""Launch and supervise rollout server processes: real SGLang servers on GPUs, `lcot-mega serve` on CPU.

Each server runs in its own session (process group), so stopping it also stops whatever it spawned (SGLang's
scheduler and detokenizer processes), and a Ctrl-C in the parent's terminal does not reach it: the parent
stops its servers itself (`ServerSupervisor.shutdown`, also registered with `atexit`). A parent killed by a
signal it does not handle (SIGKILL, an unhandled SIGTERM) skips `atexit`; its servers then outlive it.

Output of every server goes to `<log_dir>/server-<i>.log`, appended across restarts, each launch starting with
a header line; a start that fails raises `ServerStartError` with the exit code and the tail of that launch's log.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lcot_mega.rollout.http_client import SGLangHTTPEngine
from lcot_mega.utils.distributed import free_port

CommandFactory = Callable[[int, int], list[str]]
"""(server index, port) -> the command line that starts that server on that port."""

_POLL_S = 0.1
_LOG_TAIL_LINES = 20


class ServerStartError(RuntimeError):
    """A server exited or did not answer /health in time; the message holds its exit code and log tail."""


def sglang_command(
    model_path: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    tp_size: int = 1,
    api_key: str | None = None,
    mem_fraction_static: float | None = None,
    random_seed: int | None = None,
    enable_memory_saver: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`python -m sglang.launch_server ...` with SGLang 0.5's flag names (`ServerArgs` field names, dashed).

    `enable_memory_saver` is needed for `release_memory` / `resume_memory` (`/release_memory_occupation`)."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path)]
    cmd += ["--host", host, "--port", str(int(port)), "--tp-size", str(int(tp_size))]
    if api_key:
        cmd += ["--api-key", api_key]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(float(mem_fraction_static))]
    if random_seed is not None:
        cmd += ["--random-seed", str(int(random_seed))]
    if enable_memory_saver:
        cmd.append("--enable-memory-saver")
    return cmd + [str(a) for a in extra_args]


def embedded_command(
    model_path: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    dtype: str = "float32",
) -> list[str]:
    """`lcot-mega serve` (the embedded engine behind SGLang's HTTP subset) with this interpreter."""
    cmd = [sys.executable, "-m", "lcot_mega.cli", "serve", str(model_path), "--port", str(int(port)), "--host", host]
    return cmd + ["--dtype", dtype] + (["--api-key", api_key] if api_key else [])


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerProcess:
    """One server process: started in its own session, logged to a file, probed on /health, stopped as a group."""

    def __init__(
        self,
        command: Sequence[str],
        url: str,
        log_path: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        api_key: str | None = None,
        name: str = "server",
    ) -> None:
        self.command, self.url, self.log_path = [str(c) for c in command], url, Path(log_path)
        self.env, self.api_key, self.name = dict(env or {}), api_key, name
        self.launches = 0
        self._proc: subprocess.Popen | None = None
        self._log_offset = 0
        self._group_killed = False  # after that the pgid may be reused: never signal it again

    def start(self) -> ServerProcess:
        """Launch the command; returns at once (see `wait_healthy`)."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.launches += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            header = f"===== {self.name} launch {self.launches} at {stamp}: {shlex.join(self.command)}\n"
            log.write(header.encode())
            log.flush()
            self._log_offset = log.tell()
            self._group_killed = False
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last `lines` lines this launch wrote (earlier launches are above it in the same file)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    def wait_healthy(self, deadline_s: float) -> None:
        """Block until /health answers 200. Raise `ServerStartError` when the process exits first or `deadline_s`
        seconds pass (the process is left running then: `stop()` it)."""
        probe = SGLangHTTPEngine(self.url, self.api_key, timeout_s=2.0, retries=0)
        end = time.monotonic() + deadline_s
        while True:
            if not self.alive():
                raise self._start_error(f"exited with code {self.returncode} before answering /health")
            if probe.health() and self.alive():  # alive again: the answer must come from this process
                return
            if time.monotonic() >= end:
                raise self._start_error(f"did not answer {self.url}/health within {deadline_s:.0f}s (still running)")
            time.sleep(_POLL_S)

    def _start_error(self, what: str) -> ServerStartError:
        return ServerStartError(
            f"{self.name} {what}\n  command: {shlex.join(self.command)}\n  log: {self.log_path}\n"
            f"  last lines of the log:\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; returns the exit code (None if never started)."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=grace_s)
        # Children (SGLang's scheduler processes) may outlive the leader: the group gets SIGKILL either way.
        self.signal(signal.SIGKILL)
        self._group_killed = True
        return self._proc.wait()

    def signal(self, sig: int) -> None:
        """Send `sig` to the server's process group (it leads its own: start_new_session)."""
        if self._proc is not None and not self._group_killed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)


class ServerSupervisor:
    """`n` servers on free loopback ports; each keeps its port (and URL) across restarts.

    Starts them all at construction and waits until every one is healthy (or stops them and raises). A context
    manager; `shutdown()` also runs at interpreter exit."""

    def __init__(
        self,
        commands_factory: CommandFactory,
        n: int,
        log_dir: str | Path,
        health_deadline_s: float = 300.0,
        *,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        env: Mapping[str, str] | None = None,
        stop_grace_s: float = 10.0,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.commands_factory, self.log_dir = commands_factory, Path(log_dir)
        self.health_deadline_s, self.stop_grace_s = health_deadline_s, stop_grace_s
        self.host, self.api_key = host, api_key
        self.ports = _distinct_free_ports(n)
        self._lock = threading.Lock()
        self._closed = False
        self.processes = [
            ServerProcess(
                commands_factory(i, port), _url(host, port), self.log_dir / f"server-{i}.log",
                env=env, api_key=api_key, name=f"server {i}",
            )
            for i, port in enumerate(self.ports)
        ]  # fmt: skip
        atexit.register(self.shutdown)
        try:
            for p in self.processes:
                p.start()
            for p in self.processes:
                p.wait_healthy(health_deadline_s)
        except BaseException:
            self.shutdown()
            raise

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.processes]

    def client(self, i: int, **kwargs: Any) -> SGLangHTTPEngine:
        """An HTTP client of server `i` (kwargs go to `SGLangHTTPEngine`; in an `EnginePool` pass retries=0:
        failover is the pool's job)."""
        return SGLangHTTPEngine(self.processes[i].url, self.api_key, **kwargs)

    def clients(self, **kwargs: Any) -> list[SGLangHTTPEngine]:
        return [self.client(i, **kwargs) for i in range(len(self.processes))]

    def dead(self) -> list[int]:
        """Indices of servers whose process has exited."""
        return [i for i, p in enumerate(self.processes) if not p.alive()]

    def restart(self, i: int, grace_s: float | None = None) -> None:
        """Stop what is left of server `i` (SIGTERM, SIGKILL after `grace_s`, default `stop_grace_s`), launch it
        again on the same port, wait until it is healthy. A hung server needs `grace_s=0`: a stopped (SIGSTOP)
        process holds SIGTERM pending, so only SIGKILL ends it."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the supervisor is shut down")
            proc = self.processes[i]
            proc.stop(self.stop_grace_s if grace_s is None else grace_s)
            proc.start()
        proc.wait_healthy(self.health_deadline_s)  # outside the lock: shutdown() may stop it meanwhile

    def shutdown(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL after the grace period). Idempotent."""
        with self._lock:
            self._closed = True
            procs = list(self.processes)
        for p in procs:
            if p.alive():
                p.signal(signal.SIGTERM)  # all at once, then wait: n servers stop in one grace period
        for p in procs:
            p.stop(self.stop_grace_s)
        atexit.unregister(self.shutdown)

    def __enter__(self) -> ServerSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
