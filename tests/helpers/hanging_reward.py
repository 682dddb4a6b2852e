"""A reward function that hangs on some answers, for the loop-level grader-timeout drill
(tests/trainer/test_train_faults.py).

Importable by the spawned grader workers of a `lcot-mega train` subprocess run with tests/ on PYTHONPATH.
"""

from __future__ import annotations

import time


def hang_on_even_length(response: str, answer: str, **_: object) -> float:
    """Hangs (far past any timeout) on responses of even length, else 1.0 when the answer appears in it."""
    if len(response) % 2 == 0:
        time.sleep(3600)
    return float(answer in response)
