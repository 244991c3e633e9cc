"""Atomic file writes, the one home for them: checkpoints, COCO results, the annotation and
image-scan caches, sweep records and tables.

``with atomic_write(path, "w") as f: ...`` writes into a temporary file beside ``path`` and
replaces ``path`` with it (``os.replace``, atomic on POSIX) only when the block ends without an
error: a reader, or a process killed mid-write, sees the old file or the complete new one,
never half of one. On an error the temporary file is removed and ``path`` is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["TMP_SUFFIX", "atomic_write", "remove_stale_temporaries"]

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", fsync: bool = False, **open_kwargs: Any) -> Iterator[IO]:
    """A file object for the new contents of ``path`` (``mode`` "w" or "wb"; ``open_kwargs`` as for
    ``open``, e.g. ``newline=""``), put in place when the block ends. ``fsync``: flushed to the
    disk first (checkpoints). The parent folder is created; the file gets the permissions
    ``open`` would have given it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporary files that processes killed inside `atomic_write` left beside ``path``."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
