"""process_logits / sample worked by hand on 4-token vocabularies, and SamplingParams (the request contract)."""

from __future__ import annotations

import math

import pytest
import torch

from lcot_mega.rollout.protocol import SamplingParams
from lcot_mega.rollout.sampling import process_logits, sample

NEG = float("-inf")
P = torch.tensor([0.5, 0.25, 0.15, 0.1])  # probabilities of the hand-worked vocabulary
LOGITS = (P.log() + 3.0).unsqueeze(0)  # [1, 4]; the shift shows that only logit differences matter


def probs(**kw) -> torch.Tensor:
    return process_logits(LOGITS, **kw).exp()[0]


def close(a: torch.Tensor, b: list[float]) -> None:
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), atol=1e-6, rtol=0)


def test_no_truncation_is_the_softmax():
    close(probs(), [0.5, 0.25, 0.15, 0.1])


def test_temperature_two_takes_square_roots_of_the_probabilities():
    root = P.sqrt()
    close(probs(temperature=2.0), (root / root.sum()).tolist())


def test_temperature_half_squares_the_probabilities():
    sq = P**2
    close(probs(temperature=0.5), (sq / sq.sum()).tolist())


def test_greedy_is_one_hot_with_logprob_zero_and_first_index_on_ties():
    out = process_logits(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), temperature=0.0)
    assert out.tolist() == [[NEG, 0.0, NEG, NEG]]


def test_top_k_renormalizes_over_the_kept_tokens():
    close(probs(top_k=2), [2 / 3, 1 / 3, 0, 0])
    close(probs(top_k=4), [0.5, 0.25, 0.15, 0.1])  # k = V is no truncation
    close(probs(top_k=1), [1, 0, 0, 0])


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    # mass before each sorted token: 0, 0.5, 0.75, 0.9
    close(probs(top_p=0.49), [1, 0, 0, 0])  # {0} already holds 0.5
    close(probs(top_p=0.51), [2 / 3, 1 / 3, 0, 0])
    close(probs(top_p=0.6), [2 / 3, 1 / 3, 0, 0])
    close(probs(top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])
    close(probs(top_p=0.95), [0.5, 0.25, 0.15, 0.1])
    close(probs(top_p=0.01), [1, 0, 0, 0])  # always at least one token


def test_top_p_acts_on_the_distribution_left_by_top_k():
    # After top-2: (2/3, 1/3); 2/3 >= 0.6 so top-p keeps one token. (On the raw distribution, the mass before
    # token 1 is 0.5 < 0.6 and both would stay: that is SGLang's torch fallback, not ours.)
    close(probs(top_k=2, top_p=0.6), [1, 0, 0, 0])
    close(probs(top_k=3, top_p=0.7), [2 / 3, 1 / 3, 0, 0])


def test_min_p_keeps_tokens_within_a_factor_of_the_top_one():
    close(probs(min_p=0.29), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])  # threshold 0.145
    close(probs(min_p=0.31), [0.5 / 0.75, 0.25 / 0.75, 0, 0])  # threshold 0.155
    close(probs(min_p=0.4), [2 / 3, 1 / 3, 0, 0])  # threshold 0.2
    close(probs(min_p=1.0), [1, 0, 0, 0])


def test_min_p_after_top_p_and_top_k():
    close(probs(top_p=0.8, min_p=0.4), [2 / 3, 1 / 3, 0, 0])
    close(probs(top_k=3, min_p=0.29), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])
    close(probs(top_k=3, min_p=0.31), [2 / 3, 1 / 3, 0, 0])


def test_temperature_is_applied_before_truncation():
    # At T=2 the probabilities are ~(0.370, 0.262, 0.203, 0.166): top-p 0.5 now needs two tokens (one at T=1).
    root = P.sqrt() / P.sqrt().sum()
    kept = root[:2] / root[:2].sum()
    close(probs(temperature=2.0, top_p=0.5), [*kept.tolist(), 0, 0])
    close(probs(temperature=2.0, top_k=3), [*(root[:3] / root[:3].sum()).tolist(), 0])


def test_truncated_tokens_are_minus_inf_and_rows_are_independent():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0)])  # second row: the same distribution reversed
    out = process_logits(logits, top_k=2)
    assert torch.isinf(out[0, 2:]).all() and torch.isinf(out[1, :2]).all()
    torch.testing.assert_close(out[1].flip(0), out[0])


def test_top_p_on_a_large_flat_vocabulary_falls_back_to_the_full_sort():
    torch.manual_seed(0)
    logits = torch.randn(3, 4096) * 0.1  # flat: the nucleus holds most of the vocabulary
    out = process_logits(logits, top_p=0.9)
    p = logits.softmax(-1)
    sp, _ = p.sort(-1, descending=True)
    expected_kept = ((sp.cumsum(-1) - sp) < 0.9).sum(-1)
    assert torch.equal(torch.isfinite(out).sum(-1), expected_kept)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3))


def test_top_p_on_a_peaked_vocabulary_uses_a_short_prefix():
    logits = torch.full((2, 10_000), -20.0)
    logits[:, :3] = torch.tensor([5.0, 4.0, 3.0])
    out = process_logits(logits, top_p=0.9)
    p = torch.tensor([5.0, 4.0, 3.0]).softmax(-1)  # (0.665, 0.245, 0.090) up to a ~1e-10 tail
    assert torch.isfinite(out).sum(-1).tolist() == [2, 2]
    torch.testing.assert_close(out[0, :2].exp(), p[:2] / p[:2].sum())


def test_minus_inf_logits_stay_excluded():
    logits = torch.tensor([[0.0, NEG, 0.0, NEG]])
    close(process_logits(logits).exp()[0], [0.5, 0, 0.5, 0])
    close(process_logits(logits, top_p=0.4).exp()[0], [1, 0, 0, 0])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        process_logits(LOGITS, **kw)


def test_logits_must_be_2d():
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        process_logits(LOGITS[0])


# --------------------------------------------------------------------------------------------------- sample


def test_sample_inverts_the_cdf_at_given_uniforms():
    logp = process_logits(LOGITS.repeat(7, 1))  # CDF 0.5, 0.75, 0.9, 1.0
    u = torch.tensor([0.0, 0.49, 0.5, 0.74, 0.8, 0.95, 1 - 1e-12], dtype=torch.float64)
    assert sample(logp, uniforms=u).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_sample_never_draws_a_truncated_token_even_at_the_edges():
    logp = process_logits(torch.tensor([[3.0, 0.0, 2.0, 1.0]]).repeat(3, 1), top_k=2)  # tokens 0 and 2 kept
    u = torch.tensor([0.0, 0.999999999, 1.0], dtype=torch.float64)
    assert sample(logp, uniforms=u).tolist() == [0, 2, 2]


def test_sample_handles_a_vocabulary_not_a_multiple_of_the_block_and_tokens_in_late_blocks():
    logp = torch.full((2, 1000), NEG)
    logp[0, 999] = 0.0  # all the mass on the last token of a padded block
    logp[1, 300], logp[1, 700] = math.log(0.25), math.log(0.75)
    u = torch.tensor([0.3, 0.3], dtype=torch.float64)
    assert sample(logp, uniforms=u).tolist() == [999, 700]
    assert sample(logp, uniforms=torch.tensor([0.99, 0.2], dtype=torch.float64)).tolist() == [999, 300]


def test_sample_frequencies_match_the_distribution():
    logp = process_logits(LOGITS.repeat(200_000, 1), top_k=3)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logp, g), minlength=4).float() / 200_000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9, atol=5e-3, rtol=0)


def test_sample_is_reproducible_with_a_seeded_generator():
    logp = process_logits(torch.randn(16, 300, generator=torch.Generator().manual_seed(1)))
    a = sample(logp, torch.Generator().manual_seed(5))
    b = sample(logp, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="uniforms"):
        sample(process_logits(LOGITS), uniforms=torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- SamplingParams


def test_sampling_params_to_sglang_uses_sglang_keys():
    p = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20, n=4, stop=["</s>"], seed=3)
    assert p.to_sglang() == {
        "max_new_tokens": 16,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.0,
        "n": 4,
        "ignore_eos": False,
        "stop": ["</s>"],
        "sampling_seed": 3,
    }
    assert "stop" not in SamplingParams().to_sglang() and "sampling_seed" not in SamplingParams().to_sglang()


def test_sampling_params_are_frozen_and_hashable_with_lists_turned_into_tuples():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,)
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(3,)))
    with pytest.raises(AttributeError):
        p.n = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 0}, "n must"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": -3}, "seed"),
    ],
)
def test_sampling_params_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
