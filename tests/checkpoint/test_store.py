"""The checkpoint store: atomic commit, `latest` pointer, retention, fallback past corruption, crash safety."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lcot_mega.checkpoint import store as store_mod
from lcot_mega.checkpoint.store import (
    GOOD_MARK,
    LATEST,
    MANIFEST,
    CheckpointStore,
    CheckpointWriteError,
    CorruptCheckpointError,
    verify_checkpoint_dir,
)


def _commit(store: CheckpointStore, step: int, payload: bytes = b"weights", big: int = 0) -> Path:
    with store.writing(step) as d:
        (d / "model").mkdir()
        (d / "model" / "shard.bin").write_bytes(payload * 100)
        (d / "meta.json").write_text(json.dumps({"step": step}))
        if big:
            (d / "big.bin").write_bytes(b"\0" * big)
    return store.path_for(step)


def _tmp_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


def test_commit_renames_into_place_with_manifest_and_moves_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3, checksum_max_bytes=1024)
    path = _commit(store, 123, big=4096)
    assert path.name == "step_000000123"
    assert (tmp_path / LATEST).read_text().strip() == "step_000000123"
    assert _tmp_entries(tmp_path) == []
    manifest = verify_checkpoint_dir(path)
    assert manifest["step"] == 123
    files = manifest["files"]
    assert set(files) == {"model/shard.bin", "meta.json", "big.bin"}
    assert files["big.bin"] == {"size": 4096}  # over checksum_max_bytes: size only
    assert "crc32" in files["meta.json"]
    assert store.latest_valid().step == 123

    _commit(store, 200)
    assert store.head() == 200
    assert store.latest_valid().path == store.path_for(200)


def test_retention_keeps_last_k_and_the_newest_good_one(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    _commit(store, 1)
    _commit(store, 2)
    store.mark_good(2)
    assert store.steps() == [1, 2]  # nothing deleted before a newer one exists
    for step in (3, 4, 5):
        _commit(store, step)
    assert store.steps() == [2, 4, 5]  # last 2, plus the good one
    assert store.latest_valid().step == 5
    assert store.last_good().step == 2


def test_a_healthy_run_whose_every_checkpoint_turns_good_stays_within_retention(tmp_path):
    """Each checkpoint is marked good a step after it is written (guards.good_after = 1): keeping every good one
    kept every checkpoint of a healthy run (68 GB of study checkpoints filled a disk, session 21)."""
    store = CheckpointStore(tmp_path, keep_last=1)
    for step in range(4, 44, 4):
        if step > 4:  # as in the driver: the checkpoint of 4 steps ago was confirmed good before this one is saved
            store.mark_good(step - 4)
        _commit(store, step)
    assert store.steps() == [36, 40]  # the newest, and the newest good one (the rollback target); not all ten
    assert store.last_good().step == 36
    wider = CheckpointStore(tmp_path / "wider", keep_last=1, keep_good=2)
    for step in (1, 2, 3, 4, 5):
        _commit(wider, step)
        wider.mark_good(step)
    assert wider.steps() == [3, 4, 5]  # 5, the newest; 3 and 4, the two newest good ones when 5 was committed
    with pytest.raises(ValueError, match=r"trainer\.keep_good"):
        CheckpointStore(tmp_path, keep_good=0)


def test_rollback_to_last_good_and_abandoned_timeline_is_pruned(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _commit(store, step)
        if step == 20:
            store.mark_good(20)
    back = store.rollback()
    assert (back.step, back.good) == (20, True)
    assert store.latest_valid().step == 20  # step 30 lies beyond the head: an abandoned timeline
    _commit(store, 25)
    assert store.steps() == [20, 25]
    _commit(store, 25, payload=b"again")  # the same step twice replaces it
    assert (store.path_for(25) / "model" / "shard.bin").read_bytes().startswith(b"again")
    assert _tmp_entries(tmp_path) == []


def test_rollback_then_drop_newer_leaves_no_abandoned_checkpoint_for_a_later_fallback(tmp_path):
    """Without drop_newer_than, step 30 (abandoned at the rollback to 20) would survive the commit of step 40
    (it is older than the new head) and a corrupt step 40 would fall back onto it."""
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (10, 20, 30):
        _commit(store, step)
    store.mark_good(20)
    store.rollback(20)
    assert store.drop_newer_than(20) == [30]
    _commit(store, 40)
    assert store.steps() == [10, 20, 40]
    (store.path_for(40) / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="falling back"):
        assert store.latest_valid().step == 20


@pytest.mark.parametrize("damage", ["truncate", "no_marker", "flip_byte", "bad_manifest"])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep_last=3)
    _commit(store, 1)
    newest = _commit(store, 2)
    shard = newest / "meta.json"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-3])
    elif damage == "no_marker":
        (newest / MANIFEST).unlink()
    elif damage == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[0] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (newest / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="step_000000002"):
        verify_checkpoint_dir(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_000000002"):
        found = store.latest_valid()
    assert found.step == 1


def test_missing_or_garbled_pointer_scans_directories(tmp_path):
    store = CheckpointStore(tmp_path)
    _commit(store, 1)
    _commit(store, 2)
    (tmp_path / LATEST).unlink()
    assert store.latest_valid().step == 2
    (tmp_path / LATEST).write_text("garbage")
    with pytest.warns(UserWarning, match="does not name a checkpoint"):
        assert store.latest_valid().step == 2


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["payload", "fsync", "manifest"])
def test_disk_full_gives_clear_error_and_keeps_previous(tmp_path, monkeypatch, where):
    store = CheckpointStore(tmp_path / "ckpts")
    previous = _commit(store, 1)
    if where == "fsync":
        monkeypatch.setattr(store_mod.os, "fsync", _enospc)
    elif where == "manifest":
        monkeypatch.setattr(store_mod, "build_manifest", _enospc)
    full = pytest.raises(CheckpointWriteError, match=r"no space left on device .* into .*ckpts")
    with full as info, store.writing(2) as d:
        (d / "meta.json").write_text("{}")
        if where == "payload":
            with open(d / "model.bin", "wb") as f:
                f.write(b"x" * 10)
                _enospc()
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert _tmp_entries(tmp_path / "ckpts") == []
    assert store.steps() == [1]
    assert store.head() == 1
    verify_checkpoint_dir(previous)


def test_stale_temp_dirs_are_cleaned_at_start(tmp_path):
    store = CheckpointStore(tmp_path)
    _commit(store, 1)
    (tmp_path / ".tmp-step_000000002" / "model").mkdir(parents=True)
    (tmp_path / ".tmp-step_000000002" / "model" / "x.bin").write_bytes(b"partial")
    (tmp_path / ".tmp-latest-4242").write_text("step_000000002")
    store = CheckpointStore(tmp_path)
    assert _tmp_entries(tmp_path) == []
    assert store.steps() == [1]
    assert store.latest_valid().step == 1


_SLOW_WRITER = """
import sys, time
from lcot_mega.checkpoint.store import CheckpointStore
store = CheckpointStore(sys.argv[1], keep_last=2)
with store.writing(2) as d:
    with open(d / "big.bin", "wb") as f:
        for i in range(100_000):
            f.write(b"x" * (1 << 20))
            f.flush()
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.01)
"""


def test_process_killed_mid_write_leaves_previous_checkpoint_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    _commit(store, 1)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert (tmp_path / ".tmp-step_000000002" / "big.bin").stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _tmp_entries(tmp_path) == [".tmp-step_000000002"]
    assert store.latest_valid().step == 1
    assert store.head() == 1
    restarted = CheckpointStore(tmp_path, keep_last=2)  # a new run cleans the crashed write
    assert _tmp_entries(tmp_path) == []
    assert restarted.latest_valid().step == 1


def _thread_agreement(world: int):
    """`all_ok` for `world` threads standing in for ranks: a barrier that also ANDs the flags."""
    barrier = threading.Barrier(world)
    flags: list[bool] = []
    lock = threading.Lock()

    def all_ok(ok: bool) -> bool:
        with lock:
            flags.append(ok)
        barrier.wait()
        result = all(flags)
        if barrier.wait() == 0:
            flags.clear()
        barrier.wait()
        return result

    return all_ok


@pytest.mark.parametrize("failing_rank", [None, 1])
def test_every_rank_writes_its_part_and_one_failure_aborts_all(tmp_path, failing_rank):
    all_ok = _thread_agreement(2)
    errors: dict[int, BaseException] = {}

    def rank_main(rank: int) -> None:
        store = CheckpointStore(tmp_path, is_writer=rank == 0, all_ok=all_ok, clean_stale=False)
        try:
            with store.writing(7) as d:
                (d / f"rank_{rank}.bin").write_bytes(bytes([rank]) * 64)
                if rank == failing_rank:
                    raise RuntimeError("rank 1 broke")
        except Exception as e:
            errors[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if failing_rank is None:
        assert errors == {}
        assert set(verify_checkpoint_dir(tmp_path / "step_000000007")["files"]) == {"rank_0.bin", "rank_1.bin"}
    else:
        assert str(errors[1]) == "rank 1 broke"
        assert isinstance(errors[0], CheckpointWriteError)
        assert "another rank failed" in str(errors[0])
        assert list(tmp_path.iterdir()) == []


def test_good_mark_is_not_part_of_the_manifest(tmp_path):
    store = CheckpointStore(tmp_path)
    path = _commit(store, 3)
    store.mark_good(3)
    assert (path / GOOD_MARK).is_file()
    verify_checkpoint_dir(path)
    assert store.latest_valid().good


def _torch_full_disk_error() -> None:
    """What a full disk looks like through torch's writer (megatron-core's dist_checkpointing saves with it): a
    RuntimeError with no errno. /dev/full answers every write with ENOSPC."""
    torch = pytest.importorskip("torch")
    torch.save(torch.zeros(1024), "/dev/full")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_torch_reports_a_full_disk_without_errno_so_errno_alone_cannot_tell(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos") as info:
        _torch_full_disk_error()
    assert not isinstance(info.value, OSError) and info.value.__cause__ is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_write_failing_on_a_full_filesystem_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "ckpts")
    previous = _commit(store, 1)
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: 1 << 20)  # 1 MiB left when the write fails
    full = pytest.raises(CheckpointWriteError, match=r"no space left on device .* RuntimeError: .*unexpected pos")
    with full as info, store.writing(2) as d:
        (d / "meta.json").write_text("{}")
        _torch_full_disk_error()
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, RuntimeError)
    assert _tmp_entries(tmp_path / "ckpts") == [] and store.steps() == [1]
    verify_checkpoint_dir(previous)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_the_same_error_with_room_on_disk_is_not_called_a_full_disk(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "ckpts")
    _commit(store, 1)
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: 1 << 40)
    with pytest.raises(RuntimeError, match="unexpected pos"), store.writing(2):
        _torch_full_disk_error()
    assert _tmp_entries(tmp_path / "ckpts") == [] and store.steps() == [1]


def test_size_of_a_checkpoint_is_the_sum_of_its_manifest_sizes(tmp_path):
    store = CheckpointStore(tmp_path)
    _commit(store, 1, big=5000)
    # shard.bin: b"weights" * 100 = 700 bytes; meta.json: '{"step": 1}' = 11 bytes; big.bin: 5000 bytes
    assert store.size_of(1) == 700 + 11 + 5000
    assert store.size_of(None) == 0 and store.size_of(7) == 0


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    previous = _commit(store, 1, big=5000)  # 5,711 bytes
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: 5000)
    started = []
    refused = pytest.raises(CheckpointWriteError, match=r"no space left on device for checkpoint step_000000002")
    with refused as info, store.writing(2) as d:
        started.append(d)
    assert info.value.errno == errno.ENOSPC and started == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, previous.name]
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: 5711)  # exactly enough: written
    _commit(store, 2, big=5000)
    assert store.head() == 2
