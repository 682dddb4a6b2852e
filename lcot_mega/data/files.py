"""Prompt files: JSONL (one object per line), a JSON array, or parquet, with `prompt` (or `problem`) and `answer`.

The schema is documented in docs/DATA.md; `tools/prepare_data.py` converts the usual public sets into it.
Every error names the file and the line (or row) to fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lcot_mega.data.choices import DEFAULT_CHOICE_SEED, check_choices, shuffle_choices
from lcot_mega.data.problems import Problem

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
REQUIRED_FIELDS = ("prompt", "answer")
OPTIONAL_FIELDS = ("uid", "source", "solution", "choices")
PROMPT_ALIAS = "problem"
"""Benchmark files usually call the question `problem`; it is read as `prompt`."""
RAW_COLUMNS = ("Problem", "question", "Question")
"""Columns of the public sets' own layouts: a file with them and no prompt wants tools/prepare_data.py."""


def is_file_source(spec: str) -> bool:
    """Whether a data.train / data.eval entry names a prompt file (by its suffix)."""
    return spec.lower().endswith(FILE_SUFFIXES)


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, row) for each record of a .jsonl / .json / .parquet file; `where` is "file:line N" or similar.

    Blank JSONL lines are skipped. Raises ValueError for a missing file, a line that is not a JSON object, an
    unknown suffix, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    empty = True
    for where, row in rows:
        empty = False
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with fields, got {type(row).__name__}")
        yield where, row
    if empty:
        raise ValueError(f"{path}: the file holds no records")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json prompt file must hold a list of objects (or use .jsonl, one per line)")
    for i, row in enumerate(data):
        yield f"{path}: item {i}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for a corrupt or non-parquet file
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}: row {i}", row


def load_problem_file(path: str | os.PathLike, name: str, *, choice_seed: int = DEFAULT_CHOICE_SEED) -> list[Problem]:
    """Read a prompt file into Problems named `name` (uids `name/<uid or row index>`); see docs/DATA.md.

    Records with `choices` become multiple-choice problems: options shuffled by (`choice_seed`, the record's uid
    or row index), listed as (A), (B), ... under the question, and the gold answer is the correct option's letter.
    """
    problems: list[Problem] = []
    seen_uids: dict[str, str] = {}
    for index, (where, row) in enumerate(read_rows(path)):
        problem = _problem_from_row(row, where, name, index, choice_seed)
        if problem.uid in seen_uids:
            raise ValueError(f"{where}: uid {row['uid']!r} already used at {seen_uids[problem.uid]}")
        seen_uids[problem.uid] = where
        problems.append(problem)
    return problems


def _problem_from_row(row: dict[str, Any], where: str, name: str, index: int, choice_seed: int) -> Problem:
    key, prompt = _prompt_field(row, where)
    if row.get("answer") is None:
        raise ValueError(f"{where}: missing field 'answer'; fields present: {', '.join(map(str, row))}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field {key!r} must be non-empty text, got {_short(prompt)}")
    uid = row.get("uid")
    if uid is not None and (isinstance(uid, bool) or not isinstance(uid, str | int)):
        raise ValueError(f"{where}: field 'uid' must be text or an integer, got {_short(uid)}")
    for key in ("source", "solution"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{where}: field {key!r} must be text, got {_short(row[key])}")
    local_uid = str(uid if uid is not None else index)
    answer = answer_text(row["answer"], where)
    if row.get("choices") is not None:
        try:
            prompt, answer = shuffle_choices(
                prompt, check_choices(row["choices"]), answer, seed=choice_seed, uid=local_uid
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return Problem(
        uid=f"{name}/{local_uid}",
        problem=prompt,
        answer=answer,
        source=row.get("source") or name,
        solution=row.get("solution") or None,
    )


def _prompt_field(row: dict[str, Any], where: str) -> tuple[str, Any]:
    """(field name, value) of the question: `prompt`, or its alias `problem`; both given and different is an error."""
    prompt, problem = row.get("prompt"), row.get(PROMPT_ALIAS)
    if prompt is not None and problem is not None and prompt != problem:
        raise ValueError(
            f"{where}: fields 'prompt' and {PROMPT_ALIAS!r} differ; they are the same field (the question):"
            " keep one of them"
        )
    if prompt is not None:
        return "prompt", prompt
    if problem is not None:
        return PROMPT_ALIAS, problem
    hint = " (a raw data set? convert it with tools/prepare_data.py)" if any(c in row for c in RAW_COLUMNS) else ""
    raise ValueError(
        f"{where}: missing field 'prompt' (or {PROMPT_ALIAS!r}); fields present: {', '.join(map(str, row))}{hint}"
    )


def answer_text(value: Any, where: str) -> str:
    """A gold answer as text: strings stripped, numbers printed (204 and 204.0 -> "204"); anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: field 'answer' must be text or a number, got {_short(value)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet/pandas exports turn integer answers into floats: 142.0 -> "142"
    text = value.strip() if isinstance(value, str) else str(value)
    if not text:
        raise ValueError(f"{where}: field 'answer' is empty")
    return text


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL (UTF-8, one object per line) and return how many; None-valued fields are left out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
            n += 1
    return n


def _short(value: Any) -> str:
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"
