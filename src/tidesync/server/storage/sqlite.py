"""The embedded default server storage: one SQLite file, one connection, one worker thread.

stdlib :mod:`sqlite3` blocks, so every statement runs on a single thread the storage owns,
and each public coroutine hands that thread one whole unit of work (a transaction) and
awaits it. Uploads arriving while a commit runs are queued and integrated together in the
next transaction (group commit), so many clients share each ``fsync``. The file is in WAL
mode with ``synchronous=FULL``: a commit that returned survives a power cut.

One exception to the worker thread: a lone small upload that finds the server quiet (the
worker idle, no commit for a millisecond) is committed on the event loop at once
(``_integrate_now``), which spares it two thread hops (about a tenth of a write's latency on
loopback). Under load the worker commits as before, so uploads still share commits and
their decoding overlaps the ``fsync``. The worker is idle when every job handed to it has
finished (``_submitted == _finished``), and no job can be handed to it meanwhile: only the
event loop hands it jobs, and it is busy with the commit.

One process owns a file at a time. The layout is described in ``docs/storage.md``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ...core.changeset import Op
from ...core.merge import (
    LONE_HEAD,
    ObjectState,
    created_rows,
    created_rows_many,
    rows_of_creates,
    stored_state,
)
from ...core.packing import pack, pack_instructions, unpack
from ...core.query import BoundQuery
from ...core.schema import ModelSchema
from ...support.diskfull import is_disk_full
from ...support.gcpause import gc_paused
from ...support.sqlbatch import insert_rows
from .base import (
    BatchRejectedError,
    ByObject,
    ClientOwnershipError,
    CursorAheadError,
    HistoryTrimmedError,
    LogEntry,
    LogPage,
    MatchPage,
    ObjectKey,
    PackedStoredObject,
    RejectReason,
    ServerStorage,
    StorageError,
    StorageFullError,
    StoredObject,
    UploadBatch,
    UploadResult,
    apply_changesets,
    held_in,
    instructions_by_object,
    lone_creates,
    matches_everything,
    merge_schemas,
    only_new_creates,
    rechecked,
    select_new_changesets,
)

T = TypeVar("T")

#: The most instructions an upload committed on the event loop may hold (``_integrate_now``):
#: one user transaction's worth; a larger one is committed by the worker thread.
_NOW_MAX = 16
#: Seconds without a commit before an upload may be committed on the event loop: one that
#: follows another closely is part of a burst, which the worker's group commit serves.
_NOW_QUIET = 0.001

#: The file name :meth:`SQLiteStorage.in_folder` uses.
DEFAULT_FILENAME = "server.sqlite3"
#: The layout version written to ``meta``; a file with another one is refused.
FORMAT_VERSION = 1
#: How many log rows one ``read_log`` call looks at, at most (bounds excluded runs).
MAX_SCAN_ROWS = 10_000
_CHUNK = 500  # bound parameters per IN (...) query

_DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS apps (
    app TEXT PRIMARY KEY,
    latest_version INTEGER NOT NULL DEFAULT 0,
    total_bytes INTEGER NOT NULL DEFAULT 0,
    trimmed_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS schemas (
    app TEXT NOT NULL,
    model TEXT NOT NULL,
    definition TEXT NOT NULL,
    PRIMARY KEY (app, model)
);
CREATE TABLE IF NOT EXISTS clients (
    app TEXT NOT NULL,
    origin TEXT NOT NULL,
    user_id TEXT NOT NULL,
    last_version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, origin)
);
CREATE TABLE IF NOT EXISTS log (
    app TEXT NOT NULL,
    server_version INTEGER NOT NULL,
    origin TEXT NOT NULL,
    client_version INTEGER NOT NULL,
    instructions BLOB NOT NULL,
    size INTEGER NOT NULL,
    cum_size INTEGER NOT NULL,
    PRIMARY KEY (app, server_version)
);
CREATE TABLE IF NOT EXISTS objects (
    app TEXT NOT NULL,
    model TEXT NOT NULL,
    pk BLOB NOT NULL,
    state BLOB NOT NULL,
    vals BLOB,
    alive INTEGER NOT NULL,
    PRIMARY KEY (app, model, pk)
);
CREATE TABLE IF NOT EXISTS records (
    app TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (app, key)
);
CREATE TABLE IF NOT EXISTS leases (
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (app, name)
);
"""

#: Object rows are written many per statement (``support.sqlbatch.insert_rows``), each of
#: ``_OBJECT_WIDTH`` values.
_OBJECT_HEAD = "INSERT INTO objects (app, model, pk, state, vals, alive) VALUES"
_OBJECT_WIDTH = 6
_UPSERT_TAIL = (
    " ON CONFLICT (app, model, pk) DO UPDATE SET "
    "state = excluded.state, vals = excluded.vals, alive = excluded.alive"
)


class SQLiteStorage(ServerStorage):
    """Server storage in the SQLite file at ``path`` (its folder is created if missing).

    ``path`` names the database *file*; use :meth:`in_folder` to keep it in a data folder.
    SQLite adds ``-wal`` and ``-shm`` files next to it.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._executor: ThreadPoolExecutor | None = None
        #: used on the worker thread, and on the event loop while the worker is idle
        self._conn: sqlite3.Connection | None = None
        #: jobs handed to the worker (event loop only) and jobs it finished (worker only)
        self._submitted = 0
        self._finished = 0
        self._last_commit = 0.0  # time.perf_counter() when the last integration ended
        self._schemas: dict[str, dict[str, ModelSchema]] = {}  # as _conn
        self._pending: list[tuple[list[UploadBatch], asyncio.Future[list[UploadResult]]]] = []
        self._flush: asyncio.Future[list[UploadResult]] | None = None
        self._closing = False
        #: the recent history of each app as committed, so a download of what was just
        #: integrated is read on the event loop (no round trip to the worker thread).
        #: Event loop only; the worker leaves each group's log rows in ``_group_log``.
        self._tails: dict[str, _Tail] = {}
        self._group_log: tuple[list[_LogRow], dict[str, list[int]]] | None = None

    @classmethod
    def in_folder(cls, folder: str | Path) -> SQLiteStorage:
        """Storage in ``folder/server.sqlite3``."""
        return cls(Path(folder) / DEFAULT_FILENAME)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the worker thread, open the file, create the tables."""
        if self._executor is not None:
            raise StorageError("the storage is already open")
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidesync-sqlite")
        try:
            await self._run(self._open_sync)
        except BaseException:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True)
            raise

    async def close(self) -> None:
        """Finish queued uploads, close the connection and join the worker thread."""
        executor = self._executor
        if executor is None:
            return
        self._closing = True
        while self._flush is not None:
            await asyncio.wait([self._flush])
        try:
            await self._run(self._close_sync)
        finally:
            self._executor = None
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True)
            )

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if str(self._path) != ":memory:" and not self._path.exists():
            # owner-only, like the other files of the data folder (SQLite gives its -wal and
            # -shm files the database file's mode)
            self._path.touch(mode=0o600)
        # used by one thread at a time, not always the same one: see _integrate_now
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal" and str(self._path) != ":memory:":
                raise StorageError(f"{self._path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.executescript("BEGIN IMMEDIATE;" + _DDL + "COMMIT;")
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
            elif row[0] != str(FORMAT_VERSION):
                raise StorageError(
                    f"{self._path}: storage format {row[0]} is not supported "
                    f"(this version reads {FORMAT_VERSION})"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        self._schemas.clear()
        if conn is not None:
            conn.close()

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StorageError("the storage is not open")
        self._submitted += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._job, fn, *args)

    def _job(self, fn: Callable[..., T], *args: Any) -> T:
        """A unit of work on the worker thread; counted as finished once it is."""
        try:
            return self._guarded(fn, *args)
        finally:
            self._finished += 1  # the worker is the only writer of this counter

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self._schemas.clear()  # it may hold what a failed transaction wrote
            conn = self._conn
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            if is_disk_full(exc, str(self._path)):
                raise StorageFullError(
                    f"{self._path}: the disk is full ({exc}); nothing of it was stored"
                ) from exc
            raise StorageError(f"{self._path}: {exc}") from exc

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("the storage is not open")
        return self._conn

    def _transaction(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # -- clients and schemas --------------------------------------------------------------

    async def register_client(self, app_id: str, origin: str, user_id: str) -> int:
        """Register ``origin`` for ``user_id``; return its last integrated version."""
        return await self._run(self._transaction, _register_client, app_id, origin, user_id)

    async def client_version(self, app_id: str, origin: str) -> int:
        """The last client version of ``origin`` integrated (0 if none)."""
        return await self._run(self._client_version_sync, app_id, origin)

    async def client_known(self, app_id: str, origin: str) -> bool:
        """Was ``origin`` ever registered for ``app_id``?"""
        return await self._run(self._client_known_sync, app_id, origin)

    def _client_known_sync(self, app_id: str, origin: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM clients WHERE app = ? AND origin = ?", (app_id, origin)
        ).fetchone()
        return row is not None

    def _client_version_sync(self, app_id: str, origin: str) -> int:
        row = self._db.execute(
            "SELECT last_version FROM clients WHERE app = ? AND origin = ?", (app_id, origin)
        ).fetchone()
        return int(row[0]) if row else 0

    async def get_schemas(self, app_id: str) -> dict[str, ModelSchema]:
        """The app's models by name (empty for an unknown app)."""
        return dict(await self._run(self._schemas_sync, app_id))

    def _schemas_sync(self, app_id: str) -> dict[str, ModelSchema]:
        cached = self._schemas.get(app_id)
        if cached is None:
            rows = self._db.execute(
                "SELECT definition FROM schemas WHERE app = ? ORDER BY model", (app_id,)
            ).fetchall()
            cached = {}
            for (definition,) in rows:
                model = ModelSchema.from_dict(json.loads(definition))
                cached[model.name] = model
            self._schemas[app_id] = cached
        return cached

    async def put_schemas(self, app_id: str, schemas: list[ModelSchema]) -> dict[str, ModelSchema]:
        """Add new models and fields; return the merged set (see ``base.merge_schemas``)."""
        return dict(await self._run(self._transaction, self._put_schemas_txn, app_id, schemas))

    def _put_schemas_txn(
        self, conn: sqlite3.Connection, app_id: str, declared: list[ModelSchema]
    ) -> dict[str, ModelSchema]:
        self._schemas.pop(app_id, None)
        stored = self._schemas_sync(app_id)
        merged = merge_schemas(stored, declared)
        changed = [m for name, m in merged.items() if stored.get(name) != m]
        if changed:
            _ensure_app(conn, app_id)
            conn.executemany(
                "INSERT OR REPLACE INTO schemas (app, model, definition) VALUES (?, ?, ?)",
                [(app_id, m.name, json.dumps(m.to_dict())) for m in changed],
            )
            for model in changed:
                if model.name in stored:
                    _rerender(conn, app_id, model)
        self._schemas[app_id] = merged
        return merged

    # -- integration ----------------------------------------------------------------------

    async def integrate(self, batches: list[UploadBatch]) -> list[UploadResult]:
        """Integrate uploads durably; calls that arrive during a commit share the next one."""
        if self._executor is None or self._closing:
            raise StorageError("the storage is not open")
        if not batches:
            return []
        if (
            self._flush is None
            and self._submitted == self._finished
            and len(batches) == 1
            and sum(len(cs.instructions) for cs in batches[0].changesets) <= _NOW_MAX
            and time.perf_counter() - self._last_commit >= _NOW_QUIET
        ):
            return self._integrate_now(batches)
        waiter: asyncio.Future[list[UploadResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((list(batches), waiter))
        if self._flush is None:
            self._start_flush()
        return await waiter

    def _integrate_now(self, batches: list[UploadBatch]) -> list[UploadResult]:
        """Commit a lone small upload here, on the event loop, while the worker is idle
        (see the module's docstring); the event loop waits for its ``fsync``."""
        try:
            results: list[UploadResult] = self._guarded(
                self._transaction, self._integrate_txn, batches
            )
        except BaseException:
            self._integration_ended(ok=False)
            raise
        self._integration_ended(ok=True)
        return results

    def _integration_ended(self, *, ok: bool) -> None:
        """After an integration (event loop): note when, and add its log rows to the tails
        if it committed (they are dropped if it did not: the file is the truth)."""
        self._last_commit = time.perf_counter()
        committed, self._group_log = self._group_log, None
        if ok and committed is not None:
            self._extend_tails(*committed)
        else:
            self._tails.clear()

    def _start_flush(self) -> None:
        group, self._pending = self._pending, []
        assert self._executor is not None
        batches = [b for bs, _ in group for b in bs]
        self._submitted += 1
        job = asyncio.get_running_loop().run_in_executor(
            self._executor, self._job, self._transaction, self._integrate_txn, batches
        )
        self._flush = job
        job.add_done_callback(lambda done: self._flush_done(group, done))

    def _flush_done(
        self,
        group: list[tuple[list[UploadBatch], asyncio.Future[list[UploadResult]]]],
        job: asyncio.Future[list[UploadResult]],
    ) -> None:
        self._flush = None
        error: BaseException | None
        if job.cancelled():
            error = StorageError("the commit was cancelled")
        else:
            error = job.exception()
        self._integration_ended(ok=error is None)
        start = 0
        for bs, waiter in group:
            if not waiter.done():
                if error is not None:
                    waiter.set_exception(error)
                else:
                    waiter.set_result(job.result()[start : start + len(bs)])
            start += len(bs)
        if self._pending and self._executor is not None:
            self._start_flush()

    def _integrate_txn(self, conn: sqlite3.Connection, batches: list[UploadBatch]) -> list[Any]:
        self._group_log = None
        # First on the guess that the objects the uploads only CREATE are new (they are,
        # but for two devices creating one primary key): they are not looked up, and
        # their plain INSERT fails if one is stored after all. Then it is all undone and
        # done again, looking every object up. (The whole transaction is this: it is
        # rolled back and begun again. A savepoint would do, but it journals every write
        # of the transaction once more: 8 % of the push benchmark.)
        try:
            group = self._integrate_group(conn, batches, guess=True)
        except _GuessedWrong:
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            group = self._integrate_group(conn, batches, guess=False)
        self._group_log = (group.log_rows, group.apps)  # used once the COMMIT succeeded
        return group.results

    def _integrate_group(
        self, conn: sqlite3.Connection, batches: list[UploadBatch], guess: bool
    ) -> _Group:
        group = _Group(conn)
        with gc_paused:
            for batch in batches:
                group.results.append(self._integrate_batch(group, batch, guess))
            group.write()
        return group

    def _extend_tails(self, rows: list[_LogRow], apps: dict[str, list[int]]) -> None:
        """Add a committed group's log rows to the apps' tails (event loop)."""
        tails = self._tails
        for row in rows:
            app, version = row[0], row[1]
            tail = tails.get(app)
            if tail is None or tail.latest != version - 1:
                tail = tails[app] = _Tail(version - 1)
                while len(tails) > _TAIL_APPS:
                    del tails[next(iter(tails))]
            tail.rows.append(row)
            tail.bytes += row[5]
            tail.latest = version
        for app, (latest, total) in apps.items():
            tail = tails.get(app)
            if tail is None:
                continue
            if tail.latest != latest:  # cannot happen; be safe
                del tails[app]
                continue
            tail.total = total
            tail.trim()

    def _integrate_batch(self, group: _Group, batch: UploadBatch, guess: bool) -> UploadResult:
        app = batch.app_id
        last = group.client_last(app, batch.origin)
        if last is None:
            return UploadResult(
                batch.origin,
                0,
                [],
                f"origin {batch.origin} is not registered with app {app}",
                RejectReason.UNKNOWN_CLIENT,
            )
        schemas = self._schemas_sync(app)
        try:
            new = select_new_changesets(batch, last, schemas)
            if not new:
                return UploadResult(batch.origin, last, [])
            made = None
            if guess:  # the group's objects, in any form, are not new
                held = held_in(app, group.states, group.raw, group.fresh)
                made = only_new_creates(new, schemas, held)
            # (the transaction knows none of these objects: nothing to recheck on)
            if made is not None and rechecked(batch, new, {}) is new:
                # the same outcome as below, without the general passes
                fresh, keyed = made
                versions = group.append_log(app, batch.origin, new)
                created = {key: v for keys, v in zip(keyed, versions) for key in keys}
                group.set_client_last(app, batch.origin, last + len(new))
                group.keep_fresh(app, fresh)
                return UploadResult(batch.origin, last + len(new), versions, created=created)
            by_object = instructions_by_object(new)
            guessed = _guessed_new(by_object, schemas) if guess else set()
            seen: dict[ObjectKey, bytes] | None = None if batch.check is None else {}
            overlay = group.working_copies(app, by_object.keys(), guessed, seen)
            if seen is not None:  # the write check again, on what this transaction sees
                checked = rechecked(batch, new, seen)
                if checked is not new:
                    new = checked
                    by_object = instructions_by_object(new)
                    overlay = {k: v for k, v in overlay.items() if k in by_object}
                    guessed = {k for k in guessed if k in by_object}
            lone = {k: v for k, v in by_object.items() if len(v) == 1 and k not in overlay}
            fresh = _fresh_creates(by_object, schemas, overlay)
            unsure = [k for k in guessed if k not in fresh]  # not written by INSERT: look
            if unsure:
                more = group.working_copies(app, unsure)
                if seen is not None and not more.keys() <= seen.keys():
                    raise _GuessedWrong  # the recheck took a stored object for new: again
                overlay.update(more)
            apply_changesets(by_object, schemas, overlay)
        except BatchRejectedError as exc:
            return UploadResult(batch.origin, last, [], str(exc), exc.reason)
        versions = group.append_log(app, batch.origin, new)
        created = lone_creates(lone, (), new, versions)
        group.set_client_last(app, batch.origin, last + len(new))
        group.keep(app, schemas, overlay)
        group.keep_fresh(app, fresh)
        return UploadResult(batch.origin, last + len(new), versions, created=created)

    # -- reading --------------------------------------------------------------------------

    async def read_log(
        self, app_id: str, after: int, max_bytes: int, exclude_origin: str | None = None
    ) -> LogPage:
        """Entries after ``after``, up to about ``max_bytes`` (see ``ServerStorage``)."""
        if after < 0 or max_bytes < 0:
            raise ValueError("after and max_bytes must not be negative")
        tail = self._tails.get(app_id)
        if tail is not None and tail.start <= after and self._executor is not None:
            try:
                return tail.read(app_id, after, max_bytes, exclude_origin)
            except _NotInMemory:
                pass
        return await self._run(
            self._transaction, _read_log, app_id, after, max_bytes, exclude_origin
        )

    async def latest_version(self, app_id: str) -> int:
        """The app's latest server version (0 if none)."""
        return await self._run(self._latest_sync, app_id)

    def _latest_sync(self, app_id: str) -> int:
        return _app_row(self._db, app_id)[0]

    async def get_objects(self, app_id: str, model: str) -> dict[Any, dict[str, Any]]:
        """Primary key -> rendered values of every alive object of ``model``."""
        return await self._run(self._objects_sync, app_id, model)

    def _objects_sync(self, app_id: str, model: str) -> dict[Any, dict[str, Any]]:
        rows = self._db.execute(
            "SELECT pk, vals FROM objects WHERE app = ? AND model = ? AND alive = 1",
            (app_id, model),
        )
        return {unpack(pk): unpack(vals) for pk, vals in rows}

    # -- flexible sync ----------------------------------------------------------------------

    async def read_objects(
        self, app_id: str, model: str, after: bytes | None, limit: int
    ) -> list[StoredObject]:
        """Up to ``limit`` alive objects of ``model`` after packed pk ``after``, in pk order."""
        return await self._run(self._read_objects_sync, app_id, model, after, limit)

    def _read_objects_sync(
        self, app_id: str, model: str, after: bytes | None, limit: int
    ) -> list[StoredObject]:
        rows = self._db.execute(
            "SELECT pk, state, vals FROM objects WHERE app = ? AND model = ? AND alive = 1 "
            "AND pk > ? ORDER BY pk LIMIT ?",
            (app_id, model, after if after is not None else b"", max(1, limit)),
        ).fetchall()
        return [StoredObject(pk, stored_state(st, vals), unpack(vals)) for pk, st, vals in rows]

    async def read_matching(
        self,
        app_id: str,
        model: str,
        queries: Sequence[BoundQuery] | None,
        rule: BoundQuery | None,
        after: bytes | None,
        limit: int,
    ) -> MatchPage:
        """The next objects after ``after`` matching ``queries`` and ``rule`` (see
        ``ServerStorage.read_matching``). When every object matches (no read rule, and no
        query or a ``TRUEPREDICATE`` one: :func:`~.base.matches_everything`), nothing is
        evaluated and each object's values stay packed until first read (a bootstrap of
        everything only sends the states)."""
        if not matches_everything(queries, rule):
            return await super().read_matching(app_id, model, queries, rule, after, limit)
        return await self._run(self._read_all_sync, app_id, model, after, limit)

    def _read_all_sync(self, app_id: str, model: str, after: bytes | None, limit: int) -> MatchPage:
        limit = max(1, limit)
        with gc_paused:  # thousands of short-lived objects that form no cycles
            rows = self._db.execute(
                "SELECT pk, state, vals FROM objects WHERE app = ? AND model = ? AND alive = 1 "
                "AND pk > ? ORDER BY pk LIMIT ?",
                (app_id, model, after if after is not None else b"", limit),
            ).fetchall()
            head = LONE_HEAD
            hits: list[StoredObject] = [
                PackedStoredObject(pk, st + vals, vals, st[2:])
                if st[:2] == head
                else PackedStoredObject(pk, st, vals)
                for pk, st, vals in rows
            ]
        scanned = sum(len(row.state) for row in hits)
        return MatchPage(hits, rows[-1][0] if rows else after, scanned, len(rows) < limit)

    async def get_states(
        self, app_id: str, keys: Iterable[ObjectKey]
    ) -> dict[ObjectKey, StoredObject]:
        """The stored objects of ``keys`` (erased ones with ``values`` None)."""
        return await self._run(self._get_states_sync, app_id, list(keys))

    def _get_states_sync(self, app_id: str, keys: list[ObjectKey]) -> dict[ObjectKey, StoredObject]:
        return {
            (model, pk): StoredObject(
                pk, stored_state(state, vals), unpack(vals) if vals is not None else None
            )
            for model, pk, state, vals in self._rows_of(app_id, keys, "state, vals")
        }

    async def get_state_bytes(
        self, app_id: str, keys: Iterable[ObjectKey]
    ) -> dict[ObjectKey, bytes]:
        """The state bytes of ``keys`` (the values are not read)."""
        return await self._run(self._get_state_bytes_sync, app_id, list(keys))

    def _get_state_bytes_sync(self, app_id: str, keys: list[ObjectKey]) -> dict[ObjectKey, bytes]:
        return {
            (model, pk): stored_state(state, vals)
            for model, pk, state, vals in self._rows_of(app_id, keys, "state, vals")
        }

    def _rows_of(self, app_id: str, keys: list[ObjectKey], columns: str) -> Iterator[Any]:
        """``(model, pk, *columns)`` of the stored objects among ``keys``, by chunks."""
        by_model: dict[str, list[bytes]] = {}
        for model, pk in keys:
            by_model.setdefault(model, []).append(pk)
        for model, pks in by_model.items():
            for i in range(0, len(pks), _CHUNK):
                chunk = pks[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                yield from self._db.execute(
                    f"SELECT ?, pk, {columns} FROM objects WHERE app = ? AND model = ? "
                    f"AND pk IN ({marks})",
                    (model, app_id, model, *chunk),
                )

    async def objects_size(self, app_id: str, model: str) -> tuple[int, int]:
        """``(count, total state bytes)`` of the alive objects of ``model``."""
        return await self._run(self._objects_size_sync, app_id, model)

    def _objects_size_sync(self, app_id: str, model: str) -> tuple[int, int]:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(state) + "
            f"CASE WHEN substr(state, 1, 2) = x'{LONE_HEAD.hex()}' THEN LENGTH(vals) ELSE 0 END"
            "), 0) FROM objects "
            "WHERE app = ? AND model = ? AND alive = 1",
            (app_id, model),
        ).fetchone()
        return int(row[0]), int(row[1])

    # -- the backend API ------------------------------------------------------------------

    async def client_users(self, app_id: str, origins: Iterable[str]) -> dict[str, str]:
        """The user id of each registered origin of ``origins``."""
        wanted = sorted(set(origins))
        if not wanted:
            return {}
        return await self._run(self._client_users_sync, app_id, wanted)

    def _client_users_sync(self, app_id: str, origins: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for start in range(0, len(origins), _CHUNK):
            chunk = origins[start : start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT origin, user_id FROM clients WHERE app = ? AND origin IN ({marks})",
                (app_id, *chunk),
            ).fetchall()
            out.update((str(o), str(u)) for o, u in rows)
        return out

    async def get_record(self, app_id: str, key: str) -> str | None:
        """The durable value under ``key`` (None if none)."""
        return await self._run(self._get_record_sync, app_id, key)

    def _get_record_sync(self, app_id: str, key: str) -> str | None:
        row = self._db.execute(
            "SELECT value FROM records WHERE app = ? AND key = ?", (app_id, key)
        ).fetchone()
        return None if row is None else str(row[0])

    async def put_record(self, app_id: str, key: str, value: str) -> None:
        """Store ``value`` under ``key``, durably."""
        await self._run(self._transaction, _put_record, app_id, key, value)

    async def take_lease(self, app_id: str, name: str, holder: str, ttl: float) -> bool:
        """Hold the lease ``name`` for ``ttl`` seconds unless another holder's runs."""
        return await self._run(self._transaction, _take_lease, app_id, name, holder, ttl)

    async def drop_lease(self, app_id: str, name: str, holder: str) -> None:
        """Give up the lease ``name`` if ``holder`` holds it."""
        await self._run(self._transaction, _drop_lease, app_id, name, holder)

    # -- administration -------------------------------------------------------------------

    async def trim_history(self, app_id: str, before_version: int) -> int:
        """Delete log entries ``<= before_version`` (clamped to the latest)."""
        self._tails.pop(app_id, None)
        try:
            return await self._run(self._transaction, _trim, app_id, before_version)
        finally:
            self._tails.pop(app_id, None)

    async def wipe_app(self, app_id: str) -> None:
        """Delete all of the app's data."""
        self._tails.pop(app_id, None)
        try:
            await self._run(self._transaction, self._wipe_txn, app_id)
        finally:
            self._tails.pop(app_id, None)

    def _wipe_txn(self, conn: sqlite3.Connection, app_id: str) -> None:
        for table in ("objects", "log", "clients", "schemas", "apps", "records", "leases"):
            conn.execute(f"DELETE FROM {table} WHERE app = ?", (app_id,))
        self._schemas.pop(app_id, None)


class _GuessedWrong(Exception):
    """An object guessed new was stored already (see ``_integrate_txn``)."""


def _guessed_new(by_object: ByObject, schemas: dict[str, ModelSchema]) -> set[ObjectKey]:
    """The objects guessed new without a look: those the upload only CREATEs, of models
    whose creates are written with a plain INSERT (:func:`_fresh_creates`)."""
    plain = {name for name, schema in schemas.items() if rows_of_creates(schema)}
    return {
        key
        for key, items in by_object.items()
        if len(items) == 1 and key[0] in plain and items[0][1].op is Op.CREATE
    }


def _fresh_creates(
    by_object: ByObject, schemas: dict[str, ModelSchema], overlay: dict[ObjectKey, ObjectState]
) -> dict[ObjectKey, tuple[bytes, bytes]]:
    """The fast path for new objects: a key never stored (absent from ``overlay``) that this
    upload only CREATEs needs no merge; its state and values are encoded directly
    (:func:`~tidesync.core.merge.created_rows`). Such keys are removed from ``by_object``;
    returns key -> ``(state head, packed values)``."""
    fresh: dict[ObjectKey, tuple[bytes, bytes]] = {}
    by_model: dict[str, list[tuple[ObjectKey, Any, Any]]] = {}
    for key, items in by_object.items():
        if len(items) != 1 or key in overlay:
            continue
        cs, ins = items[0]
        if ins.op is not Op.CREATE:
            continue
        entries = by_model.get(key[0])
        if entries is None:
            entries = by_model[key[0]] = []
        entries.append((key, cs, ins))
    for model, entries in by_model.items():
        try:
            encoded = created_rows_many([ins for _, _, ins in entries], schemas[model])
        except (ValueError, TypeError):
            encoded = None
            for _, cs, ins in entries:  # find the changeset to name (rare)
                try:
                    created_rows(ins, schemas[model])
                except (ValueError, TypeError) as exc:
                    raise BatchRejectedError(
                        RejectReason.INVALID, f"changeset {cs.origin}#{cs.version}: {exc}"
                    ) from exc
            raise
        if encoded is not None:
            fresh.update(zip([key for key, _, _ in entries], encoded, strict=True))
    for key in fresh:
        del by_object[key]
    return fresh


class _Group:
    """The state of one group-commit transaction, written with batched SQL at the end."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.apps: dict[str, list[int]] = {}  # app -> [latest_version, total_bytes]
        self.clients: dict[tuple[str, str], int | None] = {}
        self.dirty_clients: set[tuple[str, str]] = set()
        self.raw: dict[tuple[str, str, bytes], bytes] = {}  # states as loaded from the file
        self.states: dict[tuple[str, str, bytes], ObjectState] = {}  # states this group changed
        self.schemas: dict[tuple[str, str, bytes], ModelSchema] = {}
        #: new objects (one CREATE): encoded states and values, no ObjectState built
        self.fresh: dict[tuple[str, str, bytes], tuple[bytes, bytes]] = {}
        self.log_rows: list[tuple[str, int, str, int, bytes, int, int]] = []
        self.results: list[UploadResult] = []

    def client_last(self, app: str, origin: str) -> int | None:
        key = (app, origin)
        if key not in self.clients:
            row = self.conn.execute(
                "SELECT last_version FROM clients WHERE app = ? AND origin = ?", key
            ).fetchone()
            self.clients[key] = int(row[0]) if row else None
        return self.clients[key]

    def set_client_last(self, app: str, origin: str, version: int) -> None:
        self.clients[(app, origin)] = version
        self.dirty_clients.add((app, origin))

    def working_copies(
        self,
        app: str,
        keys: Iterable[ObjectKey],
        guessed: set[ObjectKey] | frozenset[Any] = frozenset(),
        seen: dict[ObjectKey, bytes] | None = None,
    ) -> dict[ObjectKey, ObjectState]:
        """Private copies of the touched objects' states (absent = never stored). Objects
        in ``guessed`` are not looked up in the file (guessed new, see ``_integrate_txn``);
        ``seen`` gets the state bytes each copy was made from."""
        missing: dict[str, list[bytes]] = {}
        for key in keys:
            model, pk = key
            full = (app, model, pk)
            if full not in self.states and full not in self.raw and full not in self.fresh:
                if key not in guessed:
                    missing.setdefault(model, []).append(pk)
        for model, pks in missing.items():
            for i in range(0, len(pks), _CHUNK):
                chunk = pks[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = (
                    "SELECT pk, state, vals FROM objects "
                    f"WHERE app = ? AND model = ? AND pk IN ({marks})"
                )
                rows = self.conn.execute(sql, (app, model, *chunk))
                for pk, state, vals in rows:
                    self.raw[(app, model, pk)] = stored_state(state, vals)
        copies: dict[ObjectKey, ObjectState] = {}
        for model, pk in keys:
            full = (app, model, pk)
            if full in self.states:
                data = self.states[full].to_bytes()
            elif full in self.fresh:
                data = stored_state(*self.fresh[full])
            elif full in self.raw:
                data = self.raw[full]
            else:
                continue
            copies[(model, pk)] = ObjectState.from_bytes(data)
            if seen is not None:
                seen[(model, pk)] = data
        return copies

    def append_log(self, app: str, origin: str, changesets: list[Any]) -> list[int]:
        counters = self.apps.get(app)
        if counters is None:
            _ensure_app(self.conn, app)
            latest, total, _ = _app_row(self.conn, app)
            counters = self.apps[app] = [latest, total]
        versions: list[int] = []
        for cs in changesets:
            blob = pack_instructions(cs.instructions)
            counters[0] += 1
            counters[1] += len(blob)
            self.log_rows.append(
                (app, counters[0], origin, cs.version, blob, len(blob), counters[1])
            )
            versions.append(counters[0])
        return versions

    def keep(
        self, app: str, schemas: dict[str, ModelSchema], changed: dict[ObjectKey, ObjectState]
    ) -> None:
        for (model, pk), state in changed.items():
            self.states[(app, model, pk)] = state
            self.schemas[(app, model, pk)] = schemas[model]
            self.fresh.pop((app, model, pk), None)

    def keep_fresh(self, app: str, fresh: dict[ObjectKey, tuple[bytes, bytes]]) -> None:
        for (model, pk), encoded in fresh.items():
            self.fresh[(app, model, pk)] = encoded

    def write(self) -> None:
        conn = self.conn
        if self.log_rows:
            conn.executemany("INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?)", self.log_rows)
        if self.fresh:  # never stored (looked up, or guessed): a plain INSERT
            try:
                insert_rows(
                    conn,
                    _OBJECT_HEAD,
                    _OBJECT_WIDTH,
                    [(*k, st, vals, 1) for k, (st, vals) in self.fresh.items()],
                )
            except sqlite3.IntegrityError as exc:  # one guessed new is stored already
                raise _GuessedWrong from exc
        if self.states:
            insert_rows(
                conn,
                _OBJECT_HEAD,
                _OBJECT_WIDTH,
                [_object_row(k, s, self.schemas[k]) for k, s in self.states.items()],
                _UPSERT_TAIL,
            )
        if self.dirty_clients:
            conn.executemany(
                "UPDATE clients SET last_version = ? WHERE app = ? AND origin = ?",
                [(self.clients[k], *k) for k in self.dirty_clients],
            )
        if self.apps:
            conn.executemany(
                "UPDATE apps SET latest_version = ?, total_bytes = ? WHERE app = ?",
                [(latest, total, app) for app, (latest, total) in self.apps.items()],
            )


def _object_row(
    key: tuple[str, str, bytes], state: ObjectState, schema: ModelSchema
) -> tuple[Any, ...]:
    rendered = state.render(schema) if state.alive else None
    vals = pack(rendered) if rendered is not None else None
    return (*key, state.to_bytes(), vals, 1 if rendered is not None else 0)


def _rerender(conn: sqlite3.Connection, app: str, schema: ModelSchema) -> None:
    """Render a model's stored objects again after its schema gained fields."""
    rows = conn.execute(
        "SELECT pk, state, vals FROM objects WHERE app = ? AND model = ?", (app, schema.name)
    ).fetchall()
    insert_rows(
        conn,
        _OBJECT_HEAD,
        _OBJECT_WIDTH,
        [
            _object_row(
                (app, schema.name, pk), ObjectState.from_bytes(stored_state(st, vals)), schema
            )
            for pk, st, vals in rows
        ],
        _UPSERT_TAIL,
    )


def _ensure_app(conn: sqlite3.Connection, app: str) -> None:
    conn.execute("INSERT OR IGNORE INTO apps (app) VALUES (?)", (app,))


def _app_row(conn: sqlite3.Connection, app: str) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT latest_version, total_bytes, trimmed_version FROM apps WHERE app = ?", (app,)
    ).fetchone()
    return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)


def _register_client(conn: sqlite3.Connection, app: str, origin: str, user_id: str) -> int:
    row = conn.execute(
        "SELECT user_id, last_version FROM clients WHERE app = ? AND origin = ?", (app, origin)
    ).fetchone()
    if row is not None:
        if row[0] != user_id:
            raise ClientOwnershipError(f"client file {origin} of app {app} belongs to another user")
        return int(row[1])
    _ensure_app(conn, app)
    conn.execute(
        "INSERT INTO clients (app, origin, user_id, last_version) VALUES (?, ?, ?, 0)",
        (app, origin, user_id),
    )
    return 0


def _put_record(conn: sqlite3.Connection, app: str, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO records (app, key, value) VALUES (?, ?, ?) "
        "ON CONFLICT (app, key) DO UPDATE SET value = excluded.value",
        (app, key, value),
    )


def _take_lease(conn: sqlite3.Connection, app: str, name: str, holder: str, ttl: float) -> bool:
    now = time.time()
    row = conn.execute(
        "SELECT holder, expires FROM leases WHERE app = ? AND name = ?", (app, name)
    ).fetchone()
    if row is not None and row[0] != holder and float(row[1]) > now:
        return False
    conn.execute(
        "INSERT INTO leases (app, name, holder, expires) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (app, name) DO UPDATE SET holder = excluded.holder, "
        "expires = excluded.expires",
        (app, name, holder, now + ttl),
    )
    return True


def _drop_lease(conn: sqlite3.Connection, app: str, name: str, holder: str) -> None:
    conn.execute(
        "DELETE FROM leases WHERE app = ? AND name = ? AND holder = ?", (app, name, holder)
    )


#: A log row: app, server version, origin, client version, instructions, size, cum_size.
_LogRow = tuple[str, int, str, int, bytes, int, int]
#: Bytes of instructions a tail keeps (the oldest rows' are dropped first), rows a tail
#: keeps (past the byte budget without their instructions), and apps with a tail.
_TAIL_BYTES = 1 << 20
_TAIL_ROWS = 4096
_TAIL_APPS = 64


class _NotInMemory(Exception):
    """A tail read needs the instructions of a row the tail keeps without them."""


class _Tail:
    """The latest log rows of one app, exactly as committed (versions ``start + 1`` to
    ``latest``, contiguous), and the app's total bytes: enough to answer ``read_log``
    for a cursor ``>= start`` as :func:`_read_log` would.

    Past :data:`_TAIL_BYTES` the oldest rows keep everything but their instructions (the
    first ``bare`` rows): a read that excludes their origin (a device catching up on its
    own upload, i.e. its acknowledgement) is still answered from memory; one that needs
    their instructions raises :class:`_NotInMemory` and the file answers it."""

    __slots__ = ("bare", "bytes", "latest", "rows", "start", "total")

    def __init__(self, start: int) -> None:
        self.start = start
        self.latest = start
        self.rows: list[_LogRow] = []
        self.bare = 0
        self.bytes = 0
        self.total = 0

    def trim(self) -> None:
        """Drop the oldest rows' instructions beyond the byte budget (always keep the
        latest one's), and the oldest rows beyond the row budget."""
        rows = self.rows
        bare, size = self.bare, self.bytes
        while size > _TAIL_BYTES and bare < len(rows) - 1:
            app, version, origin, client_version, _, row_size, cum = rows[bare]
            rows[bare] = (app, version, origin, client_version, b"", row_size, cum)
            size -= row_size
            bare += 1
        self.bare, self.bytes = bare, size
        drop = len(rows) - _TAIL_ROWS
        if drop > 0:
            del rows[:drop]
            self.start += drop
            self.bare = max(0, bare - drop)

    def read(self, app: str, after: int, max_bytes: int, exclude: str | None) -> LogPage:
        """:func:`_read_log` from memory (``after >= start``); raises :class:`_NotInMemory`
        when it needs instructions the tail no longer keeps."""
        if after > self.latest:
            raise CursorAheadError(
                f"app {app}: cursor {after} is past the latest version {self.latest}"
            )
        return _page(self._rows(after, exclude), after, self.latest, self.total, max_bytes)

    def _rows(
        self, after: int, exclude: str | None
    ) -> Iterator[tuple[int, str, int, bytes | None, int, int]]:
        # by index: islice would step over every row before ``after`` (the whole tail, for
        # a device that is up to date), and a slice would copy all that follow it
        tail, bare = self.rows, self.bare
        for index in range(after - self.start, len(tail)):
            _, version, origin, client_version, blob, size, cum = tail[index]
            if origin == exclude:
                yield version, origin, client_version, None, size, cum
            elif index < bare:
                raise _NotInMemory
            else:
                yield version, origin, client_version, blob, size, cum


def _read_log(
    conn: sqlite3.Connection, app: str, after: int, max_bytes: int, exclude: str | None
) -> LogPage:
    latest, total, trimmed = _app_row(conn, app)
    if after > latest:
        raise CursorAheadError(f"app {app}: cursor {after} is past the latest version {latest}")
    if after < trimmed:
        raise HistoryTrimmedError(
            f"app {app}: history up to version {trimmed} was trimmed (cursor {after})", trimmed
        )
    rows = conn.execute(
        "SELECT server_version, origin, client_version, "
        "CASE WHEN origin = ? THEN NULL ELSE instructions END, size, cum_size "
        "FROM log WHERE app = ? AND server_version > ? ORDER BY server_version",
        (exclude, app, after),
    )
    try:
        return _page(rows, after, latest, total, max_bytes)
    finally:
        rows.close()


def _page(
    rows: Iterable[tuple[int, str, int, bytes | None, int, int]],
    after: int,
    latest: int,
    total: int,
    max_bytes: int,
) -> LogPage:
    """A :class:`LogPage` from log rows after ``after`` in version order, each
    ``(version, origin, client version, instructions or None when excluded, size,
    cumulative size)``: about ``max_bytes`` of entries, at most ``MAX_SCAN_ROWS`` rows."""
    entries: list[LogEntry] = []
    used = scanned = 0
    cursor, cursor_cum = after, total
    for version, origin, client_version, blob, size, cum in rows:
        if blob is not None:
            if entries and used + size > max_bytes:
                break
            entries.append(LogEntry(version, origin, client_version, blob))
            used += size
        cursor, cursor_cum = version, cum
        scanned += 1
        if scanned >= MAX_SCAN_ROWS or (entries and used >= max_bytes):
            break
    return LogPage(entries, cursor, latest, total - cursor_cum)


def _trim(conn: sqlite3.Connection, app: str, before_version: int) -> int:
    latest, _, trimmed = _app_row(conn, app)
    point = min(before_version, latest)
    if point <= trimmed:
        return 0
    deleted = conn.execute(
        "DELETE FROM log WHERE app = ? AND server_version <= ?", (app, point)
    ).rowcount
    conn.execute("UPDATE apps SET trimmed_version = ? WHERE app = ?", (point, app))
    return int(deleted)


__all__ = ["DEFAULT_FILENAME", "SQLiteStorage"]
