"""ends_in_loop: a tail that repeats one block (truncated mid-block too) is a loop; EOS after it, short runs and
repeats earlier in the response are not."""

from __future__ import annotations

import random

import pytest

from lcot_mega.reward.repetition import ends_in_loop

EOS = 0


def prose(n: int, seed: int = 0) -> list[int]:
    """n tokens with no repeated block (random ids from a large vocabulary)."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 50_000) for _ in range(n)]


def test_hand_worked_block_repeated_at_the_end():
    block = [11, 12, 13, 14, 15, 16, 17, 18]  # p = 8: span max(4 * 8, 32) = 32 tokens = 4 blocks
    assert ends_in_loop(prose(50) + block * 4)
    assert not ends_in_loop(prose(50) + block * 3 + block[:7])  # 31 periodic tokens: one short
    assert ends_in_loop(prose(50) + block * 3 + block[:7], min_tokens=31, min_repeats=3)


def test_truncated_in_the_middle_of_a_block_counts():
    block = list(range(100, 120))  # p = 20: span 80
    looped = prose(300) + block * 10
    for cut in range(1, 20):  # the length limit fell inside the 11th block
        assert ends_in_loop(looped + block[:cut])


def test_eos_after_the_loop_means_it_got_out():
    block = list(range(100, 110))
    assert ends_in_loop(prose(100) + block * 8)
    assert not ends_in_loop(prose(100) + block * 8 + [EOS])


def test_repetition_before_the_end_is_not_a_loop_at_the_end():
    block = list(range(100, 110))
    assert not ends_in_loop(prose(20) + block * 20 + prose(40, seed=1))


def test_short_runs_do_not_count():
    digits = [5] * 31  # a run of one token shorter than min_tokens
    assert not ends_in_loop(prose(100) + digits)
    assert ends_in_loop(prose(100) + digits + [5])
    assert not ends_in_loop([5] * 10)  # a response shorter than min_tokens


def test_period_longer_than_max_period_is_not_seen():
    block = prose(40, seed=2)
    assert ends_in_loop(prose(10) + block * 4, max_period=40)
    assert not ends_in_loop(prose(10) + block * 4, max_period=39)
    assert not ends_in_loop(prose(10) + block * 3, max_period=40)  # 3 repeats of 4 needed


def test_plain_prose_is_not_a_loop():
    assert not ends_in_loop(prose(5000))
    assert not ends_in_loop([])


@pytest.mark.parametrize("kw", [{"max_period": 0}, {"min_repeats": 1}, {"min_tokens": 0}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError, match="need max_period"):
        ends_in_loop([1, 2, 3], **kw)
