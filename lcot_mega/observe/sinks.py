"""Metric sinks: the JSONL file every run writes, and the optional TensorBoard and Weights & Biases mirrors.

A sink receives already-checked metrics (`group/name` keys, python floats that may be NaN or inf, and strings
for the label keys of keys.LABEL_KEYS) once per step, with strictly increasing steps. TensorBoard and wandb
are imported only when a sink is built, so the package works without them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lcot_mega.utils.atomic_file import atomic_write

__all__ = ["METRICS_FILE", "WANDB_ID_FILE", "JsonlSink", "MetricSink", "TensorBoardSink", "WandbSink"]

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"
WANDB_MODES = ("offline", "online")


@runtime_checkable
class MetricSink(Protocol):
    """Anything that takes one step's metrics; `MetricsLogger` fans out to a list of these."""

    def write(self, step: int, metrics: Mapping[str, float | str]) -> None: ...

    def close(self) -> None: ...


def _json_value(value: float | str) -> float | str | None:
    return value if isinstance(value, str) or math.isfinite(value) else None


def parse_line(line: bytes | str) -> dict[str, Any] | None:
    """One metrics.jsonl record, or None when the line is not a complete JSON object with an integer step."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return None
    return record


def _kept_lines(path: Path, resume_step: int) -> tuple[list[bytes], int | None]:
    """The lines of `path` with step <= resume_step, and the largest such step.

    Only the last line may be unreadable (a crash while it was written): it is dropped with a warning.
    A bad line before it means the file was damaged some other way, which a resume must not paper over.
    """
    lines = path.read_bytes().splitlines(keepends=True)
    kept, last = [], None
    for i, line in enumerate(lines):
        record = parse_line(line)
        if record is None:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a metrics record: {line[:200]!r}")
            warnings.warn(f"{path}: dropping a torn last line (crash while writing): {line[:200]!r}", stacklevel=3)
            break
        if record["step"] <= resume_step:
            kept.append(line if line.endswith(b"\n") else line + b"\n")
            last = record["step"] if last is None else max(last, record["step"])
    return kept, last


class JsonlSink:
    """`<run_dir>/metrics.jsonl`: one `{"step": k, "time": unix_s, ...metrics}` object per line.

    Each line is flushed and fsynced when written, so a crash loses at most the line being written.
    Non-finite values (NaN, +-inf) are written as JSON null: strict JSON has no NaN, and every JSON reader
    must be able to read the file; labels are JSON strings. With `resume_step=k` the lines with step > k are
    dropped first (atomic rewrite), so a run resumed from the checkpoint at step k writes the same step
    sequence as one that never stopped. Without it the run starts a new file (a crashed run without a
    checkpoint restarts from scratch).
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.last_step: int | None = None
        kept: list[bytes] = []
        if resume_step is not None and self.path.exists():
            kept, self.last_step = _kept_lines(self.path, resume_step)
        elif self.path.exists() and self.path.stat().st_size:
            warnings.warn(f"{self.path} exists and this is not a resume: starting it anew", stacklevel=2)
        atomic_write(self.path, b"".join(kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run)

    def write(self, step: int, metrics: Mapping[str, float | str]) -> None:
        record = {"step": step, "time": self.clock(), **{k: _json_value(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.last_step = step

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class TensorBoardSink:
    """TensorBoard scalars under `log_dir` (torch.utils.tensorboard, imported here so it stays optional).

    Events after the resume step are purged (SummaryWriter's `purge_step`); a new run purges everything an
    earlier run left in the same directory. Flushed every step, like the JSONL file. Labels are skipped: a
    scalar chart cannot show them (metrics.jsonl has them).
    """

    def __init__(self, log_dir: str | os.PathLike, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "logging.tensorboard=true needs the tensorboard package: `pip install tensorboard`, "
                "or set logging.tensorboard=false (metrics.jsonl is written either way)"
            ) from e
        purge_step = 0 if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, step: int, metrics: Mapping[str, float | str]) -> None:
        for key, value in metrics.items():
            if not isinstance(value, str):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The run id kept in `<run_dir>/wandb_id`: reused on a resume so the wandb run continues; else a new one."""
    id_file = run_dir / WANDB_ID_FILE
    if resume and id_file.exists():
        run_id = id_file.read_text().strip()
        if run_id:
            return run_id
    run_id = _new_run_id()
    atomic_write(id_file, run_id.encode() + b"\n")
    return run_id


class WandbSink:
    """A Weights & Biases run in `run_dir` (mode offline or online), wandb imported here so it stays optional.

    The run id is persisted in `<run_dir>/wandb_id`; a resume reuses it with `resume="allow"`, so the charts
    continue in the same run. wandb itself keeps steps monotonic: an online run that had logged past the
    resume step ignores the repeated steps (rewind is a server-side feature this sink does not use). Labels are
    logged as they are (wandb shows strings in the run's table, not as charts).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        mode: str,
        project: str,
        *,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume: bool = False,
    ):
        if mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb = {mode!r} does not make a wandb sink; allowed: {list(WANDB_MODES)}")
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                f"logging.wandb={mode} needs the wandb package: `pip install wandb`, "
                "or set logging.wandb=disabled (metrics.jsonl is written either way)"
            ) from e
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = _wandb_run_id(run_dir, resume)
        self._run = wandb.init(
            mode=mode,
            project=project,
            dir=str(run_dir),
            id=self.run_id,
            resume="allow",
            name=run_name,
            config=dict(config) if config is not None else None,
        )

    def write(self, step: int, metrics: Mapping[str, float | str]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()
