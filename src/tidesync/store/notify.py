"""Change notifications: a notifier thread per database that reports what each commit changed.

The notifier keeps its own SQLite connection to the file. After every commit (it is woken at
once by commits made in this process, and polls ``PRAGMA data_version`` for commits of other
processes), it re-runs each watched query and diffs the result against the last one it saw:
inserted and deleted positions, and positions whose object changed. Object listeners diff one
row. Callbacks run on the notifier thread; async streams hand changes to their event loop.

When every commit since the last check was made in this process and recorded what it wrote
(``engine.touched_between``: each commit numbers itself in ``_meta.commit_seq``), listeners
skip commits that did not touch their model, and a query in insertion order over its own
table only re-reads the written objects and patches its last result (same changes reported
as a full re-run). Anything else (another process, a bulk write) re-runs the query.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..eventloop import stream_loop
from . import sqlvalues as sv
from .engine import Touched, add_waker, remove_waker, touched_between
from .sqlquery import register_functions

if TYPE_CHECKING:
    from .database import LocalDatabase
    from .model import Model
    from .results import Results

log = logging.getLogger("tidesync.notify")

#: How often (seconds) the notifier checks for commits made by other processes.
POLL_INTERVAL = 0.01


@dataclass(frozen=True)
class ResultsChange:
    """What one commit changed in a :class:`Results`.

    ``deleted`` are positions in the results before the commit; ``inserted`` and
    ``modified`` are positions after it.
    """

    results: Results[Any]
    inserted: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    modified: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ObjectChange:
    """What one commit changed in an object: the changed fields' names, or that it was deleted."""

    object: Model
    deleted: bool = False
    changed_fields: list[str] = field(default_factory=list)


class NotificationToken:
    """Returned when a listener is added; :meth:`cancel` removes it."""

    def __init__(self, notifier: Notifier, listener: _Listener) -> None:
        self._notifier = notifier
        self._listener = listener

    def cancel(self) -> None:
        """Stop the notifications (idempotent)."""
        self._notifier.unregister(self._listener)

    @property
    def is_cancelled(self) -> bool:
        """True after :meth:`cancel`, or once the database closed."""
        return self._listener.cancelled


class _Listener:
    cancelled = False

    def snapshot(self, conn: sqlite3.Connection) -> None:
        raise NotImplementedError

    def check(self, conn: sqlite3.Connection) -> None:
        raise NotImplementedError

    def check_touched(self, conn: sqlite3.Connection, touched: Touched) -> None:
        """:meth:`check` after commits that wrote exactly ``touched`` (model -> SQL keys)."""
        self.check(conn)


class ResultsListener(_Listener):
    """Diffs a query's rows after each commit."""

    def __init__(self, results: Results[Any], callback: Callable[[ResultsChange], Any]) -> None:
        self.results = results
        self.callback = callback
        self._pks: list[Any] = []
        self._rows: dict[Any, tuple[Any, ...]] = {}
        schema = results._schema
        self._model = schema.name
        self._pk_index = [f.name for f in schema.fields].index(schema.primary_key)
        # Patching the last result is possible for a query in insertion order (rowid) on
        # its own table only: no sort, limit or distinct, no link into another table.
        self._rowids: list[int] | None = None  # parallel to _pks, ascending
        self._rowid_of: dict[Any, int] = {}
        sql, _ = results.snapshot_sql()
        patchable = not any(
            f.order_by or f.limit is not None or f.distinct for f in results._filters
        )
        self._patchable = patchable and sql.count('"t_') == 1
        if self._patchable:
            columns = f"{results._columns()}, t0.rowid"
            self._sql, self._params = results._select(columns)
            where, rest = self._sql.rsplit(" ORDER BY ", 1)
            self._keyed_sql = (
                f"{where} AND t0.{sv.quote(schema.primary_key)} IN ({{marks}}) ORDER BY {rest}"
            )
        else:
            self._sql, self._params = sql, []
            self._keyed_sql = ""
            self._params = results.snapshot_sql()[1]

    def _load(self, conn: sqlite3.Connection) -> tuple[list[Any], dict[Any, tuple[Any, ...]]]:
        rows = conn.execute(self._sql, self._params).fetchall()
        i = self._pk_index
        if self._patchable:
            self._rowids = [r[-1] for r in rows]
            self._rowid_of = {r[i]: r[-1] for r in rows}
            return [r[i] for r in rows], {r[i]: r[:-1] for r in rows}
        return [r[i] for r in rows], {r[i]: r for r in rows}

    def snapshot(self, conn: sqlite3.Connection) -> None:
        self._pks, self._rows = self._load(conn)

    def check(self, conn: sqlite3.Connection) -> None:
        old_pks, old_rows = self._pks, self._rows
        pks, rows = self._load(conn)
        if pks == old_pks and rows == old_rows:
            return
        deleted = [i for i, pk in enumerate(old_pks) if pk not in rows]
        inserted = [i for i, pk in enumerate(pks) if pk not in old_rows]
        modified = [i for i, pk in enumerate(pks) if pk in old_rows and old_rows[pk] != rows[pk]]
        self._pks, self._rows = pks, rows
        if deleted or inserted or modified:
            self.callback(ResultsChange(self.results, inserted, deleted, modified))

    def check_touched(self, conn: sqlite3.Connection, touched: Touched) -> None:
        """Skip commits that did not write this model; patch the result with the written
        objects' rows when the query allows it; else re-run the query."""
        if self._model not in touched:
            return
        keys = touched[self._model]
        if keys is None or not self._patchable or self._rowids is None:
            self.check(conn)
            return
        marks = ",".join("?" * len(keys))
        found = conn.execute(self._keyed_sql.format(marks=marks), [*self._params, *keys]).fetchall()
        i = self._pk_index
        new = {r[i]: r for r in found}
        pks, rowids, rows, rowid_of = self._pks, self._rowids, self._rows, self._rowid_of
        # old positions of the written objects, then take them out
        at = sorted(bisect.bisect_left(rowids, rowid_of[pk]) for pk in keys if pk in rowid_of)
        deleted = [p for p in at if pks[p] not in new]
        old_rows = {pks[p]: rows[pks[p]] for p in at}
        for p in reversed(at):
            pk = pks[p]
            del pks[p], rowids[p], rows[pk], rowid_of[pk]
        # put the current rows back in rowid order
        for pk, r in new.items():
            rowid = r[-1]
            p = bisect.bisect_left(rowids, rowid)
            pks.insert(p, pk)
            rowids.insert(p, rowid)
            rows[pk] = r[:-1]
            rowid_of[pk] = rowid
        inserted: list[int] = []
        modified: list[int] = []
        for pk, r in new.items():
            p = bisect.bisect_left(rowids, r[-1])
            if pk not in old_rows:
                inserted.append(p)
            elif old_rows[pk] != r[:-1]:
                modified.append(p)
        if deleted or inserted or modified:
            inserted.sort()
            modified.sort()
            self.callback(ResultsChange(self.results, inserted, deleted, modified))


class ObjectListener(_Listener):
    """Diffs one object's row after each commit."""

    def __init__(self, obj: Model, callback: Callable[[ObjectChange], Any]) -> None:
        db = obj._db
        assert db is not None
        self.obj = obj
        self.callback = callback
        self._schema = db._schemas[type(obj).__name__]
        cols = ", ".join(sv.quote(f.name) for f in self._schema.fields)
        self._sql = (
            f"SELECT {cols} FROM {sv.table_name(self._schema.name)} "
            f"WHERE {sv.quote(self._schema.primary_key)} = ?"
        )
        self._key = sv.scalar_to_sql(self._schema.pk_field.kind, obj._pk)
        self._row: tuple[Any, ...] | None = None

    def check_touched(self, conn: sqlite3.Connection, touched: Touched) -> None:
        """Skip commits that did not write this object."""
        keys = touched.get(self._schema.name, ())
        if keys is None or self._key in keys:
            self.check(conn)

    def snapshot(self, conn: sqlite3.Connection) -> None:
        self._row = conn.execute(self._sql, (self._key,)).fetchone()

    def check(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(self._sql, (self._key,)).fetchone()
        old = self._row
        if row == old:
            return
        self._row = row
        if row is None:
            self.cancelled = True
            self.callback(ObjectChange(self.obj, deleted=True))
            return
        if old is None:
            return
        changed = [f.name for f, a, b in zip(self._schema.fields, old, row) if a != b]
        self.callback(ObjectChange(self.obj, changed_fields=changed))


class Notifier:
    """The notifier thread of one database."""

    def __init__(self, db: LocalDatabase) -> None:
        self._path = db.path
        self._conn = sqlite3.connect(db.path, isolation_level=None, check_same_thread=False)
        register_functions(self._conn)
        self._lock = threading.Lock()
        self._listeners: list[_Listener] = []
        self._event = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tidesync-notifier", daemon=True)
        self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        self._seq = self._commit_seq()

    def _commit_seq(self) -> int:
        row = self._conn.execute("SELECT value FROM _meta WHERE key = 'commit_seq'").fetchone()
        return int(row[0] or 0) if row is not None else 0

    def start(self) -> None:
        """Start the thread."""
        add_waker(self._path, self._event)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; every listener is cancelled."""
        self._stopped = True
        self._event.set()
        remove_waker(self._path, self._event)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            for listener in self._listeners:
                listener.cancelled = True
            self._listeners.clear()
            self._conn.close()

    def poke(self) -> None:
        """Check for changes now."""
        self._event.set()

    def register(self, listener: _Listener) -> NotificationToken:
        """Take the listener's first snapshot and start reporting to it."""
        with self._lock:
            listener.snapshot(self._conn)
            self._listeners.append(listener)
        return NotificationToken(self, listener)

    def unregister(self, listener: _Listener) -> None:
        """Stop reporting to a listener."""
        listener.cancelled = True
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _run(self) -> None:
        while not self._stopped:
            self._event.wait(POLL_INTERVAL)
            self._event.clear()
            if self._stopped:
                break
            with self._lock:
                try:
                    version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.Error:  # closed under us
                    break
                if version == self._data_version:
                    continue
                try:
                    self._check_all()
                except sqlite3.Error:
                    log.exception("the notifier could not read the database")

    def _check_all(self) -> None:
        """One pass over the listeners, in one read transaction (one snapshot)."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            seq = self._commit_seq()  # starts the snapshot; data_version as of it:
            self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            touched = touched_between(self._path, self._seq, seq) if seq > self._seq else None
            self._seq = seq
            for listener in list(self._listeners):
                if listener.cancelled:
                    continue
                try:
                    if touched is None:
                        listener.check(conn)
                    else:
                        listener.check_touched(conn, touched)
                except Exception:
                    log.exception("a change listener failed")
                if listener.cancelled and listener in self._listeners:
                    self._listeners.remove(listener)
        finally:
            conn.execute("COMMIT")


class ChangeStream(AsyncIterator[Any]):
    """An async iterator fed by a listener; registered at creation, removed on close."""

    def __init__(self, register: Callable[[Callable[[Any], Any]], NotificationToken]) -> None:
        self._loop = stream_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._token = register(self._deliver)
        self._closed = False

    def _deliver(self, change: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, change)
        except RuntimeError:  # the loop is closed
            self._token.cancel()

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._token.is_cancelled and self._queue.empty():
            self._closed = True
            raise StopAsyncIteration
        getter = asyncio.ensure_future(self._queue.get())
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.1)
            if done:
                return getter.result()
            if self._token.is_cancelled and self._queue.empty():
                getter.cancel()
                self._closed = True
                raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the stream and its listener."""
        self._closed = True
        self._token.cancel()
