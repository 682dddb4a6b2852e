"""tools/prepare_data.py: the public math sets' layouts into the prompt-file schema, deduplicated, with counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.scripts import load_script

from lcot_mega.data import Problem, load_problem_file

prep = load_script("tools/prepare_data.py")

DAPO_USER = prep.DAPO_PREFIX + "\n\n{}\n\n" + prep.DAPO_SUFFIX


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _dapo_row(problem, answer, index):
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_USER.format(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def test_deepscaler_json_keeps_solutions(tmp_path):
    p = tmp_path / "deepscaler.json"
    p.write_text(json.dumps([{"problem": "What is $1+1$?", "answer": "2", "solution": "One and one: $\\boxed{2}$."}]))
    records, counts = prep.prepare([str(p)])
    assert records == [
        {
            "prompt": "What is $1+1$?",
            "answer": "2",
            "uid": None,
            "solution": "One and one: $\\boxed{2}$.",
            "source": None,
        }
    ]
    assert counts.read == 1


def test_math500_uses_unique_id(tmp_path):
    row = {
        "problem": "P",
        "answer": "\\frac{1}{2}",
        "solution": "S",
        "subject": "Algebra",
        "level": 3,
        "unique_id": "test/algebra/1.json",
    }
    records, _ = prep.prepare([_jsonl(tmp_path / "math500.jsonl", [row])])
    assert records == [
        {"prompt": "P", "answer": "\\frac{1}{2}", "uid": "test/algebra/1.json", "solution": "S", "source": None}
    ]


@pytest.mark.parametrize(
    "row",
    [
        {"ID": "2024-I-1", "Problem": "Aya walks", "Solution": "S", "Answer": 204},  # AIME 2024
        {"id": "2024-I-1", "question": "Aya walks", "answer": "204"},  # AIME 2025 layouts
        {"id": "2024-I-1", "problem": "Aya walks", "answer": 204.0, "url": "https://x"},  # AMC: answers as floats
    ],
)
def test_competition_column_spellings(tmp_path, row):
    records, _ = prep.prepare([_jsonl(tmp_path / "aime.jsonl", [row])])
    assert [(r["prompt"], r["answer"], r["uid"]) for r in records] == [("Aya walks", "204", "2024-I-1")]


def test_dapo_parquet_is_unwrapped_and_deduplicated(tmp_path):
    rows = [_dapo_row("Find $x$.", "3", "a"), _dapo_row("Find  $x$.", "3", "b"), _dapo_row("Find $y$.", "4", "c")]
    rows.append(_dapo_row("Find $y$.", "5", "d"))
    records, counts = prep.prepare([_parquet(tmp_path / "dapo-math-17k.parquet", rows)])
    assert [(r["prompt"], r["answer"], r["uid"]) for r in records] == [("Find $x$.", "3", "a"), ("Find $y$.", "4", "c")]
    assert (counts.read, counts.duplicates, counts.conflicting, counts.unwrapped) == (4, 2, 1, 0)


def test_aime_parquet(tmp_path):
    path = _parquet(tmp_path / "aime24.parquet", [{"ID": "2024-II-4", "Problem": "Q", "Solution": "S", "Answer": 33}])
    assert prep.prepare([path])[0][0]["answer"] == "33"


def test_dapo_user_turn_without_the_wrapper_is_kept_as_is():
    assert prep.unwrap_dapo("  plain problem ") == ("plain problem", False)
    assert prep.unwrap_dapo(DAPO_USER.format("P")) == ("P", True)


def test_explicit_format_overrides_detection(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"id": 7, "problem": "P", "answer": "1", "solution": "S"}])
    assert prep.detect_format(json.loads(Path(path).read_text())) == "competition"
    assert prep.prepare([path])[0][0]["uid"] == "7"
    assert prep.prepare([path], "deepscaler")[0][0]["uid"] is None
    with pytest.raises(ValueError, match=r"x\.jsonl:1: cannot tell the format from columns \['q', 'sol'\]"):
        prep.prepare([_jsonl(tmp_path / "x.jsonl", [{"q": "P", "sol": "1"}])])


def test_main_writes_a_loadable_file_and_reports_counts(tmp_path, capsys):
    a = _jsonl(
        tmp_path / "aime24.jsonl", [{"ID": 1, "Problem": "A", "Answer": 1}, {"ID": 2, "Problem": "B", "Answer": None}]
    )
    b = _jsonl(
        tmp_path / "aime25.jsonl",
        [{"id": 1, "problem": "C", "answer": "3"}, {"id": 9, "problem": " A ", "answer": "1"}],
    )
    out = tmp_path / "out" / "aime.jsonl"
    assert prep.main([a, b, "-o", str(out), "--source", "aime"]) == 0
    captured = capsys.readouterr()
    assert "read 4 records, skipped 1 unusable, dropped 1 duplicates (0 with a different answer" in captured.out
    assert "aime24.jsonl:2: field 'answer' must be text or a number" in captured.err
    # both files number their problems from 1: uids get the file name so they stay unique
    assert load_problem_file(out, "aime") == [
        Problem("aime/aime24/1", "A", "1", "aime"),
        Problem("aime/aime25/1", "C", "3", "aime"),
    ]


def test_main_fails_cleanly_on_unknown_columns(tmp_path, capsys):
    assert prep.main([_jsonl(tmp_path / "x.jsonl", [{"text": "P"}]), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "error: " in capsys.readouterr().err
