"""tools/sync_model.py: the labelled sync-time model, checked against numbers worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.scripts import load_script

sync_model = load_script("tools/sync_model.py")


def _bench_json(tmp_path: Path) -> Path:
    rows = [
        {"transport": "memcpy", "gb_per_s": 10.0, "ratio": 1.0},
        {"transport": "in_process", "ratio": 0.5},
        {"transport": "tensor", "ratio": 0.25},
        {"transport": "broadcast", "ratio": 0.2},
        {"transport": "broadcast_delta_1e-06", "seconds": 0.5, "full_gb": 0.25, "sent_frac": 0.1},
    ]
    path = tmp_path / "sync.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    return path


def test_factors_are_memcpy_multiples_and_the_rows_follow_the_formulas(tmp_path):
    factors = sync_model.measured_factors(_bench_json(tmp_path))
    # 1 / ratio; the delta sync: 0.5 s against a memcpy of 0.25 GB at 10 GB/s (0.025 s) = 20 memcpys
    assert factors == {"in_process": 2.0, "tensor": 4.0, "broadcast": 5.0, "delta_sent_frac": 0.1, "delta_encode": 20.0}
    rows = dict(sync_model.model_rows(factors))
    b7 = 7.6e9 * 2  # bf16 bytes of the 7B model
    assert rows["colocated, shard-to-shard (TP=8, in process)"][0] == pytest.approx(2.0 * b7 / 8 / 1.5e12)
    assert rows["disaggregated, one broadcast (BroadcastSync, 1 NIC)"][2] == pytest.approx(235e9 * 2 / 45e9)
    assert rows["disaggregated, shard-to-shard (8 NICs; not built)"][1] == pytest.approx(30.5e9 * 2 / 8 / 45e9)
    delta = rows["one broadcast + delta (lr 1e-6)"][0]
    assert delta == pytest.approx(0.1 * b7 / 45e9 + 20.0 * b7 / 8 / 1.5e12)
    text = sync_model.format_model(factors, "x.json")
    assert text.startswith("MODEL, not a measurement") and text.count("\n| ") == 6  # header + five routes


def test_a_run_without_delta_rows_models_the_full_routes_only(tmp_path):
    path = _bench_json(tmp_path)
    data = json.loads(path.read_text())
    data["rows"] = [r for r in data["rows"] if "delta" not in r["transport"]]
    path.write_text(json.dumps(data))
    factors = sync_model.measured_factors(path)
    assert "delta_sent_frac" not in factors and len(sync_model.model_rows(factors)) == 4
