"""Declaring config fields with their allowed values, so validation can name what is allowed.

Constraints ride in `dataclasses.field(metadata=...)`; the loader reads them and never rewrites a value.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

_MISSING = dataclasses.MISSING


def opt(
    default: Any = _MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field with range or choice constraints (checked on load, on list items too)."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def constraint_errors(key: str, value: Any, meta: dict[str, Any]) -> list[str]:
    """Messages for each constraint in `meta` that `value` breaks (None is never range-checked)."""
    items = value if isinstance(value, list | tuple) else [value]
    errors = []
    for item in items:
        if item is None:
            continue
        if "choices" in meta and item not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            errors.append(f"{key} = {item!r} is not allowed; choose one of: {allowed}")
            continue
        for op, bound, ok in (
            (">=", meta.get("ge"), lambda v, b: v >= b),
            (">", meta.get("gt"), lambda v, b: v > b),
            ("<=", meta.get("le"), lambda v, b: v <= b),
            ("<", meta.get("lt"), lambda v, b: v < b),
        ):
            if bound is not None and not ok(item, bound):
                errors.append(f"{key} = {item!r} is out of range: it must be {op} {bound}")
    return errors
