"""KL penalty estimators and entropy, against hand-worked numbers and float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcot_mega.algo.divergence import entropy_from_logits, kl_penalty

D = torch.float64


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=0, atol=tol)


# ------------------------------------------------------------------------- KL


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # logp = [-1, -2], ref = [-2, -1] -> delta = logp - ref = [1, -1]; k3 uses kl = ref - logp = [-1, 1]
        ("k1", [1.0, -1.0]),
        ("k2", [0.5, 0.5]),  # delta^2 / 2
        ("k3", [0.36787944, 0.71828183]),  # e^-1 - (-1) - 1 = e^-1; e^1 - 1 - 1 = e - 2
        ("low_var_kl", [0.36787944, 0.71828183]),
        ("abs", [1.0, 1.0]),
    ],
)
def test_kl_kinds_on_hand_numbers(kind, expected):
    _close(kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), kind), expected)


def test_k3_gradient():
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp): kl = -1 -> 1 - e^-1 = 0.63212056,
    # kl = 1 -> 1 - e = -1.71828183
    logp = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    ref = torch.tensor([-2.0, -1.0], dtype=D, requires_grad=True)
    kl_penalty(logp, ref, "k3").sum().backward()
    _close(logp.grad, [0.63212056, -1.71828183])
    assert ref.grad is None  # the reference is a constant


def test_k3_is_clamped_at_ten_with_finite_zero_gradient():
    # kl = ref - logp = -50 -> e^-50 + 49 = 49 -> 10; kl = +50 -> e^50 - 51 -> 10; both flat, so grad 0
    logp = torch.tensor([0.0, -50.0], requires_grad=True)
    out = kl_penalty(logp, torch.tensor([-50.0, 0.0]), "k3")
    out.sum().backward()
    _close(out, [10.0, 10.0])
    _close(logp.grad, [0.0, 0.0])


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-30.0, 0.0),
    st.one_of(st.floats(-30.0, 30.0), st.floats(-1e-3, 1e-3)),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_k3_is_never_negative(logp, gap, dtype):
    out = kl_penalty(torch.tensor([logp], dtype=dtype), torch.tensor([logp + gap], dtype=dtype), "k3")
    assert torch.isfinite(out).all()
    assert out.item() >= 0.0


def test_k3_is_never_negative_near_zero_in_float32():
    # exp(kl) - kl - 1 computed literally rounds below 0 for thousands of |kl| < 1e-3 in float32
    kl = torch.linspace(-1e-3, 1e-3, 200_001)
    assert (kl_penalty(torch.zeros_like(kl), kl, "k3") >= 0).all()


def test_kl_mask_ignores_garbage_padding_and_rejects_masked_nan():
    logp = torch.tensor([[-1.0, math.nan]])
    ref = torch.tensor([[-2.0, -math.inf]])
    out = kl_penalty(logp, ref, "k1", mask=torch.tensor([[1, 0]]))
    _close(out, [[1.0, 0.0]])
    with pytest.raises(ValueError, match="logp"):
        kl_penalty(logp, ref, "k1")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(torch.zeros(1, 2), ref, "k1", mask=torch.ones(1, 2))


def test_kl_bad_arguments():
    with pytest.raises(ValueError, match="k3"):  # the message lists the known kinds
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))


# ------------------------------------------------------------------------- entropy


def test_entropy_uniform_is_log_v():
    _close(entropy_from_logits(torch.zeros(7)), 1.9459101)  # ln 7
    _close(entropy_from_logits(torch.full((4,), 1e4)), 1.3862944)  # ln 4, offset must not matter


def test_entropy_one_hot_large_logits_is_zero():
    _close(entropy_from_logits(torch.tensor([1e4, 0.0, 0.0, 0.0])), 0.0)


def test_entropy_two_way_at_magnitude_1e4():
    # logits differ by 1: p = sigmoid(1) = 0.7310586, q = 0.2689414
    # H = 0.7310586 * 0.3132617 + 0.2689414 * 1.3132617 = 0.2290127 + 0.3531905 = 0.5822032
    _close(entropy_from_logits(torch.tensor([1e4, 1e4 - 1.0])), 0.5822032)
    _close(entropy_from_logits(torch.tensor([-1e4, -1e4 - 1.0])), 0.5822032)


def test_entropy_temperature_divides_logits():
    # [2, 0] / 2 = [1, 0]: the same two-way distribution as above
    _close(entropy_from_logits(torch.tensor([2.0, 0.0]), temperature=2.0), 0.5822032)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(torch.zeros(3), temperature=0.0)


def test_entropy_with_masked_vocabulary():
    # two live entries of equal logit: ln 2 = 0.6931472; -inf entries have p = 0 and must not give NaN
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf], [5.0, -math.inf, 5.0, -math.inf]], requires_grad=True)
    h = entropy_from_logits(logits)
    h.sum().backward()
    _close(h, [0.6931472, 0.6931472])
    assert torch.isfinite(logits.grad).all()


def test_entropy_matches_float64_reference_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g) * 4.0
    ref = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
    h = entropy_from_logits(logits)
    assert h.shape == (2, 5)
    _close(h, ref, 1e-5)


def test_entropy_gradient_matches_finite_differences():
    logits = torch.randn(3, 6, dtype=D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(entropy_from_logits, (logits,))
