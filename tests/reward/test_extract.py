import pytest

from lcot_mega.reward import extract_answer
from lcot_mega.reward.extract import FALLBACKS

BOTH = ("answer_is", "last_number")


def test_last_box_wins_over_earlier_boxes():
    assert extract_answer(r"try \boxed{1}, no: \boxed{2}. Final: \boxed{3}") == "3"


def test_nested_braces_kept_whole():
    assert extract_answer(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"


def test_fbox_and_bare_boxed_token():
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"$\boxed 5$ is it") == "5"


def test_box_content_is_stripped_and_nested_box_gives_inner():
    assert extract_answer(r"\boxed{ 42 }") == "42"
    assert extract_answer(r"\boxed{\boxed{8}}") == "8"


def test_unbalanced_last_box_is_skipped():
    assert extract_answer(r"\boxed{2} but then \boxed{\frac{3}{4}") == "2"
    assert extract_answer(r"\boxed{\frac{3}{4}") is None


def test_escaped_braces_do_not_count():
    # `\}` is a literal brace, so the box closes at the bare `}` after it.
    assert extract_answer(r"\boxed{\left\{ x \right.} tail}") == r"\left\{ x \right."


def test_macro_that_only_starts_with_boxed_is_not_a_box():
    assert extract_answer(r"\boxedsomething{3}") is None


def test_think_close_required_ignores_box_inside_thinking():
    text = r"<think>maybe \boxed{1}</think> The answer is \boxed{2}."
    assert extract_answer(text, require_think_close=True) == "2"
    assert extract_answer(r"<think>\boxed{1}</think> no box here", require_think_close=True) is None
    assert extract_answer(r"<think>\boxed{1} never closed", require_think_close=True) is None


def test_think_close_uses_text_after_last_close():
    text = r"</think> \boxed{1} </think> \boxed{2}"
    assert extract_answer(text, require_think_close=True) == "2"
    assert extract_answer(r"</think> \boxed{1} </think> none", require_think_close=True) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is 42.", "42"),
        ("**Answer:** $\\frac{1}{2}$.", r"\frac{1}{2}"),
        ("The final answer is: 3.5. Let me double-check.", "3.5"),
        ("answer is 1. Wait, the answer is 7", "7"),
        ("Answer: x = 5\nsome trailing line", "x = 5"),
    ],
)
def test_answer_is_fallback(text, expected):
    assert extract_answer(text, fallbacks=("answer_is",)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("we get -3 apples", "-3"),
        ("1,234 items then 0.5 of them", "0.5"),
        ("ratio 3/4", "3/4"),
        ("costs 1,234", "1234"),
        ("a 12 b 7.", "7"),
    ],
)
def test_last_number_fallback(text, expected):
    assert extract_answer(text, fallbacks=("last_number",)) == expected


def test_fallbacks_tried_in_order_and_only_without_box():
    text = "the answer is 12, not 13"
    assert extract_answer(text, fallbacks=("answer_is", "last_number")) == "12, not 13"
    assert extract_answer(text, fallbacks=("last_number", "answer_is")) == "13"
    assert extract_answer(r"\boxed{1} the answer is 2, or 3", fallbacks=BOTH) == "1"
    assert extract_answer("answer is 5", fallbacks=()) is None


def test_nothing_found_gives_none():
    assert extract_answer("no digits, no box", fallbacks=BOTH) is None
    assert extract_answer("", fallbacks=BOTH) is None


def test_unknown_fallback_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"answer_is.*last_number"):
        extract_answer("x", fallbacks=("answer-is",))
    with pytest.raises(ValueError, match="not the string"):
        extract_answer("x", fallbacks="last_number")
    assert set(FALLBACKS) == {"answer_is", "last_number"}


def test_thousands_of_nested_braces_without_recursion():
    depth = 3000
    inner = "{" * depth + "x" + "}" * depth
    assert extract_answer(r"\boxed{" + inner + "}") == inner
    assert extract_answer(r"\boxed{" * depth + "y" + "}" * depth) == "y"  # innermost box is the last one
    assert extract_answer(r"\boxed{" + "{" * depth + "x") is None  # never closed


def test_100kb_inputs():
    filler = "word " * 20_000
    assert extract_answer(filler + r"\boxed{9}" + filler, fallbacks=BOTH) == "9"
    assert extract_answer("{" * 100_000 + r"\boxed{1", fallbacks=BOTH) == "1"  # box unbalanced: last number
    assert extract_answer("answer is " + "." * 100_000, fallbacks=("answer_is",)) is None
    assert extract_answer("1," * 50_000, fallbacks=("last_number",)) == "1"
    assert extract_answer(r"\boxed " * 20_000 + r"\boxed{2}") == "2"


def test_binary_garbage_and_nul_bytes():
    garbage = "".join(chr(c) for c in range(256)) * 200 + "\ud800\x00"
    assert extract_answer(garbage + r"\boxed{\x00 7}" + garbage) == r"\x00 7"
    assert extract_answer("\x00\x01\\boxed{\x00}\xff") == "\x00"
    assert extract_answer(garbage, fallbacks=("answer_is",)) is None
