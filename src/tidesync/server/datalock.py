"""One server per data folder: an OS lock on ``server.lock``, held while the server runs.

Two servers on one folder with SQLite storage would each keep their own view of the same
files (devices on one never see the other's writes), so the second start must fail. The
lock is ``flock`` on ``<folder>/server.lock`` (on Windows, ``msvcrt.locking`` of one byte
of it): the kernel drops it when the holder's file descriptor closes, also when the
process is killed with SIGKILL, so a crash never leaves a stale lock behind. The holder
writes its pid into the file for the error message of the next one. The file itself
stays (deleting it would let two servers lock two different files of the same name).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import DataFolderInUseError, ServerStartError

#: The lock file's name inside the data folder.
LOCK_FILE = "server.lock"
#: The byte the lock covers on Windows (past the pid, which others must read; Windows
#: allows locking past the end of a file).
_WINDOWS_LOCK_AT = 64
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0)

if sys.platform == "win32":  # pragma: no cover - not run on the Linux CI
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WINDOWS_LOCK_AT, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True


class DataFolderLock:
    """The exclusive lock of a data folder (``acquire``, then ``release`` when stopping)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DataFolderInUseError` at once (no waiting)
        naming the folder and the pid of the server that holds it."""
        if self._fd is not None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            raise ServerStartError(f"cannot use the data folder {self.folder}: {exc}") from exc
        if not _try_lock(fd):
            pid = _read_pid(fd)
            os.close(fd)
            message = _in_use_message(self.folder, pid)
            raise DataFolderInUseError(message, str(self.folder), pid)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # the pid is only for the message: the lock is what counts
            pass
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent); the next server may start on the folder."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _in_use_message(folder: Path, pid: int | None) -> str:
    if pid is None:
        holder = "another tidesync server"
    elif pid == os.getpid():
        holder = f"another server in this process (pid {pid})"
    else:
        holder = f"another tidesync server (pid {pid})"
    return (
        f"the data folder {folder.resolve()} is in use by {holder}; "
        "stop it or give this server its own --data folder"
    )
