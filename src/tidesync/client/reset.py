"""Client reset: what a device does when the server can no longer sync its file incrementally.

The server answers ERROR 211 (``CLIENT_RESET_NEEDED``) when the file's download cursor is
older than the history the server kept (``--history-retention-days``), or when the server's
data was wiped (the cursor is beyond the server's latest version, or the file is unknown).
The configuration's ``client_reset=`` mode decides what happens (``docs/client-reset.md``):

- :class:`RecoverUnsyncedChanges` (the default): the objects are cleared, the cursors go
  back to 0, the file's unacknowledged changesets are applied again (by the merge rules) and
  kept in the change log, so they are uploaded anew; the server sends the current state.
- :class:`DiscardUnsyncedChanges`: the same, but the unacknowledged changesets are dropped.
- :class:`ManualRecovery`: nothing is changed; the session stops and the error handler gets a
  :class:`~tidesync.errors.ClientResetError` whose ``backup_path`` is a copy of the file.

Everything happens on the same file, in one SQLite transaction of the session's engine, so
the application's open databases see the new state (live results, notifications). A server
that keeps demanding resets stops the session after :data:`MAX_RESETS` resets within
:data:`RESET_WINDOW` seconds.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.packing import unpack_instructions
from ..errors import ClientResetError
from ..protocol.session import too_many_resets_error
from ..store.engine import StoreEngine
from ..store.restamp import reset_objects

if TYPE_CHECKING:
    from ..store.model import Model
    from .database import Database

log = logging.getLogger("tidesync.reset")

#: At most this many automatic resets within :data:`RESET_WINDOW` seconds; one more stops
#: the session (a server that keeps demanding resets must not make the device loop).
MAX_RESETS = 3
#: The window (seconds) in which :data:`MAX_RESETS` is counted.
RESET_WINDOW = 300.0


@dataclass(frozen=True)
class RecoverUnsyncedChanges:
    """Reset, then apply and upload again the writes the server never acknowledged.

    ``on_before(before)`` is called with a read-only copy of the file as it was (a local
    :class:`~tidesync.Database`); ``on_after(before, after)`` with that copy and the reset
    file (writes to ``after`` are synced). Both run on the sync thread; an exception in
    ``on_before`` cancels the reset (the session stops, as with :class:`ManualRecovery`).
    """

    on_before: Callable[[Database], Any] | None = None
    on_after: Callable[[Database, Database], Any] | None = None
    #: Resets allowed within ``window`` seconds before the session stops.
    max_resets: int = MAX_RESETS
    window: float = RESET_WINDOW


@dataclass(frozen=True)
class DiscardUnsyncedChanges:
    """Reset and drop the writes the server never acknowledged; callbacks as for
    :class:`RecoverUnsyncedChanges`."""

    on_before: Callable[[Database], Any] | None = None
    on_after: Callable[[Database, Database], Any] | None = None
    max_resets: int = MAX_RESETS
    window: float = RESET_WINDOW


@dataclass(frozen=True)
class ManualRecovery:
    """Do not touch the file: stop the session and hand the error handler a
    :class:`~tidesync.errors.ClientResetError` with ``backup_path``, a copy of the file."""

    max_resets: int = field(default=MAX_RESETS, repr=False)
    window: float = field(default=RESET_WINDOW, repr=False)


#: What ``client_reset=`` accepts.
ClientResetMode = RecoverUnsyncedChanges | DiscardUnsyncedChanges | ManualRecovery


def check_mode(mode: object) -> ClientResetMode:
    """``mode`` if it is a client reset mode, else a clear ``TypeError``."""
    if isinstance(mode, RecoverUnsyncedChanges | DiscardUnsyncedChanges | ManualRecovery):
        if mode.max_resets < 1 or not mode.window > 0:
            raise ValueError("client_reset: max_resets must be >= 1 and window positive")
        return mode
    raise TypeError(
        "client_reset must be RecoverUnsyncedChanges(), DiscardUnsyncedChanges() or "
        f"ManualRecovery(), not {mode!r}"
    )


def backup_copy(engine: StoreEngine, dest: str | Path) -> str:
    """A consistent copy of the engine's file at ``dest`` (SQLite's backup API)."""
    dest = str(dest)
    target = sqlite3.connect(dest)
    try:
        engine.conn.backup(target)
    finally:
        target.close()
    return dest


def backup_path_for(path: str, label: str) -> str:
    """A new file name next to ``path`` for a copy (``<path>.<label>-<UTC time>``)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{path}.{label}-{stamp}"
    candidate, n = base, 1
    while os.path.exists(candidate) and n < 1000:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


@dataclass(frozen=True)
class ResetOutcome:
    """What a reset did to the file."""

    recovered: int  # unacknowledged changesets kept (to upload again)
    discarded: int  # unacknowledged changesets dropped


def reset_file(engine: StoreEngine, *, recover: bool) -> ResetOutcome:
    """Clear the objects and cursors of the file in one transaction; with ``recover`` the
    unacknowledged changesets are applied again and kept for upload, else dropped."""
    conn = engine.conn
    engine.begin()
    try:
        acked = int(engine.get_meta("upload_acked", 0) or 0)
        pending = conn.execute(
            "SELECT version, data FROM _changelog WHERE version > ? ORDER BY version", (acked,)
        ).fetchall()
        again = [unpack_instructions(data, engine.origin) for _, data in pending]
        reset_objects(engine, acked, again if recover else None)
        engine.commit(())
    except BaseException:
        engine.rollback()
        raise
    n = len(pending)
    return ResetOutcome(n, 0) if recover else ResetOutcome(0, n)


def open_copy(models: Sequence[type[Model]], path: str) -> Database:
    """A local :class:`~tidesync.Database` on ``path`` (for the reset callbacks)."""
    from .config import Configuration
    from .database import Database

    return Database(Configuration.local(models, path))


def manual_error(engine: StoreEngine, message: str) -> ClientResetError:
    """Copy the file and build the :class:`ClientResetError` for the error handler."""
    backup = backup_copy(engine, backup_path_for(engine.path, "backup"))
    return ClientResetError(f"client reset needed: {message}; a copy of the file: {backup}", backup)


def too_many_error(mode: ClientResetMode) -> ClientResetError:
    """The error of a session stopped because the server keeps demanding resets."""
    return too_many_resets_error(mode.max_resets, mode.window)


def drop_copy(copy: tuple[Database, str] | None) -> None:
    """Close and delete a reset's copy of the old file (``(database, path)``, or None)."""
    if copy is not None:
        try:
            copy[0].close()
        finally:
            remove_copy(copy[1])


def remove_copy(path: str) -> None:
    """Delete a temporary copy and its SQLite side files (missing ones are fine)."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


__all__ = [
    "ClientResetMode",
    "DiscardUnsyncedChanges",
    "ManualRecovery",
    "RecoverUnsyncedChanges",
    "ResetOutcome",
    "backup_copy",
    "check_mode",
    "drop_copy",
    "reset_file",
]
