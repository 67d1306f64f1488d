"""Telling a full disk apart among SQLite's errors.

SQLite reports a full disk as ``SQLITE_FULL`` ("database or disk is full") when a write to
the database or its WAL runs out of space, but as one of the ``SQLITE_IOERR`` variants
("disk I/O error") when the space runs out elsewhere: growing the WAL index (``-shm``),
pre-allocating, syncing or truncating in a checkpoint. Python's :mod:`sqlite3` does not
pass the ``errno`` on, so an I/O error counts as a full disk when the file system holding
the file has less than :data:`LOW_SPACE_BYTES` free (it is then the likely cause, and the
user's remedy is the same).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from ..errors import DiskFullError

#: An I/O error on a file whose file system has less than this free is a full disk.
LOW_SPACE_BYTES = 1024 * 1024

_SQLITE_IOERR = 10
_SQLITE_FULL = 13


def free_bytes(path: str) -> int | None:
    """Bytes free for this process on the file system holding ``path`` (``None``: unknown)."""
    folder = Path(path).parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path: str) -> bool:
    """True if ``exc`` is SQLite's answer to a full disk under ``path``."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == _SQLITE_FULL or (primary is None and "disk is full" in str(exc)):
        return True
    if primary == _SQLITE_IOERR or (primary is None and "disk I/O error" in str(exc)):
        free = free_bytes(path)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def disk_full_error(exc: BaseException, path: str, operation: str) -> DiskFullError | None:
    """The :class:`~tidesync.errors.DiskFullError` that ``exc`` stands for, or ``None`` when
    it is not a full disk (the caller re-raises ``exc`` then)."""
    if not is_disk_full(exc, path):
        return None
    return DiskFullError(path, operation, str(exc))
