"""GuardLog: one appended, flushed line per flagged step or driver event; ok steps write nothing."""

from __future__ import annotations

import math

from lcot_mega.guards import GUARD_LOG_FILE, Action, Breach, GuardLog, Verdict

T0 = 1_764_043_200.0  # 2025-11-25T04:00:00Z


def spike(step: int) -> Verdict:
    return Verdict(step, (Breach("grad_norm", "actor/grad_norm", 53.1, "> 10 x median 4.2", Action.SKIP),))


def test_lines_name_each_breach_with_value_and_bound(tmp_path):
    with GuardLog(tmp_path, clock=lambda: T0) as log:
        log.write(1, Verdict(1))  # ok: nothing
        log.write(2, spike(2))
        two = (
            Breach("nonfinite", "actor/loss", math.nan, "not finite", Action.SKIP),
            Breach("clipfrac", "actor/clipfrac", 0.61, "> 0.5", Action.WARN),
        )
        log.write(3, Verdict(3, two))
        log.event(3, "rolled back to step 2,\nlr x0.5")
    assert (tmp_path / GUARD_LOG_FILE).read_text().splitlines() == [
        "2025-11-25T04:00:00Z step 2 skip: grad_norm actor/grad_norm=53.1 > 10 x median 4.2 [skip]",
        "2025-11-25T04:00:00Z step 3 skip: nonfinite actor/loss=nan not finite [skip]; "
        "clipfrac actor/clipfrac=0.61 > 0.5 [warn]",
        "2025-11-25T04:00:00Z step 3 event: rolled back to step 2, lr x0.5",
    ]


def test_each_line_is_on_disk_before_close(tmp_path):
    log = GuardLog(tmp_path, clock=lambda: T0)
    log.write(7, spike(7))
    assert "step 7 skip" in (tmp_path / GUARD_LOG_FILE).read_text()
    log.close()
    log.close()  # idempotent


def test_resume_appends_to_the_existing_log(tmp_path):
    with GuardLog(tmp_path, clock=lambda: T0) as log:
        log.write(4, spike(4))
    with GuardLog(tmp_path, clock=lambda: T0 + 60) as log:
        log.event(5, "halted: entropy collapse")
    lines = (tmp_path / GUARD_LOG_FILE).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "step 4 skip: grad_norm actor/grad_norm=53.1 > 10 x median 4.2 [skip]",
        "step 5 event: halted: entropy collapse",
    ]
    assert lines[1].startswith("2025-11-25T04:01:00Z")
