"""One way to replace a file so that a crash leaves the old content or the new, never a mix.

Used by the config writer, the metric sinks, evaluation results and the checkpoint store (its pointer,
manifest and marks), which is why it depends on nothing else in the package.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory entry (a rename, a new file) where the platform allows opening directories."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, tmp_prefix: str = ".") -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, fsync it, rename it over `path`, fsync
    the directory. The temporary name starts with `tmp_prefix`, so a store can find leftovers of a crash."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{tmp_prefix}{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
