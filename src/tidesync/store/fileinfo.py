"""Read a local database file without changing it: what ``tidesync inspect`` shows.

:func:`open_read_only` opens the file with SQLite's read-only mode (no write, no schema
set-up, no sync); the other functions read what the store keeps in it: the models as
stored (``_schema``), the objects per model, the change log not yet acknowledged by the
server (``_changelog`` after ``upload_acked``), and the cursors in ``_meta``. Run them in
one read transaction (``with read_snapshot(conn):``) for one consistent picture.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.schema import ModelSchema
from ..errors import DatabaseFileError
from . import sqlvalues as sv

#: How long a read waits for another process's lock before giving up (seconds).
READ_BUSY_TIMEOUT = 2.0
#: The ``_meta`` counters :func:`cursors` reports, each 0 when the file has none yet:
#: ``download_cursor`` (the server version downloaded up to), ``upload_acked`` (the local
#: version the server acknowledged), ``last_version`` (the newest local version).
CURSOR_KEYS = ("download_cursor", "upload_acked", "last_version")


def open_read_only(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to a tidesync database file; :class:`DatabaseFileError`
    (naming the file) if it is missing, is not a tidesync database, or is locked."""
    file = Path(path)
    if not file.is_file():
        problem = "no such file" if not file.exists() else "not a file"
        raise DatabaseFileError(f"{file}: {problem}")
    uri = f"{file.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=READ_BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise DatabaseFileError(f"{file}: cannot open: {exc}") from exc
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.Error as exc:
        conn.close()
        raise _read_error(file, exc) from exc
    if not {"_schema", "_meta", "_changelog"} <= tables:
        conn.close()
        raise DatabaseFileError(f"{file} is not a tidesync database (no _schema/_meta tables)")
    return conn


def _read_error(file: Path, exc: sqlite3.Error) -> DatabaseFileError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return DatabaseFileError(f"{file} is locked by another process ({text})")
    if "not a database" in text or "malformed" in text:
        return DatabaseFileError(f"{file} is not a tidesync database ({text})")
    return DatabaseFileError(f"{file}: cannot read: {text}")


@contextmanager
def read_snapshot(conn: sqlite3.Connection, path: str | Path) -> Iterator[None]:
    """One read transaction: everything read inside sees the same state of the file. An
    SQLite error inside (a lock held too long) becomes :class:`DatabaseFileError`."""
    try:
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise _read_error(Path(path), exc) from exc


def stored_models(conn: sqlite3.Connection) -> dict[str, ModelSchema]:
    """Every model the file stores, by name, as ``_schema`` holds it."""
    rows = conn.execute("SELECT model, definition FROM _schema ORDER BY model")
    return {model: ModelSchema.from_dict(json.loads(text)) for model, text in rows}


def object_counts(conn: sqlite3.Connection, models: dict[str, ModelSchema]) -> dict[str, int]:
    """Live objects per model (erased ones are not counted)."""
    return {
        name: int(conn.execute(f"SELECT COUNT(*) FROM {sv.table_name(name)}").fetchone()[0])
        for name in models
    }


def cursors(conn: sqlite3.Connection) -> dict[str, int]:
    """The sync cursors of :data:`CURSOR_KEYS` (0 where the file has none)."""
    marks = ", ".join("?" for _ in CURSOR_KEYS)
    found = dict(conn.execute(f"SELECT key, value FROM _meta WHERE key IN ({marks})", CURSOR_KEYS))
    return {key: int(found.get(key) or 0) for key in CURSOR_KEYS}


def origin(conn: sqlite3.Connection) -> str:
    """The file's origin id (its instructions' author on the server)."""
    row = conn.execute("SELECT value FROM _meta WHERE key = 'origin'").fetchone()
    return "" if row is None else str(row[0])


def pending_changes(conn: sqlite3.Connection, upload_acked: int) -> tuple[int, int]:
    """``(changesets, bytes)`` of the local change log after ``upload_acked``: what the
    server has not acknowledged (on a local file, everything written)."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM _changelog WHERE version > ?",
        (upload_acked,),
    ).fetchone()
    return int(row[0]), int(row[1])


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the file has the table ``name`` (read-only: nothing is created)."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


__all__ = [
    "CURSOR_KEYS",
    "READ_BUSY_TIMEOUT",
    "cursors",
    "has_table",
    "object_counts",
    "open_read_only",
    "origin",
    "pending_changes",
    "read_snapshot",
    "stored_models",
]
