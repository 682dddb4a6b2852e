"""Checkpoint directories on disk: atomic commit, a `latest` pointer, retention and corruption checks.

Pure Python (no torch): distributed callers pass `is_writer` and an `all_ok` agreement callable (see
`megatron_ckpt.dist_store`). Layout of a run's checkpoint root:

    root/
      latest                  text: the name of the head checkpoint directory (replaced atomically)
      step_000000120/         a committed checkpoint: payload files, then
        GOOD                  (optional) a guard marked it good: a rollback target, kept while among the newest good
        COMPLETE              manifest JSON, written last: step and every file with its size (+ crc32)
      .tmp-step_000000130/    being written; a crash leaves it behind and the next start removes it

Commit protocol, so that a crash, SIGTERM or SIGKILL at any point leaves the previous checkpoint usable:
1. the writer checks that the filesystem has room for a checkpoint as large as the newest one (else nothing is
   written and every rank raises `CheckpointWriteError`, errno ENOSPC), removes a stale temp dir of this step and
   creates `.tmp-step_N`; all ranks agree;
2. every rank writes its files into the temp dir and fsyncs them; all ranks agree that all succeeded
   (any failure: the writer removes the temp dir and every rank raises);
3. the writer writes `COMPLETE` (temp file, fsync, rename), renames the directory to `step_N`, fsyncs the
   root, replaces `latest` (temp file, fsync, os.replace) and prunes; all ranks agree.

Manifest cost: every file's size is recorded and checked; the crc32 of a file's bytes only for files up to
`checksum_max_bytes` (16 MiB: metadata, common state, JSON). Checksumming tensor shards would read the whole
checkpoint (hundreds of GB with optimizer state) at every save and load; a truncated shard still fails the
size check.

A full disk does not always surface as `OSError(ENOSPC)`: torch's zip writer, under megatron-core's
dist_checkpointing, reports it as `RuntimeError("... unexpected pos ...")`. So a failed write is called a full disk
when its error chain holds ENOSPC or when the filesystem has less than `LOW_FREE_BYTES` left at the moment of
failure (measured before the temp dir is removed).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lcot_mega.utils.atomic_file import atomic_write

MANIFEST = "COMPLETE"
GOOD_MARK = "GOOD"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
MANIFEST_FORMAT = "lcot-mega-checkpoint/1"
DEFAULT_CHECKSUM_MAX_BYTES = 16 << 20
_STEP_DIR = re.compile(r"^step_(\d{9,})$")
_CHUNK = 1 << 20
LOW_FREE_BYTES = 256 << 20
"""Free space below which a failed checkpoint write is reported as a full disk, whatever its exception says."""

AllOk = Callable[[bool], bool]
"""Collective agreement: every rank passes whether its part succeeded; returns True only if all did."""


class CheckpointStoreError(Exception):
    """Base of the checkpoint errors; the message names the directory concerned."""


class CorruptCheckpointError(CheckpointStoreError):
    """A checkpoint directory that is partial (no COMPLETE marker) or fails its manifest."""


class NoCheckpointError(CheckpointStoreError, FileNotFoundError):
    """No checkpoint where one was asked for."""


class CheckpointWriteError(CheckpointStoreError):
    """Writing a checkpoint failed; the temp dir was removed and the previous checkpoint is untouched."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint directory."""

    step: int
    path: Path
    good: bool


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:09d}"


def _single_process(ok: bool) -> bool:
    return ok


# --- durable file operations -------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (bottom-up), so a rename after it publishes durable data."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new content, never a mix."""
    atomic_write(path, text, tmp_prefix=TMP_PREFIX)


def _remove_tree(path: Path) -> None:
    """Rename out of the way first: a crash mid-delete must not leave a half-deleted `step_N` behind."""
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --- manifest ------------------------------------------------------------------------------------------------


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _payload_files(path: Path) -> Iterator[tuple[str, Path]]:
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path).as_posix()
        if file.is_file() and rel not in (MANIFEST, GOOD_MARK):
            yield rel, file


def build_manifest(path: Path, step: int, checksum_max_bytes: int = DEFAULT_CHECKSUM_MAX_BYTES) -> dict:
    files = {}
    for rel, file in _payload_files(path):
        size = file.stat().st_size
        entry: dict[str, int] = {"size": size}
        if size <= checksum_max_bytes:
            entry["crc32"] = _crc32(file)
        files[rel] = entry
    return {"format": MANIFEST_FORMAT, "step": step, "written_at": time.time(), "files": files}


def verify_checkpoint_dir(path: str | Path) -> dict:
    """The manifest of the complete checkpoint at `path`; raises `CorruptCheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise NoCheckpointError(f"checkpoint directory {path} does not exist")
    marker = path / MANIFEST
    if not marker.is_file():
        raise CorruptCheckpointError(f"{path} has no {MANIFEST} marker: a partial write or not a checkpoint")
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{marker} is not a valid manifest: {e}") from e
    m = _STEP_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        raise CorruptCheckpointError(f"{marker} says step {step}, the directory name says {int(m.group(1))}")
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            raise CorruptCheckpointError(f"{path}: file {rel} listed in {MANIFEST} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpointError(f"{path}: {rel} has {size} bytes, {MANIFEST} recorded {entry['size']}")
        if "crc32" in entry and _crc32(file) != entry["crc32"]:
            raise CorruptCheckpointError(f"{path}: {rel} fails its crc32 checksum")
    return manifest


# --- atomic directory commit -------------------------------------------------------------------------------


def free_bytes(path: str | Path) -> int:
    """Bytes this process can still write on `path`'s filesystem (root may use the blocks reserved for it)."""
    st = os.statvfs(path)
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _disk_full(err: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC in the error chain, or (see the module docstring) the
    filesystem nearly full now, before the temp dir is removed."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(where) < LOW_FREE_BYTES
    except OSError:
        return False


def _write_error(err: BaseException, final: Path, tmp: Path, disk_full: bool) -> CheckpointWriteError:
    if disk_full:
        return CheckpointWriteError(
            f"no space left on device while writing checkpoint {final.name} into {final.parent}"
            f" (temp dir {tmp.name} removed; the previous checkpoint is untouched): free space there"
            f" or keep fewer checkpoints (trainer.keep_last). The write failed with: {type(err).__name__}: {err}",
            errno.ENOSPC,
        )
    return CheckpointWriteError(
        f"writing checkpoint {final} failed: {err} (temp dir removed; the previous checkpoint is untouched)",
        getattr(err, "errno", None),
    )


def _check_room(where: Path, final: Path, expected_bytes: int) -> None:
    """Refuse to start a checkpoint the filesystem cannot hold: `expected_bytes` is the newest one's size."""
    free = free_bytes(where)
    if free < expected_bytes:
        raise CheckpointWriteError(
            f"no space left on device for checkpoint {final.name} in {where}: the newest checkpoint took"
            f" {_gib(expected_bytes)} and {_gib(free)} are free. Nothing was written and the previous checkpoint"
            " is untouched: free space there or keep fewer checkpoints (trainer.keep_last)",
            errno.ENOSPC,
        )


def _run(action: Callable[[], None] | None) -> BaseException | None:
    if action is None:
        return None
    try:
        action()
    except Exception as e:  # reported to every rank by the agreement that follows
        return e
    return None


def _agree(all_ok: AllOk, err: BaseException | None, final: Path, tmp: Path, is_writer: bool) -> None:
    if all_ok(err is None):
        return
    disk_full = err is not None and not isinstance(err, CheckpointWriteError) and _disk_full(err, final.parent)
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
    if err is None:
        raise CheckpointWriteError(f"another rank failed while writing checkpoint {final}; temp dir removed")
    if isinstance(err, CheckpointWriteError):
        raise err
    if isinstance(err, OSError) or disk_full:
        raise _write_error(err, final, tmp, disk_full) from err
    raise err


def _fresh_dir(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def _publish(tmp: Path, final: Path, step: int, checksum_max_bytes: int) -> None:
    atomic_write_text(tmp / MANIFEST, json.dumps(build_manifest(tmp, step, checksum_max_bytes), indent=1))
    replaced = None
    if final.exists():  # the same step again (after a rollback): swap, then delete the old one
        replaced = final.with_name(f"{TMP_PREFIX}replaced-{final.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


@contextmanager
def atomic_checkpoint_dir(
    final: str | Path,
    step: int,
    *,
    is_writer: bool = True,
    all_ok: AllOk | None = None,
    checksum_max_bytes: int = DEFAULT_CHECKSUM_MAX_BYTES,
    on_commit: Callable[[Path], None] | None = None,
    expected_bytes: int = 0,
) -> Iterator[Path]:
    """Yield a temp dir to write into; on success it becomes `final` (manifest last), on failure it is removed.

    Every rank enters with the same arguments; `all_ok` is the collective agreement (barrier + failure
    propagation). `on_commit(final)` runs on the writer after the rename (the store moves `latest` there).
    `expected_bytes`: what the checkpoint will take; the writer refuses to start when less is free.
    """
    final = Path(final)
    all_ok = all_ok or _single_process
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"

    def prepare() -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        _check_room(final.parent, final, expected_bytes)
        _fresh_dir(tmp)

    _agree(all_ok, _run(prepare if is_writer else None), final, tmp, is_writer)
    err = None
    try:
        yield tmp
        fsync_tree(tmp)
    except Exception as e:
        err = e
    except BaseException:  # KeyboardInterrupt / SystemExit: no agreement possible, clean what is ours
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _agree(all_ok, err, final, tmp, is_writer)

    def commit() -> None:
        _publish(tmp, final, step, checksum_max_bytes)
        if on_commit is not None:
            on_commit(final)

    _agree(all_ok, _run(commit if is_writer else None), final, tmp, is_writer)


# --- a run's checkpoint root -------------------------------------------------------------------------------


class CheckpointStore:
    """The checkpoints of one run under `root`: commit, `latest` pointer, retention, good marks, fallback.

    `keep_last` complete checkpoints up to the head are kept, plus the newest `keep_good` marked good up to the head
    (rollback targets); older ones are deleted only after a newer one is committed. Keeping every good one would
    keep every checkpoint of a healthy run, since each is marked good a step after it is written. Checkpoints with
    a larger step than the head belong to a timeline abandoned by a rollback and are deleted at the next commit.
    """

    def __init__(
        self,
        root: str | Path,
        keep_last: int = 3,
        *,
        keep_good: int = 1,
        is_writer: bool = True,
        all_ok: AllOk | None = None,
        checksum_max_bytes: int = DEFAULT_CHECKSUM_MAX_BYTES,
        clean_stale: bool = True,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (trainer.keep_last), got {keep_last}")
        if keep_good < 1:
            raise ValueError(f"keep_good must be >= 1 (trainer.keep_good), got {keep_good}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_good = keep_good
        self.is_writer = is_writer
        self.all_ok = all_ok or _single_process
        self.checksum_max_bytes = checksum_max_bytes
        if is_writer:
            self.root.mkdir(parents=True, exist_ok=True)
            if clean_stale:
                self.clean_stale()

    def path_for(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def steps(self) -> list[int]:
        """Steps of every `step_N` directory, ascending (committed or not; not verified)."""
        if not self.root.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def head(self) -> int | None:
        """The step the `latest` pointer names, or None when there is no (readable) pointer."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        m = _STEP_DIR.match(pointer.read_text(encoding="utf-8").strip())
        if not m:
            warnings.warn(f"{pointer} does not name a checkpoint directory; ignoring it", stacklevel=2)
            return None
        return int(m.group(1))

    def clean_stale(self) -> list[str]:
        """Remove `.tmp-*` leftovers of a crashed run (writer only; call before anyone writes)."""
        removed = []
        for p in self.root.glob(f"{TMP_PREFIX}*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
        return sorted(removed)

    @contextmanager
    def writing(self, step: int) -> Iterator[Path]:
        """Every rank writes its files of checkpoint `step` into the yielded dir; committed on exit. The writer first
        checks that the disk has room for a checkpoint as large as the head."""
        with atomic_checkpoint_dir(
            self.path_for(step),
            step,
            is_writer=self.is_writer,
            all_ok=self.all_ok,
            checksum_max_bytes=self.checksum_max_bytes,
            on_commit=self._after_commit,
            expected_bytes=self.size_of(self.head()) if self.is_writer else 0,
        ) as tmp:
            yield tmp

    def size_of(self, step: int | None) -> int:
        """Bytes of checkpoint `step` by its manifest (0 when there is none, or it is unreadable)."""
        if step is None:
            return 0
        try:
            files = json.loads((self.path_for(step) / MANIFEST).read_text(encoding="utf-8"))["files"]
            return sum(int(entry["size"]) for entry in files.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0

    def _after_commit(self, final: Path) -> None:
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self.prune()

    def _candidates(self) -> list[int]:
        """Steps to try, newest first: the head and older (all steps when there is no usable pointer)."""
        steps = self.steps()
        head = self.head()
        if head is None:
            return steps[::-1]
        if head not in steps:
            warnings.warn(f"{self.root / LATEST} names {step_dir_name(head)}, which is missing", stacklevel=3)
        return [s for s in reversed(steps) if s <= head]

    def latest_valid(self) -> Checkpoint | None:
        """The newest complete, manifest-verified checkpoint up to the head; corrupt ones are skipped with a warning."""
        for step in self._candidates():
            path = self.path_for(step)
            try:
                verify_checkpoint_dir(path)
            except CheckpointStoreError as e:
                warnings.warn(f"skipping checkpoint {path}: {e}; falling back to an older one", stacklevel=2)
                continue
            return Checkpoint(step, path, (path / GOOD_MARK).is_file())
        return None

    def last_good(self) -> Checkpoint | None:
        """The newest valid checkpoint marked good, up to the head."""
        for step in self._candidates():
            path = self.path_for(step)
            if not (path / GOOD_MARK).is_file():
                continue
            try:
                verify_checkpoint_dir(path)
            except CheckpointStoreError as e:
                warnings.warn(f"skipping good checkpoint {path}: {e}", stacklevel=2)
                continue
            return Checkpoint(step, path, True)
        return None

    def mark_good(self, step: int) -> Checkpoint:
        """Mark committed checkpoint `step` good: `rollback` can return to it, and retention keeps it while it is
        among the newest `keep_good` good ones."""
        path = self.path_for(step)
        verify_checkpoint_dir(path)
        if self.is_writer:
            atomic_write_text(path / GOOD_MARK, f"{time.time()}\n")
        return Checkpoint(step, path, True)

    def rollback(self, step: int | None = None) -> Checkpoint:
        """Point `latest` back at checkpoint `step` (default: the last good one) and return it."""
        if step is None:
            good = self.last_good()
            if good is None:
                raise NoCheckpointError(f"no checkpoint marked good under {self.root} to roll back to")
            step = good.step
        path = self.path_for(step)
        verify_checkpoint_dir(path)
        if self.is_writer:
            atomic_write_text(self.root / LATEST, path.name + "\n")
        return Checkpoint(step, path, (path / GOOD_MARK).is_file())

    def drop_newer_than(self, step: int) -> list[int]:
        """Delete every checkpoint after `step` (writer only): after a rollback to `step` they hold a timeline the
        run abandoned, and a later fallback must never land on one. Returns the deleted steps."""
        deleted = [s for s in self.steps() if s > step] if self.is_writer else []
        for s in deleted:
            _remove_tree(self.path_for(s))
        return deleted

    def prune(self) -> list[int]:
        """Delete checkpoints outside retention (writer only); returns the deleted steps."""
        head = self.head()
        steps = self.steps()
        if head is None or not self.is_writer:
            return []
        complete = [s for s in steps if s <= head and (self.path_for(s) / MANIFEST).is_file()]
        good = [s for s in complete if (self.path_for(s) / GOOD_MARK).is_file()]
        keep = set(complete[-self.keep_last :]) | set(good[-self.keep_good :]) | {head}
        deleted = [s for s in steps if s not in keep]
        for s in deleted:
            _remove_tree(self.path_for(s))
        return deleted
