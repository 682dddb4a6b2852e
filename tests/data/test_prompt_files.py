"""Prompt files: the JSONL/JSON/parquet schema, and errors that name the file, line and field to fix."""

from __future__ import annotations

import json
import sys

import pytest

from lcot_mega.data import Problem, load_problem_file, write_jsonl


def _jsonl(tmp_path, lines, name="set.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_rows_become_problems_with_uids_sources_solutions_and_text_answers(tmp_path):
    p = _jsonl(
        tmp_path,
        [
            {"prompt": "1+1?", "answer": "2"},
            "",
            {"prompt": "AIME", "answer": 204, "uid": "2024-I-1", "source": "aime", "solution": "It is 204."},
            {"prompt": "AMC", "answer": 142.0, "level": 3},  # extra fields are ignored
            {"prompt": "half", "answer": 0.5},
        ],
    )
    got = load_problem_file(p, "set")
    assert got == [
        Problem(uid="set/0", problem="1+1?", answer="2", source="set"),
        Problem(uid="set/2024-I-1", problem="AIME", answer="204", source="aime", solution="It is 204."),
        Problem(uid="set/2", problem="AMC", answer="142", source="set"),
        Problem(uid="set/3", problem="half", answer="0.5", source="set"),
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [{"prompt": "a", "answer": "1"}, {"prompt": "b"}],
            r"set\.jsonl:2: missing field 'answer'; fields present: prompt",
        ),
        ([{"answer": "1"}], r"set\.jsonl:1: missing field 'prompt'"),
        (
            [{"Problem": "a", "answer": "1"}],
            r"missing field 'prompt'.*a raw data set\? convert it with tools/prepare_data\.py",
        ),
        ([{"prompt": "a", "answer": "1"}, "{not json"], r"set\.jsonl:2: not valid JSON"),
        (["[1, 2]"], r"set\.jsonl:1: expected a JSON object"),
        ([{"prompt": "", "answer": "1"}], r"set\.jsonl:1: field 'prompt' must be non-empty text"),
        ([{"prompt": "a", "answer": ["1", "2"]}], r"set\.jsonl:1: field 'answer' must be text or a number, got \['1'"),
        ([{"prompt": "a", "answer": "  "}], r"set\.jsonl:1: field 'answer' is empty"),
        ([{"prompt": "a", "answer": True}], r"field 'answer' must be text or a number"),
        ([{"prompt": "a", "answer": "1", "solution": 3}], r"set\.jsonl:1: field 'solution' must be text"),
        (
            [{"prompt": "a", "answer": "1", "uid": "x"}, {"prompt": "b", "answer": "2", "uid": "x"}],
            r"set\.jsonl:2: uid 'x' already used at .*set\.jsonl:1",
        ),
    ],
)
def test_malformed_rows_name_the_file_line_and_field(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load_problem_file(_jsonl(tmp_path, lines), "set")


def test_empty_missing_and_unknown_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file holds no records"):
        load_problem_file(empty, "empty")
    with pytest.raises(ValueError, match=r"nope\.jsonl: no such file"):
        load_problem_file(tmp_path / "nope.jsonl", "nope")
    (tmp_path / "x.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'; use one of \.jsonl, \.json, \.parquet"):
        load_problem_file(tmp_path / "x.csv", "x")


def test_json_array_file(tmp_path):
    p = tmp_path / "set.json"
    p.write_text(json.dumps([{"prompt": "a", "answer": "1"}]))
    assert load_problem_file(p, "set") == [Problem("set/0", "a", "1", "set")]
    p.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(ValueError, match="must hold a list of objects"):
        load_problem_file(p, "set")


def test_write_jsonl_round_trips_and_leaves_out_none(tmp_path):
    p = tmp_path / "out" / "set.jsonl"
    assert write_jsonl(p, [{"prompt": "ü x", "answer": "1", "uid": None}]) == 1
    assert p.read_text(encoding="utf-8") == '{"prompt": "ü x", "answer": "1"}\n'


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "set.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}]), p)
    with pytest.raises(ValueError, match=r"set\.parquet: row 2: missing field 'answer'"):
        load_problem_file(p, "set")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": 3, "uid": 7}]), p)
    assert load_problem_file(p, "set") == [Problem("set/7", "a", "3", "set")]


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    p = tmp_path / "set.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"set\.parquet: reading parquet files needs pyarrow: pip install pyarrow"):
        load_problem_file(p, "set")
