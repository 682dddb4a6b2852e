"""Multiple-choice problems: options shuffled per problem, rendered as (A), (B), ..., graded by the answer letter.

The study evaluates GPQA-Diamond this way: each question's options are shuffled with seed 42 and the model
answers with the letter in \\boxed{}. Each problem has its own RNG, seeded by (seed, uid), so a problem's order
does not depend on which other problems are in the file or in what order.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import Any

LETTERS = string.ascii_uppercase
MIN_CHOICES = 2
MAX_CHOICES = len(LETTERS)
DEFAULT_CHOICE_SEED = 42
"""The study's shuffle seed."""


def check_choices(value: Any) -> list[str]:
    """`value` as a list of stripped option texts; ValueError unless it is 2..26 distinct non-empty strings."""
    if not isinstance(value, list | tuple) or not MIN_CHOICES <= len(value) <= MAX_CHOICES:
        raise ValueError(f"field 'choices' must be a list of {MIN_CHOICES} to {MAX_CHOICES} texts, got {value!r:.80}")
    choices = []
    for i, choice in enumerate(value):
        if not isinstance(choice, str) or not choice.strip():
            raise ValueError(f"field 'choices': option {LETTERS[i]} must be non-empty text, got {choice!r:.60}")
        choices.append(choice.strip())
    for i, choice in enumerate(choices):
        if choice in choices[:i]:
            first = LETTERS[choices.index(choice)]
            raise ValueError(f"field 'choices': options {first} and {LETTERS[i]} are the same text {choice!r:.60}")
    return choices


def answer_index(choices: Sequence[str], answer: str) -> int:
    """Position in `choices` of the gold `answer`: an option's text (exact after strip) or its letter in the given
    order. ValueError when it is neither, or when the text of one option is the letter of another."""
    choices = [c.strip() for c in choices]
    answer = answer.strip()
    by_text = choices.index(answer) if answer in choices else None
    by_letter = LETTERS.index(answer) if len(answer) == 1 and answer in LETTERS[: len(choices)] else None
    if by_text is not None and by_letter is not None and by_text != by_letter:
        raise ValueError(
            f"field 'answer' {answer!r} is ambiguous: the text of option {LETTERS[by_text]} and the letter of"
            f" option {answer}; give the option's text or letter unambiguously"
        )
    if by_text is None and by_letter is None:
        letters = f"A-{LETTERS[len(choices) - 1]}"
        raise ValueError(
            f"field 'answer' {answer!r:.60} is neither the text of one of the {len(choices)} choices nor a letter"
            f" {letters}"
        )
    return by_text if by_text is not None else by_letter


def shuffle_choices(
    question: str, choices: Sequence[str], answer: str, *, seed: int = DEFAULT_CHOICE_SEED, uid: str
) -> tuple[str, str]:
    """(problem text, gold letter) for a multiple-choice problem.

    The options are shuffled by `random.Random(f"{seed}:{uid}")` (string seeds are hashed with SHA-512, so the
    order is the same in every process and Python run) and appended to the question as `(A) ...` lines;
    the letter names where the correct option ended up. `answer` is as `answer_index` takes it.
    """
    choices = check_choices(choices)
    correct = answer_index(choices, answer)
    order = list(range(len(choices)))
    random.Random(f"{seed}:{uid}").shuffle(order)
    options = "\n".join(f"({LETTERS[pos]}) {choices[i]}" for pos, i in enumerate(order))
    return f"{question.strip()}\n\n{options}", LETTERS[order.index(correct)]
