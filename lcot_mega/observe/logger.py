"""MetricsLogger: checks one step's metrics once, then hands them to every sink (JSONL always)."""

from __future__ import annotations

import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lcot_mega.observe.keys import check_key, is_label
from lcot_mega.observe.sinks import METRICS_FILE, JsonlSink, MetricSink, TensorBoardSink, WandbSink

if TYPE_CHECKING:
    import torch

__all__ = ["LoggingSettings", "MetricsLogger", "to_float", "to_value"]

TENSORBOARD_DIR = "tensorboard"


class LoggingSettings(Protocol):
    """The fields of the config's `logging` section this package reads (lcot_mega.config.LoggingConfig)."""

    tensorboard: bool
    wandb: str
    wandb_project: str


def to_float(key: str, value: object) -> float:
    """`value` as a python float: numbers and 0-dim tensors; anything else is a bug in the caller."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported; reading metrics back needs none
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"metric {key!r}: a tensor must be 0-dim, got shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise TypeError(f"metric {key!r}: expected a number or a 0-dim tensor, got {type(value).__name__}")


def to_value(key: str, value: object) -> float | str:
    """A label key's string (keys.LABEL_KEYS), or any other key's value as a float (`to_float`)."""
    if not is_label(key):
        return to_float(key, value)
    if not isinstance(value, str):
        raise TypeError(f"metric {key!r} is a label: expected a str, got {type(value).__name__}")
    return value


class MetricsLogger:
    """Writes each step's metrics to `<run_dir>/metrics.jsonl` and to the sinks `logging_cfg` turns on.

    Keys are checked at `log` time (`group/name`, see keys.KEY_PATTERN) and steps must increase strictly, so
    a typo or a double log fails loudly in tests. `resume_step=k` continues a run from its step-k checkpoint:
    later lines, TensorBoard events and the wandb run's id are handled so the result equals an uninterrupted
    run. An optional sink (TensorBoard, wandb, `extra_sinks`) that fails while writing is dropped with a
    warning: the JSONL file is the record, and a dashboard hiccup must not end a long run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        logging_cfg: LoggingSettings,
        *,
        run_name: str | None = None,
        config_dict: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        extra_sinks: Sequence[MetricSink] = (),
        clock: Callable[[], float] = time.time,
    ):
        if resume_step is not None and not _is_step(resume_step):
            raise ValueError(f"resume_step must be an int >= 0 or None, got {resume_step!r}")
        resume_step = None if resume_step is None else int(resume_step)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = JsonlSink(self.run_dir / METRICS_FILE, resume_step=resume_step, clock=clock)
        self._optional: list[MetricSink] = []
        try:
            if logging_cfg.tensorboard:
                self._optional.append(TensorBoardSink(self.run_dir / TENSORBOARD_DIR, resume_step=resume_step))
            if logging_cfg.wandb != "disabled":
                self._optional.append(
                    WandbSink(
                        self.run_dir,
                        logging_cfg.wandb,
                        logging_cfg.wandb_project,
                        run_name=run_name or self.run_dir.name,
                        config=config_dict,
                        resume=resume_step is not None,
                    )
                )
        except BaseException:
            self.close()
            raise
        self._optional.extend(extra_sinks)
        self._last_step = self._jsonl.last_step

    @property
    def path(self) -> Path:
        """The metrics.jsonl file."""
        return self._jsonl.path

    @property
    def last_step(self) -> int | None:
        """The last step logged (or kept on resume); None before the first."""
        return self._last_step

    def log(self, step: int, metrics: Mapping[str, float | int | str | torch.Tensor]) -> None:
        """Record one step's metrics (merge everything a step produces into one call); label keys take strings."""
        if not _is_step(step):
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} is not after the last logged step {self._last_step}: log each step once, with all of"
                " its metrics in one mapping"
            )
        values = {}
        for key, value in metrics.items():
            check_key(key)
            values[key] = to_value(key, value)
        self._jsonl.write(step, values)
        self._last_step = step
        for sink in list(self._optional):
            try:
                sink.write(step, values)
            except Exception as e:  # any failure of an optional sink: see the class docstring
                msg = f"metric sink {type(sink).__name__} failed at step {step} and is dropped: {e!r}"
                warnings.warn(msg, stacklevel=2)
                self._optional.remove(sink)
                _close_quietly(sink)

    def close(self) -> None:
        """Close every sink (the JSONL file last, so it outlives a sink whose close raises)."""
        sinks, self._optional = self._optional, []
        try:
            for sink in sinks:
                _close_quietly(sink)
        finally:
            if hasattr(self, "_jsonl"):
                self._jsonl.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_step(step: object) -> bool:
    return isinstance(step, numbers.Integral) and not isinstance(step, bool) and step >= 0


def _close_quietly(sink: MetricSink) -> None:
    try:
        sink.close()
    except Exception as e:  # closing the others matters more
        warnings.warn(f"closing metric sink {type(sink).__name__} failed: {e!r}", stacklevel=3)
