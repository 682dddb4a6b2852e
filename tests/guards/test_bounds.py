"""UpdateBounds: the actor's apply/reject decision between backward and the optimizer step."""

from __future__ import annotations

import math
import pickle

import pytest

from lcot_mega.guards import UpdateBounds

NAN, INF = math.nan, math.inf


def test_within_bounds_applies_the_update():
    b = UpdateBounds({"actor/grad_norm": (None, 30.0), "actor/entropy": (0.1, 5.0)})
    assert b.rejects({"actor/grad_norm": 30.0, "actor/entropy": 0.1}) == []  # bounds are inclusive


def test_each_broken_bound_is_one_reason():
    b = UpdateBounds({"actor/grad_norm": (None, 30.0), "actor/entropy": (0.1, 5.0)})
    assert b.rejects({"actor/grad_norm": 31.0, "actor/entropy": 0.05}) == [
        "actor/grad_norm 31 > 30",
        "actor/entropy 0.05 < 0.1",
    ]


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_bounded_key_rejects_even_without_reject_nonfinite(value):
    # NaN compares false with both bounds: without the explicit check it would pass
    b = UpdateBounds({"actor/grad_norm": (None, 30.0)}, reject_nonfinite=False)
    assert b.rejects({"actor/grad_norm": value}) == [f"actor/grad_norm {value} is not finite"]


def test_unbounded_key_with_both_sides_none_still_rejects_nan():
    b = UpdateBounds({"actor/grad_norm": (None, None)})
    assert b.rejects({"actor/grad_norm": 1e9}) == []
    assert len(b.rejects({"actor/grad_norm": NAN})) == 1


def test_reject_nonfinite_looks_at_every_metric():
    metrics = {"actor/loss": NAN, "actor/grad_norm": 1.0, "actor/pg_loss": -INF}
    assert UpdateBounds({}, reject_nonfinite=False).rejects(metrics) == []
    assert UpdateBounds({}, reject_nonfinite=True).rejects(metrics) == [
        "actor/loss nan is not finite",
        "actor/pg_loss -inf is not finite",
    ]


def test_nan_of_a_bounded_key_is_one_reason_with_reject_nonfinite():
    b = UpdateBounds({"actor/grad_norm": (None, 30.0)}, reject_nonfinite=True)
    assert b.rejects({"actor/grad_norm": NAN}) == ["actor/grad_norm nan is not finite"]


def test_absent_keys_and_labels_are_ignored():
    b = UpdateBounds({"actor/grad_norm": (None, 30.0)}, reject_nonfinite=True)
    assert b.rejects({}) == []
    assert b.rejects({"guard/action": "ok", "actor/loss": 1}) == []


def test_pickle_round_trip_decides_the_same():
    b = UpdateBounds({"actor/grad_norm": (None, 30.0), "actor/entropy": (0.1, None)}, reject_nonfinite=True)
    back = pickle.loads(pickle.dumps(b))
    assert back == b
    for metrics in ({"actor/grad_norm": 31.0}, {"actor/entropy": 0.01}, {"actor/loss": NAN}, {"actor/grad_norm": 3}):
        assert back.rejects(metrics) == b.rejects(metrics)
    assert back.rejects({"actor/grad_norm": 31.0}) != []


def test_frozen_and_validated():
    b = UpdateBounds({})
    with pytest.raises(AttributeError):
        b.reject_nonfinite = True  # type: ignore[misc]
    with pytest.raises(ValueError, match="lo 2 > hi 1"):
        UpdateBounds({"a/b": (2, 1)})


def test_zero_dim_tensor_metrics_are_numbers():
    torch = pytest.importorskip("torch")
    b = UpdateBounds({"actor/grad_norm": (None, 30.0)}, reject_nonfinite=True)
    assert b.rejects({"actor/grad_norm": torch.tensor(31.0)}) == ["actor/grad_norm 31 > 30"]
    assert b.rejects({"actor/loss": torch.tensor(float("nan"))}) == ["actor/loss nan is not finite"]
