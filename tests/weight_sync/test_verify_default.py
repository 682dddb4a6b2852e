"""`rollout.verify_sync` (on by default): the probe and the tolerance each configuration gets."""

from __future__ import annotations

import pytest

from lcot_mega.cluster.actor_group import sync_probe
from lcot_mega.config import ConfigError, load_config
from lcot_mega.weight_sync.push import fixed_probe_ids


def _probe(*overrides: str):
    return sync_probe(load_config(None, ["model.path=unused", *overrides]), vocab_size=49152)


def test_on_by_default_with_an_exact_tolerance_where_everything_is_float32():
    probe = _probe("actor.precision=fp32")
    assert probe is not None and probe.tolerance == 1e-3
    assert probe.probe_ids == fixed_probe_ids(49152) and len(set(probe.probe_ids)) == 16
    assert all(0 <= t < 49152 for t in probe.probe_ids) and fixed_probe_ids(100) != fixed_probe_ids(49152)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.dtype=bfloat16"],
        ["actor.precision=bf16_autocast"],
        ["actor.precision=bf16"],
        ["rollout.weight_dtype=fp8"],
    ],
)
def test_rounding_on_either_side_gets_the_loose_tolerance(overrides):
    assert _probe(*overrides).tolerance == 1.0


def test_an_explicit_tolerance_wins_and_off_means_no_check():
    assert _probe("model.dtype=bfloat16", "rollout.verify_tolerance=0.2").tolerance == 0.2
    assert _probe("rollout.verify_sync=false") is None
    with pytest.raises(ConfigError, match="verify_tolerance"):
        _probe("rollout.verify_tolerance=0")
