"""A small disk that tests fill and free: a real tmpfs where the tests run as root (mount
works), else SQLite's ``PRAGMA max_page_count`` on the databases given, which gives the same
``SQLITE_FULL`` ("database or disk is full") without a mount."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tidesync as ts

#: Bytes of the tmpfs (the device's file and nothing else lives on it).
DISK_SIZE = "2m"
_NO_LIMIT = 4294967294  # SQLite's largest max_page_count
#: Set this environment variable to run the ``max_page_count`` fallback as root too.
NO_TMPFS = "TIDESYNC_TEST_NO_TMPFS"


class SmallDisk:
    """A folder on a small file system. :meth:`fill` takes every free byte (a filler file),
    :meth:`free` gives them back; ``real`` is False in the ``max_page_count`` fallback, where
    both act on the databases passed instead."""

    def __init__(self, path: Path, real: bool) -> None:
        self.path = path
        self.real = real
        self._filler = path / "filler"

    def fill(self, *dbs: ts.Database) -> None:
        """Leave no free space (the databases' files cannot grow)."""
        if not self.real:
            self._limit(dbs, 1)  # clamped to the file's current size
            return
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 16, 1 << 12, 1 << 9):
                block = b"\0" * chunk
                while True:
                    try:
                        os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)

    def free(self, *dbs: ts.Database) -> None:
        """Give the space back."""
        if not self.real:
            self._limit(dbs, _NO_LIMIT)
            return
        with contextlib.suppress(FileNotFoundError):
            self._filler.unlink()

    @staticmethod
    def _limit(dbs: tuple[ts.Database, ...], pages: int) -> None:
        sql = f"PRAGMA max_page_count = {pages}"
        for db in dbs:
            with db._lock:
                db._engine.conn.execute(sql).fetchall()
            session = db._session
            if session is not None:  # the sync thread's own connection, on its thread
                conn = session._worker.engine.conn

                def limit(conn: sqlite3.Connection = conn) -> None:
                    conn.execute(sql).fetchall()

                session._client.call(limit)


def _run(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def small_disk(folder: Path, size: str = DISK_SIZE) -> Iterator[SmallDisk]:
    """A :class:`SmallDisk` in ``folder``: a tmpfs of ``size`` mounted there when possible
        (unmounted at the end, lazily if still busy), else (not root, or ``$TIDESYNC_TEST_NO_TMPFS``
    set) the ``max_page_count`` fallback."""
    folder.mkdir(parents=True, exist_ok=True)
    real = os.name == "posix" and os.geteuid() == 0 and not os.environ.get(NO_TMPFS)
    real = real and _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    disk = SmallDisk(folder, real)
    try:
        yield disk
    finally:
        if real:
            disk.free()
            if not _run("umount", str(folder)):
                _run("umount", "-l", str(folder))


async def wait_until(check: Callable[[], Any], limit: float, what: str) -> None:
    """Poll ``check()`` until true (bounded by ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {limit} s")
        await asyncio.sleep(0.02)


def count(db: ts.Database, model: Any) -> int:
    """How many objects of ``model`` the database holds."""
    return len(db.all(model))
