"""Reading metrics.jsonl back, for plots, tests and comparisons of runs (pure stdlib)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lcot_mega.observe.sinks import parse_line

__all__ = ["metric_series", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order, with JSON null read back as NaN and labels as strings.

    The last line may be torn (the run is still writing it, or crashed mid-line): it is skipped, so a live
    run can be read at any time. An unreadable line before the last raises ValueError.
    """
    lines = Path(path).read_bytes().splitlines()
    records = []
    for i, line in enumerate(lines):
        record = parse_line(line)
        if record is None:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics record: {line[:200]!r}")
        records.append({k: math.nan if v is None else v for k, v in record.items()})
    return records


def metric_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float | str]]:
    """(steps, values) of `key` over the records that have it, in record order; a label's values are strings."""
    steps, values = [], []
    for record in records:
        if key in record:
            value = record[key]
            steps.append(record["step"])
            values.append(value if isinstance(value, str) else float(value))
    return steps, values
