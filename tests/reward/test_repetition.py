import pytest

from lcot_mega.reward import repetition_penalties, repetition_penalty


def test_hand_worked_bigrams():
    # bigrams: (a b) (b a) (a b) (b a) (a b): 5 total, 2 unique -> (1 - 2/5) * -2 = -1.2
    assert repetition_penalty("a b a b a b", ngram=2, max_penalty=-2.0) == pytest.approx(-1.2)


def test_lower_cased_whitespace_words():
    # "A  b\na B" -> a b a b: bigrams (a b) (b a) (a b): 3 total, 2 unique -> (1/3) * -3 = -1
    assert repetition_penalty("A  b\na B", ngram=2, max_penalty=-3.0) == pytest.approx(-1.0)
    assert repetition_penalty("a, b a b", ngram=2) == 0.0  # "a," is another word than "a"


def test_no_repeats_gives_plain_zero():
    penalty = repetition_penalty("one two three four", ngram=2)
    assert penalty == 0.0
    assert str(penalty) == "0.0"  # not -0.0


def test_fewer_words_than_ngram_gives_zero():
    assert repetition_penalty("a a a", ngram=4) == 0.0
    assert repetition_penalty("", ngram=1) == 0.0
    assert repetition_penalty("a a a a", ngram=4) == 0.0  # exactly one n-gram


def test_unigram_all_same_word():
    # 10 unigrams, 1 unique -> (1 - 1/10) * -2 = -1.8
    assert repetition_penalty("x " * 10, ngram=1) == pytest.approx(-1.8)


def test_default_ngram_is_40_words():
    loop = "we try again " * 100  # 300 words, period 3: 261 40-grams, 3 unique
    assert repetition_penalty(loop) == pytest.approx((1 - 3 / 261) * -2.0)


def test_bad_ngram_rejected():
    with pytest.raises(ValueError, match="ngram"):
        repetition_penalty("a b", ngram=0)


def test_only_incorrect_responses_are_penalized():
    texts = ["a b a b a b", "a b a b a b", "short"]
    assert repetition_penalties(texts, [True, False, False], ngram=2) == pytest.approx([0.0, -1.2, 0.0])


def test_penalties_length_mismatch():
    with pytest.raises(ValueError, match="2 texts and 1"):
        repetition_penalties(["a", "b"], [True])
