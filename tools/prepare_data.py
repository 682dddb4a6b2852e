"""Convert local copies of the usual public math sets into lcot-mega's prompt-file schema (docs/DATA.md).

python tools/prepare_data.py deepscaler.json -o data/deepscaler.jsonl
python tools/prepare_data.py dapo-math-17k.parquet -o data/dapo17k.jsonl           # 1.79M rows -> ~17k problems
python tools/prepare_data.py aime_2024.parquet aime_2025.jsonl -o data/aime.jsonl --format competition
python tools/prepare_data.py gpqa_diamond.csv -o data/gpqa_diamond.jsonl                       # 198 questions

Formats (auto-detected from the first record's columns, or named with --format):
  dapo         DAPO-Math-17k parquet: `prompt` chat list (the user turn wraps the problem in an instruction,
               which is stripped), answer in `reward_model.ground_truth`, uid from `extra_info.index`
  math500      MATH-500: problem, answer, solution, unique_id (-> uid)
  deepscaler   DeepScaleR-Preview: problem, answer, solution
  competition  AIME 2024/2025, AMC and similar (aliases: aime, amc): Problem/problem/question,
               Answer/answer, optional id/ID and Solution/solution
  gpqa         GPQA (main, diamond, extended): Question, Correct Answer, Incorrect Answer 1..3, optional
               Record ID (-> uid); written as `choices` (the correct one first) with `answer` = its text, so the
               loader shuffles the options per problem with its seed and grades the letter
  lcot         already in this schema (prompt, answer, ...): validated and deduplicated
Input files may be .jsonl, .json (a list of records), .parquet (needs pyarrow) or .csv (a header row; GPQA ships
so). Problems are deduplicated across all inputs by whitespace-normalized text (first one kept); the counts are
printed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcot_mega.data.choices import answer_index, check_choices
from lcot_mega.data.files import answer_text, read_rows, write_jsonl
from lcot_mega.data.problems import normalize_problem

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form"
    " Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


@dataclass(frozen=True)
class Columns:
    """Where a format keeps each field: the first alias present in a record is used."""

    problem: tuple[str, ...]
    answer: tuple[str, ...]
    uid: tuple[str, ...] = ()
    solution: tuple[str, ...] = ()
    source: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    """A list of options (the schema's `choices`), first alias present."""
    distractors: tuple[str, ...] = ()
    """Columns that each hold one wrong option, all required: the record's choices are [answer, *distractors]."""


COLUMNS = {
    "lcot": Columns(("prompt",), ("answer",), ("uid",), ("solution",), ("source",), choices=("choices",)),
    "math500": Columns(("problem",), ("answer",), ("unique_id",), ("solution",)),
    "deepscaler": Columns(("problem",), ("answer",), (), ("solution",)),
    "competition": Columns(
        ("Problem", "problem", "question", "Question"),
        ("Answer", "answer"),
        ("id", "ID", "Id", "problem_id"),
        ("Solution", "solution"),
    ),
    "gpqa": Columns(
        ("Question",),
        ("Correct Answer",),
        ("Record ID",),
        distractors=("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
    ),
}
FORMATS = ("auto", "dapo", *COLUMNS, "aime", "amc")
ALIASES = {"aime": "competition", "amc": "competition"}


@dataclass
class Counts:
    read: int = 0
    invalid: int = 0
    duplicates: int = 0
    conflicting: int = 0
    """Duplicates whose answer differs from the kept copy's (the first one wins)."""
    unwrapped: int = 0
    """DAPO rows whose instruction wrapper was not found (kept as they are)."""
    uids_dropped: int = 0
    """Records whose uid repeats even with the file name prefixed (row positions become their uids)."""
    examples: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    """The format each input was read as."""


def detect_format(row: dict[str, Any]) -> str:
    """The format of a record from its columns; ValueError lists the columns when none fits."""
    cols = set(row)
    if {"Question", "Correct Answer", *COLUMNS["gpqa"].distractors} <= cols:
        return "gpqa"
    if {"prompt", "reward_model"} <= cols:
        return "dapo"
    if {"prompt", "answer"} <= cols and isinstance(row["prompt"], str):
        return "lcot"
    if {"problem", "answer", "unique_id"} <= cols:
        return "math500"
    competition = COLUMNS["competition"]
    if _has(cols, competition.uid) and _has(cols, competition.problem) and _has(cols, competition.answer):
        return "competition"
    if {"problem", "answer", "solution"} <= cols:
        return "deepscaler"
    if _has(cols, competition.problem) and _has(cols, competition.answer):
        return "competition"
    raise ValueError(
        f"cannot tell the format from columns {sorted(cols)}; name it with --format ({', '.join(FORMATS[1:])})"
    )


def _has(cols: set[str], aliases: Iterable[str]) -> bool:
    return bool(cols & set(aliases))


def convert_row(fmt: str, row: dict[str, Any], where: str, counts: Counts) -> dict[str, Any]:
    """One record in the prompt-file schema (prompt, answer, uid, solution, source, and `choices` for a
    multiple-choice record); ValueError if unusable."""
    if fmt == "dapo":
        return _convert_dapo(row, where, counts)
    cols = COLUMNS[fmt]
    problem = _first(row, cols.problem)
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{where}: no problem text in {' / '.join(cols.problem)}")
    uid = _first(row, cols.uid)
    record = {
        "prompt": problem.strip(),
        "answer": answer_text(_first(row, cols.answer), where),
        "uid": None if uid in (None, "") else str(uid),
        "solution": _first(row, cols.solution) or None,
        "source": _first(row, cols.source) or None,
    }
    choices = _choices(cols, row, record["answer"], where)
    return record if choices is None else {**record, "choices": choices}


def _choices(cols: Columns, row: dict[str, Any], answer: str, where: str) -> list[str] | None:
    """The record's options, checked as the loader checks them (2..26 distinct texts, the answer among them)."""
    if cols.distractors:
        options = [answer, *(row.get(c) for c in cols.distractors)]
    else:
        options = _first(row, cols.choices)
        if options is None:
            return None
    try:
        options = check_choices(options)
        answer_index(options, answer)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return options


def _convert_dapo(row: dict[str, Any], where: str, counts: Counts) -> dict[str, Any]:
    messages = row.get("prompt")
    users = [m.get("content") for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise ValueError(f"{where}: `prompt` has no user turn")
    problem, found = unwrap_dapo(users[-1])
    counts.unwrapped += not found
    reward_model = row.get("reward_model") or {}
    uid = (row.get("extra_info") or {}).get("index")
    return {
        "prompt": problem,
        "answer": answer_text(reward_model.get("ground_truth"), where),
        "uid": None if uid is None else str(uid),
        "solution": None,
        "source": None,
    }


def unwrap_dapo(text: str) -> tuple[str, bool]:
    """The problem inside DAPO-Math-17k's instruction wrapper, and whether the wrapper was there."""
    body = text.strip()
    found = body.startswith(DAPO_PREFIX) and body.endswith(DAPO_SUFFIX)
    if found:
        body = body[len(DAPO_PREFIX) : -len(DAPO_SUFFIX)].strip()
    return body, found


def _first(row: dict[str, Any], aliases: Iterable[str]) -> Any:
    return next((row[k] for k in aliases if row.get(k) is not None), None)


def prepare(paths: Sequence[str], fmt: str = "auto", source: str | None = None) -> tuple[list[dict[str, Any]], Counts]:
    """Converted, deduplicated records from all `paths` (in order), with what was dropped and why."""
    fmt = ALIASES.get(fmt, fmt)
    counts = Counts()
    kept: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in paths:
        file_fmt = None if fmt == "auto" else fmt
        for where, row in _read(path):
            counts.read += 1
            file_fmt = file_fmt or _detect(row, where)
            counts.formats[str(path)] = file_fmt
            record = _convert_or_count(file_fmt, row, where, counts)
            if record is None:
                continue
            record["source"] = source or record["source"]
            key = normalize_problem(record["prompt"])
            if key in kept:
                counts.duplicates += 1
                counts.conflicting += kept[key][1]["answer"] != record["answer"]
            else:
                kept[key] = (Path(path).stem, record)
    return _unique_uids(list(kept.values()), counts), counts


def _read(path: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """Records of a prompt file (files.read_rows) or of a CSV file with a header row."""
    if not str(path).lower().endswith(".csv"):
        return read_rows(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if not rows:
        raise ValueError(f"{path}: the file holds no records")
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows, start=1)]


def _detect(row: dict[str, Any], where: str) -> str:
    try:
        return detect_format(row)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _convert_or_count(fmt: str, row: dict[str, Any], where: str, counts: Counts) -> dict[str, Any] | None:
    """The converted record, or None after counting it as unusable (the first few reasons are kept)."""
    try:
        return convert_row(fmt, row, where, counts)
    except ValueError as e:
        counts.invalid += 1
        if len(counts.examples) < 3:
            counts.examples.append(str(e))
        return None


def _unique_uids(kept: list[tuple[str, dict[str, Any]]], counts: Counts) -> list[dict[str, Any]]:
    """Uids as given; when two kept problems share one (AIME 2024 and 2025 both number 1..30), each is prefixed
    with its input file's name; uids still repeated are dropped (the loader would reject the file)."""
    records = [r for _, r in kept]
    if _repeated(records):
        for stem, r in kept:
            r["uid"] = None if r["uid"] is None else f"{stem}/{r['uid']}"
    repeated = _repeated(records)
    for r in records:
        if r["uid"] in repeated:
            r["uid"] = None
            counts.uids_dropped += 1
    return records


def _repeated(records: list[dict[str, Any]]) -> set[str]:
    seen: set[str] = set()
    twice: set[str] = set()
    for r in records:
        if r["uid"] is not None:
            (twice if r["uid"] in seen else seen).add(r["uid"])
    return twice


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="input files (.jsonl, .json, .parquet, .csv)")
    parser.add_argument("-o", "--out", required=True, help="output .jsonl")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: by columns)")
    parser.add_argument("--source", default=None, help="`source` written on every record (per-source metrics)")
    args = parser.parse_args(argv)
    try:
        records, counts = prepare(args.inputs, args.format, args.source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, fmt in counts.formats.items():
        print(f"{path}: read as {fmt}")
    for example in counts.examples:
        print(f"skipped: {example}", file=sys.stderr)
    written = write_jsonl(args.out, records)
    print(
        f"read {counts.read} records, skipped {counts.invalid} unusable, dropped {counts.duplicates} duplicates"
        f" ({counts.conflicting} with a different answer; the first kept), wrote {written} to {args.out}"
    )
    if counts.uids_dropped:
        print(f"note: {counts.uids_dropped} records had repeated uids and were written without one")
    if counts.unwrapped:
        print(f"note: {counts.unwrapped} DAPO prompts lacked the usual instruction wrapper and were kept as they are")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
