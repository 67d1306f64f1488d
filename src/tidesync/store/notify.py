"""Change notifications: a notifier thread per database that reports what each commit changed.

The notifier keeps its own SQLite connection to the file. After every commit (it is woken at
once by commits made in this process, and polls ``PRAGMA data_version`` for commits of other
processes), it re-runs each watched query and diffs the result against the last one it saw:
inserted and deleted positions, and positions whose object changed. Object listeners diff one
row. Callbacks run on the notifier thread; async streams hand changes to their event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import sqlvalues as sv
from .engine import add_waker, remove_waker
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


class ResultsListener(_Listener):
    """Diffs a query's rows after each commit."""

    def __init__(self, results: Results[Any], callback: Callable[[ResultsChange], Any]) -> None:
        self.results = results
        self.callback = callback
        self._pks: list[Any] = []
        self._rows: dict[Any, tuple[Any, ...]] = {}
        schema = results._schema
        self._pk_index = [f.name for f in schema.fields].index(schema.primary_key)

    def _load(self, conn: sqlite3.Connection) -> tuple[list[Any], dict[Any, tuple[Any, ...]]]:
        sql, params = self.results.snapshot_sql()
        rows = conn.execute(sql, params).fetchall()
        i = self._pk_index
        return [r[i] for r in rows], {r[i]: r for r in rows}

    def snapshot(self, conn: sqlite3.Connection) -> None:
        self._pks, self._rows = self._load(conn)

    def check(self, conn: sqlite3.Connection) -> None:
        pks, rows = self._load(conn)
        old_rows = self._rows
        if pks == self._pks and rows == old_rows:
            return
        deleted = [i for i, pk in enumerate(self._pks) if pk not in rows]
        inserted = [i for i, pk in enumerate(pks) if pk not in old_rows]
        modified = [i for i, pk in enumerate(pks) if pk in old_rows and old_rows[pk] != rows[pk]]
        self._pks, self._rows = pks, rows
        if deleted or inserted or modified:
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
                self._data_version = version
                listeners = list(self._listeners)
                for listener in listeners:
                    if listener.cancelled:
                        continue
                    try:
                        listener.check(self._conn)
                    except Exception:
                        log.exception("a change listener failed")
                    if listener.cancelled and listener in self._listeners:
                        self._listeners.remove(listener)


class ChangeStream(AsyncIterator[Any]):
    """An async iterator fed by a listener; registered at creation, removed on close."""

    def __init__(self, register: Callable[[Callable[[Any], Any]], NotificationToken]) -> None:
        self._loop = asyncio.get_running_loop()
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
