"""Multiple-choice problems: per-problem shuffles by (seed, uid), (A)-(Z) rendering, the gold letter, file fields."""

from __future__ import annotations

import json
import random
import re

import pytest

from lcot_mega.data import Problem, load_problem_file
from lcot_mega.data.choices import answer_index, check_choices, shuffle_choices

GPQA_LIKE = ["right", "wrong 1", "wrong 2", "wrong 3"]


def _jsonl(tmp_path, rows, name="mc.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _options(text: str) -> dict[str, str]:
    """Letter -> option text, read back from the rendered problem."""
    return dict(re.findall(r"^\(([A-Z])\) (.*)$", text, flags=re.MULTILINE))


def test_shuffle_is_the_documented_rng_and_renders_letters_in_order():
    # random.Random("42:rec1").shuffle([0, 1, 2, 3]) gives [2, 3, 1, 0] (pinned: string seeds hash with SHA-512,
    # the same in every Python process), so the options read wrong 2, wrong 3, wrong 1, right.
    order = [0, 1, 2, 3]
    random.Random("42:rec1").shuffle(order)
    assert order == [2, 3, 1, 0]
    text, letter = shuffle_choices("  Which one?\n", GPQA_LIKE, "right", seed=42, uid="rec1")
    assert text == "Which one?\n\n(A) wrong 2\n(B) wrong 3\n(C) wrong 1\n(D) right"
    assert letter == "D"


def test_same_seed_and_uid_give_the_same_order():
    first = shuffle_choices("Q", GPQA_LIKE, "right", seed=7, uid="x")
    assert all(shuffle_choices("Q", GPQA_LIKE, "right", seed=7, uid="x") == first for _ in range(5))


@pytest.mark.parametrize("uid", [str(i) for i in range(50)])
def test_letter_points_at_the_correct_text_and_every_option_appears_once(uid):
    choices = [f"option {i}" for i in range(6)]
    text, letter = shuffle_choices("Q", choices, "option 4", seed=42, uid=uid)
    options = _options(text)
    assert list(options) == list("ABCDEF")
    assert sorted(options.values()) == sorted(choices)
    assert options[letter] == "option 4"


def test_different_seeds_reorder_most_problems():
    # 4 options: a second independent shuffle repeats the first with probability 1/24, so about 4 of 100
    # problems keep their order; more than 15 would mean the seed is ignored for most of them.
    same = sum(
        shuffle_choices("Q", GPQA_LIKE, "right", seed=42, uid=str(i))
        == shuffle_choices("Q", GPQA_LIKE, "right", seed=43, uid=str(i))
        for i in range(100)
    )
    assert same <= 15
    # and the uid matters too: with one seed, the correct option lands on every letter across problems
    letters = {shuffle_choices("Q", GPQA_LIKE, "right", seed=42, uid=str(i))[1] for i in range(100)}
    assert letters == set("ABCD")


def test_answer_is_a_choice_text_or_a_letter_in_the_given_order():
    assert answer_index(["3", "5", "7"], " 7 ") == 2
    assert answer_index(["3", "5", "7"], "B") == 1
    assert answer_index(["A", "B"], "A") == 0  # text and letter agree
    with pytest.raises(ValueError, match=r"'D' is neither the text of one of the 3 choices nor a letter A-C"):
        answer_index(["3", "5", "7"], "D")
    with pytest.raises(ValueError, match=r"'A' is ambiguous: the text of option B and the letter of option A"):
        answer_index(["B", "A"], "A")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["only"], r"must be a list of 2 to 26 texts"),
        ([str(i) for i in range(27)], r"must be a list of 2 to 26 texts"),
        ("AB", r"must be a list of 2 to 26 texts"),
        (["a", " "], r"option B must be non-empty text"),
        (["a", 3], r"option B must be non-empty text"),
        (["a", "b", " a"], r"options A and C are the same text 'a'"),
    ],
)
def test_bad_choices_are_errors(value, message):
    with pytest.raises(ValueError, match=message):
        check_choices(value)


def test_file_with_choices_renders_options_and_gold_letters(tmp_path):
    rows = [
        {"problem": "Pick the prime.", "choices": ["4", "7"], "answer": "7", "uid": "q1"},
        {"problem": "Pick the even one.", "choices": ["8", "3", "9"], "answer": "A"},
    ]
    got = load_problem_file(_jsonl(tmp_path, rows), "mc")
    # hand-worked: Random("42:q1") orders [0, 1] as [1, 0]; Random("42:1") orders [0, 1, 2] as [2, 1, 0]
    orders = []
    for key, n in (("42:q1", 2), ("42:1", 3)):
        order = list(range(n))
        random.Random(key).shuffle(order)
        orders.append(order)
    assert orders == [[1, 0], [2, 1, 0]]
    assert got == [
        Problem("mc/q1", "Pick the prime.\n\n(A) 7\n(B) 4", "A", "mc"),
        Problem("mc/1", "Pick the even one.\n\n(A) 9\n(B) 3\n(C) 8", "C", "mc"),
    ]


def test_choice_seed_changes_the_file_shuffle_but_not_the_question(tmp_path):
    rows = [{"prompt": f"Q{i}", "choices": GPQA_LIKE, "answer": "right", "uid": i} for i in range(20)]
    path = _jsonl(tmp_path, rows)
    a = load_problem_file(path, "mc")
    b = load_problem_file(path, "mc", choice_seed=1)
    assert a == load_problem_file(path, "mc", choice_seed=42)
    assert sum(x.problem != y.problem for x, y in zip(a, b, strict=True)) > 10
    for p in a + b:
        assert _options(p.problem)[p.answer] == "right"


def test_problem_is_an_alias_of_prompt(tmp_path):
    rows = [{"problem": "1+1?", "answer": 2}, {"prompt": "2+2?", "problem": "2+2?", "answer": "4"}]
    assert load_problem_file(_jsonl(tmp_path, rows), "set") == [
        Problem("set/0", "1+1?", "2", "set"),
        Problem("set/1", "2+2?", "4", "set"),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"problem": "a", "answer": "1"}, {"prompt": "b", "problem": "c", "answer": "1"}],
            r"mc\.jsonl:2: fields 'prompt' and 'problem' differ",
        ),
        ([{"problem": " ", "answer": "1"}], r"mc\.jsonl:1: field 'problem' must be non-empty text"),
        ([{"answer": "1", "Question": "q"}], r"missing field 'prompt' \(or 'problem'\).*tools/prepare_data\.py"),
        ([{"problem": "a", "answer": "E", "choices": ["x", "y"]}], r"mc\.jsonl:1: field 'answer' 'E' is neither"),
        ([{"problem": "a", "answer": "x", "choices": ["x"]}], r"mc\.jsonl:1: field 'choices' must be a list"),
        ([{"problem": "a", "answer": "x", "choices": "xy"}], r"mc\.jsonl:1: field 'choices' must be a list"),
    ],
)
def test_alias_and_choice_errors_name_the_line(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_problem_file(_jsonl(tmp_path, rows), "mc")
