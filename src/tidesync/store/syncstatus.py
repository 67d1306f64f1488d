"""The sync status of each object: which objects have local changes not acknowledged yet.

A small table beside the change log, ``_sync_status`` (model, SQL primary key -> the local
version of the object's last change, and the reason if the server refused a write of it),
kept in the same SQLite transactions as what it describes:

- a local write's commit upserts a row per object it wrote, at the new version (and clears
  a refusal: the next write ends it) — :func:`record`, from ``StoreEngine.commit``;
- storing the upload acknowledgement (``upload_acked``) deletes the rows it covers, in the
  transaction that writes the cursor — :func:`prune`;
- a compensating write (ERROR 231) or a refused changeset (ERROR 232) sets the reason of
  the objects it names — :func:`mark_refused`;
- a client reset drops or renumbers the rows with the change log — :func:`forget`,
  :func:`shift`.

Reading an object's status is one primary-key lookup (:func:`lookup`); ``@pending`` in a
query is an ``EXISTS`` on the same key (``store/sqlquery.py``). docs/sync-session.md,
"Sync status of an object".
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: The table's name (``store/sqlquery.py`` compiles ``@pending`` against it).
SYNC_STATUS_TABLE = "_sync_status"

CREATE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {SYNC_STATUS_TABLE} (model TEXT NOT NULL, pk NOT NULL, "
    "version INTEGER NOT NULL, reason TEXT, PRIMARY KEY (model, pk)) WITHOUT ROWID"
)
_UPSERT_SQL = (
    f"INSERT INTO {SYNC_STATUS_TABLE}(model, pk, version, reason) VALUES (?, ?, ?, NULL) "
    "ON CONFLICT(model, pk) DO UPDATE SET version = excluded.version, reason = NULL"
)
_REFUSE_SQL = (
    f"INSERT INTO {SYNC_STATUS_TABLE}(model, pk, version, reason) VALUES (?, ?, 0, ?) "
    "ON CONFLICT(model, pk) DO UPDATE SET reason = excluded.reason"
)


class ObjectSyncStatus(enum.Enum):
    """Where one object stands with the server."""

    #: changed locally, the change not acknowledged by the server yet
    PENDING = "pending"
    #: every local change of it acknowledged (or it was never changed on this device)
    SYNCED = "synced"
    #: the server refused (compensated) a write of it; until the next local write of it
    REFUSED = "refused"


@dataclass(frozen=True, eq=False)
class ObjectStatus:
    """``db.sync_status(obj)``: the :class:`ObjectSyncStatus` with its details. It compares
    equal to its status (``db.sync_status(t) == ObjectSyncStatus.PENDING``).

    ``version`` is the local version of the object's last unacknowledged change (PENDING),
    ``reason`` the server's words for the refusal (REFUSED); None otherwise."""

    status: ObjectSyncStatus
    version: int | None = None
    reason: str | None = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ObjectSyncStatus):
            return self.status is other
        if isinstance(other, ObjectStatus):
            return (self.status, self.version, self.reason) == (
                other.status,
                other.version,
                other.reason,
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.status)

    def __str__(self) -> str:
        if self.status is ObjectSyncStatus.PENDING:
            return f"pending (local version {self.version})"
        if self.status is ObjectSyncStatus.REFUSED:
            return f"refused: {self.reason}"
        return "synced"


SYNCED = ObjectStatus(ObjectSyncStatus.SYNCED)


def create(conn: sqlite3.Connection) -> None:
    """Create the table (idempotent). It has no index on ``version``: one would cost every
    local write more than it saves :func:`prune`, which scans only the pending rows."""
    conn.execute(CREATE_SQL)


def exists(conn: sqlite3.Connection) -> bool:
    """Whether the file has the table (files made before it existed do not)."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (SYNC_STATUS_TABLE,)
    ).fetchone()
    return row is not None


def record(conn: sqlite3.Connection, version: int, keys: Iterable[tuple[str, Any]]) -> None:
    """In a local write's transaction: the objects ``keys`` (model, SQL key) changed at
    local ``version``."""
    conn.executemany(_UPSERT_SQL, ((model, key, version) for model, key in keys))


def prune(conn: sqlite3.Connection, acked: int) -> list[tuple[str, Any]]:
    """In the transaction storing ``upload_acked = acked``: forget the objects whose last
    change it covers (refused ones keep their reason). Returns them (model, SQL key)."""
    rows = conn.execute(
        f"DELETE FROM {SYNC_STATUS_TABLE} WHERE version <= ? AND reason IS NULL "
        "RETURNING model, pk",
        (acked,),
    ).fetchall()
    return [(str(m), k) for m, k in rows]


def mark_refused(conn: sqlite3.Connection, refused: Iterable[tuple[str, Any, str]]) -> None:
    """The server refused writes of these objects (model, SQL key, reason)."""
    conn.executemany(_REFUSE_SQL, list(refused))


def forget(conn: sqlite3.Connection, upto: int | None) -> None:
    """A client reset: forget the rows of versions up to ``upto`` (None: every row)."""
    if upto is None:
        conn.execute(f"DELETE FROM {SYNC_STATUS_TABLE}")
    else:
        conn.execute(f"DELETE FROM {SYNC_STATUS_TABLE} WHERE version <= ?", (upto,))


def shift(conn: sqlite3.Connection, after: int, gap: int) -> None:
    """The change log's versions after ``after`` moved down by ``gap``: follow them."""
    conn.execute(
        f"UPDATE {SYNC_STATUS_TABLE} SET version = version - ? WHERE version > ?", (gap, after)
    )


def lookup(conn: sqlite3.Connection, model: str, key: Any) -> tuple[int, str | None] | None:
    """``(version, reason)`` of an object's row, or None (synced)."""
    row = conn.execute(
        f"SELECT version, reason FROM {SYNC_STATUS_TABLE} WHERE model = ? AND pk = ?",
        (model, key),
    ).fetchone()
    return None if row is None else (int(row[0]), row[1])


def status_of(row: tuple[int, str | None] | None, acked: int) -> ObjectStatus:
    """The status a :func:`lookup` row means, given the newest acknowledged version known
    (memory may be ahead of the file: the rows are pruned when it is stored)."""
    if row is None:
        return SYNCED
    version, reason = row
    if reason is not None:
        return ObjectStatus(ObjectSyncStatus.REFUSED, None, reason)
    if version <= acked:
        return SYNCED
    return ObjectStatus(ObjectSyncStatus.PENDING, version)


__all__ = ["SYNC_STATUS_TABLE", "ObjectStatus", "ObjectSyncStatus"]
