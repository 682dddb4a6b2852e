"""A reward for the `lcot-mega eval` tests that a test can recompute from the response text alone: correct when
the gold answer (one character) appears in the response. Importable by spawned grader workers (tests/ on the path)."""

from __future__ import annotations


def contains_answer(response: str, answer: str, **_: object) -> float:
    return float(answer in response)
