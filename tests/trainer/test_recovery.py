"""Recovery bookkeeping (good marks after `good_after` passing steps, rollback effects) and StopSignals."""

from __future__ import annotations

import os
import signal

import pytest

from lcot_mega.config import GuardsConfig
from lcot_mega.trainer.recovery import Recovery, StopSignals


def test_a_checkpoint_becomes_good_only_after_good_after_passing_steps():
    rec = Recovery(GuardsConfig(good_after=2))
    assert rec.saved(10) == []
    assert rec.passed() == []  # one passing step seen
    assert rec.saved(11) == []
    assert rec.passed() == [10]  # 10 has seen two, 11 one
    assert rec.passed() == [11]
    assert rec.pending_good == {}


def test_good_after_zero_marks_good_when_saved():
    rec = Recovery(GuardsConfig(good_after=0))
    assert rec.saved(5) == [5]


def test_rollback_scales_lr_reseeds_and_forgets_unconfirmed_checkpoints():
    rec = Recovery(GuardsConfig(rollback_lr_factor=0.5, max_rollbacks=2))
    rec.saved(20)
    rec.rolled_back()
    rec.rolled_back()
    assert (rec.rollbacks, rec.lr_scale, rec.reseed, rec.pending_good) == (2, 0.25, 2, {})
    assert not rec.can_roll_back()
    no_reseed = Recovery(GuardsConfig(rollback_reseed=False))
    no_reseed.rolled_back()
    assert no_reseed.reseed == 0


def test_state_dict_round_trips_through_json_keys():
    rec = Recovery(GuardsConfig(good_after=3))
    rec.saved(7)
    rec.passed()
    rec.rolled_back()
    rec.saved(9)
    back = Recovery(GuardsConfig(good_after=3))
    back.load_state_dict(rec.state_dict())
    assert back.state_dict() == rec.state_dict()
    assert back.pending_good == {9: 0}


def test_sigterm_sets_the_flag_and_a_second_sigint_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # more signals while stopping change nothing
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
