"""tools/prepare_data.py --format gpqa: GPQA's CSV/JSONL columns into `choices` records the loader shuffles."""

from __future__ import annotations

import csv
import json
import re

import pytest
from helpers.scripts import load_script

from lcot_mega.data import load_problem_file

prep = load_script("tools/prepare_data.py")

HEADER = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2"]
HEADER += ["Incorrect Answer 3", "Explanation", "Record ID", "High-level domain"]


def _gpqa_row(question, right, wrong, record_id):
    values = ["old text", question, right, *wrong, "because", record_id, "Physics"]
    return dict(zip(HEADER, values, strict=True))


def _csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_csv_rows_become_choice_records_with_the_correct_option_first(tmp_path):
    rows = [
        _gpqa_row("What is\nthe spin? ", " 1/2\n", ["0", "1", "3/2 "], "recA"),
        _gpqa_row("Which gas?", "Ne", ["Na", "Mg", "Al"], "recB"),
    ]
    records, counts = prep.prepare([_csv(tmp_path / "gpqa_diamond.csv", rows)])
    assert counts.formats == {str(tmp_path / "gpqa_diamond.csv"): "gpqa"}
    assert records == [
        {
            "prompt": "What is\nthe spin?",
            "answer": "1/2",
            "uid": "recA",
            "solution": None,
            "source": None,
            "choices": ["1/2", "0", "1", "3/2"],
        },
        {
            "prompt": "Which gas?",
            "answer": "Ne",
            "uid": "recB",
            "solution": None,
            "source": None,
            "choices": ["Ne", "Na", "Mg", "Al"],
        },
    ]


def test_written_file_loads_as_shuffled_letters(tmp_path):
    src = _csv(tmp_path / "gpqa_diamond.csv", [_gpqa_row("Q", "right", ["w1", "w2", "w3"], "rec1")])
    out = tmp_path / "gpqa_diamond.jsonl"
    assert prep.main([src, "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        "prompt": "Q",
        "answer": "right",
        "uid": "rec1",
        "choices": ["right", "w1", "w2", "w3"],
    }
    # Random("42:rec1") orders the four options [2, 3, 1, 0] (pinned in test_choices.py): right is (D)
    [problem] = load_problem_file(out, "gpqa_diamond")
    assert (problem.uid, problem.problem, problem.answer) == (
        "gpqa_diamond/rec1",
        "Q\n\n(A) w2\n(B) w3\n(C) w1\n(D) right",
        "D",
    )


def test_jsonl_layout_is_detected_too(tmp_path):
    p = tmp_path / "gpqa.jsonl"
    p.write_text(json.dumps(_gpqa_row("Q", "a", ["b", "c", "d"], "r1")) + "\n")
    assert prep.detect_format(json.loads(p.read_text())) == "gpqa"
    assert prep.prepare([str(p)])[0][0]["choices"] == ["a", "b", "c", "d"]


def test_rows_with_empty_or_repeated_options_are_skipped_and_counted(tmp_path, capsys):
    rows = [
        _gpqa_row("Q1", "a", ["b", "", "d"], "r1"),
        _gpqa_row("Q2", "a", ["b", "a ", "d"], "r2"),
        _gpqa_row("Q3", "a", ["b", "c", "d"], ""),
    ]
    out = tmp_path / "o.jsonl"
    assert prep.main([_csv(tmp_path / "g.csv", rows), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "read 3 records, skipped 2 unusable" in captured.out
    assert re.search(r"g\.csv: row 1: field 'choices': option C must be non-empty text", captured.err)
    assert re.search(r"g\.csv: row 2: field 'choices': options A and C are the same text 'a'", captured.err)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "Q3", "answer": "a", "choices": ["a", "b", "c", "d"]}  # an empty Record ID is no uid
    ]


def test_lcot_records_keep_their_choices_and_letter_answers(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text(json.dumps({"prompt": "P", "answer": "B", "choices": ["x", "y"]}) + "\n")
    assert prep.prepare([str(p)])[0][0]["choices"] == ["x", "y"]
    p.write_text(json.dumps({"prompt": "P", "answer": "z", "choices": ["x", "y"]}) + "\n")
    records, counts = prep.prepare([str(p)])
    assert (records, counts.invalid) == ([], 1)
    assert "'z' is neither the text of one of the 2 choices nor a letter A-B" in counts.examples[0]


def test_empty_csv_is_an_error(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text(",".join(HEADER) + "\n")
    with pytest.raises(ValueError, match=r"e\.csv: the file holds no records"):
        prep.prepare([str(p)])
