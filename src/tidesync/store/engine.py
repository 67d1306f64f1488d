"""``StoreEngine``: one SQLite connection to a local database file, and the operations on it.

Both the application's :class:`~tidesync.store.database.LocalDatabase` and the sync client
(on its own thread) drive a file through an engine of their own; SQLite's locking makes
their transactions serial. The engine applies instructions to objects' merge states
(``core/merge.py``), keeps each model's table (the query projection) in step with them,
and keeps the change log (the outbox that sync uploads) in the same transaction.

File layout: ``t_<Model>`` tables (see ``sqlvalues``), ``_dead`` (merge states of erased
objects, so late instructions still merge correctly), ``_changelog`` (one row per local
transaction: client version, packed instructions, size), ``_meta`` (origin id, clock,
cursors), ``_schema`` (the models' schemas as stored).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.changeset import Instruction, Op
from ..core.hlc import HLC, HybridClock
from ..core.merge import ObjectState
from ..core.packing import join_packed, pack, pack_instructions, packer, unpack
from ..core.schema import FieldSchema, Kind, ModelSchema, check_compatible, widened
from ..errors import DuplicatePrimaryKeyError, SchemaMismatchError, ValueTypeError
from ..support.sqlbatch import insert_rows
from . import sqlvalues as sv
from .sqlquery import register_functions

#: Process-wide wake-ups: every commit through any engine on a path sets these events,
#: so notifiers and sync sessions in this process react at once (other processes poll).
_WAKERS: dict[str, weakref.WeakSet[threading.Event]] = {}
_WAKERS_LOCK = threading.Lock()

#: The ``_meta`` values every commit updates, read once when a transaction begins.
_TX_META_SQL = (
    "SELECT key, value FROM _meta WHERE key IN "
    "('commit_seq', 'last_version', 'hlc', 'clock_offset', 'hlc_reserved')"
)


@functools.lru_cache(maxsize=16)
def _put_meta_sql(n: int) -> str:
    """An upsert of ``n`` ``_meta`` (key, value) pairs in one statement."""
    rows = ", ".join(["(?, ?)"] * n)
    return (
        f"INSERT INTO _meta(key, value) VALUES {rows} "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value"
    )


#: A model's new-row plan: its field names in column order, the positions and encoders
#: of the columns whose values need encoding (the others go as they are), and the
#: positions of its float columns (see ``sqlvalues``: only NaN and -0.0 are encoded).
_RowPlan = tuple[tuple[str, ...], tuple[tuple[int, Callable[[Any], Any]], ...], tuple[int, ...]]


def _row_params(plan: _RowPlan, values: dict[str, Any]) -> list[Any]:
    """A new object's ``insert_new`` parameters from its values, but for ``_hlc``."""
    names, encoded, floats = plan
    params = list(map(values.get, names))
    for i, encode in encoded:
        params[i] = encode(params[i])
    for i in floats:  # one cheap check per float; None passes it too
        v = params[i]
        if v != v or v == 0.0:
            params[i] = sv.special_float_to_sql(v)
    return params


def add_waker(path: str, event: threading.Event) -> None:
    """Have ``event`` set after every commit to ``path`` made in this process."""
    with _WAKERS_LOCK:
        _WAKERS.setdefault(path, weakref.WeakSet()).add(event)


def remove_waker(path: str, event: threading.Event) -> None:
    """Undo :func:`add_waker`."""
    with _WAKERS_LOCK:
        events = _WAKERS.get(path)
        if events is not None:
            events.discard(event)


#: Seconds a write transaction waits for another writer of the file (SQLite's busy timeout).
BUSY_TIMEOUT = 30.0


class _FileLock:
    """Serializes the write transactions on one file among the threads of this process.

    SQLite's own busy handler polls: a writer that finds the file locked sleeps 1 ms, then
    2, 5, 10 ... before it looks again, although the other writer (the sync thread applying
    a download, say) is usually done in tens of microseconds. Taking this lock first hands
    the file over at once. Other processes still meet SQLite's lock and busy timeout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def acquire(self) -> bool:
        """Wait for the lock. False (not taken) when this thread holds it already: SQLite
        then answers the nested ``BEGIN`` as it always did."""
        me = threading.get_ident()
        if self._owner == me:
            return False
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            raise sqlite3.OperationalError("database is locked")
        self._owner = me
        return True

    def release(self) -> None:
        self._owner = None
        self._lock.release()


_FILE_LOCKS: dict[str, _FileLock] = {}


def _file_lock(path: str) -> _FileLock:
    with _WAKERS_LOCK:
        lock = _FILE_LOCKS.get(path)
        if lock is None:
            lock = _FILE_LOCKS[path] = _FileLock()
        return lock


def wake(path: str, skip: object = None) -> None:
    """Set every event registered for ``path`` (but ``skip``: a committer's own waker)."""
    with _WAKERS_LOCK:
        events = list(_WAKERS.get(path, ()))
    for event in events:
        if event is not skip:
            event.set()


#: What a commit changed, for notifiers: model -> the SQL primary keys of the objects it
#: wrote, or ``None`` when there were too many to list (the notifier re-runs the query).
Touched = dict[str, "set[Any] | None"]

#: Most keys recorded per model and commit; bulk writes are reported as "many".
TOUCHED_MAX_KEYS = 256
#: Commits remembered per path (notifiers that fall further behind re-run their queries).
_COMMITS_KEPT = 256
#: Process-wide record of commits made through engines in this process:
#: path -> commit sequence number (``_meta.commit_seq``) -> what it touched (``None``:
#: not known exactly). A sequence number missing here was committed by another process.
_COMMITS: dict[str, dict[int, Touched | None]] = {}


def _record_commit(path: str, seq: int, touched: Touched | None) -> None:
    with _WAKERS_LOCK:
        commits = _COMMITS.setdefault(path, {})
        commits[seq] = touched
        while len(commits) > _COMMITS_KEPT:
            del commits[next(iter(commits))]


def touched_between(path: str, after: int, upto: int) -> Touched | None:
    """What commits ``after + 1`` to ``upto`` of ``path`` touched, merged; ``None`` when any
    of them is not known exactly (another process made it, or it is too old)."""
    if upto - after > _COMMITS_KEPT:
        return None
    merged: Touched = {}
    with _WAKERS_LOCK:
        commits = _COMMITS.get(path)
        if commits is None:
            return None
        for seq in range(after + 1, upto + 1):
            touched = commits.get(seq)
            if touched is None:
                return None
            for model, keys in touched.items():
                if model in merged:
                    have = merged[model]
                    if have is None or keys is None:
                        merged[model] = None
                    else:
                        merged[model] = have | keys
                else:
                    merged[model] = None if keys is None else set(keys)
    return merged


def now_ms() -> int:
    """This machine's wall-clock milliseconds, the clock input of HLCs (with the file's
    clock offset added: :meth:`StoreEngine.now`). Tests skew a device's clock by replacing
    this function (``tidesync.testing.devices.skew_clock``)."""
    return time.time_ns() // 1_000_000


def create_table_sql(schema: ModelSchema, schemas: dict[str, ModelSchema]) -> str:
    """The ``CREATE TABLE`` of a model's table (``schemas``: for the links' key types)."""
    cols = []
    for f in schema.fields:
        col = f"{sv.quote(f.name)} {sv.column_type(f, schemas)}"
        if f.primary_key:
            col += " PRIMARY KEY NOT NULL"
        cols.append(col)
    cols.append('"_state" BLOB')  # NULL: state = the create in "_hlc" + columns
    cols.append('"_hlc" BLOB')
    return f"CREATE TABLE {sv.table_name(schema.name)} ({', '.join(cols)})"


def index_sql(model: str, f: FieldSchema) -> str:
    """The ``CREATE INDEX`` of an indexed field."""
    return (
        f'CREATE INDEX IF NOT EXISTS "i_{model}_{f.name}" '
        f"ON {sv.table_name(model)}({sv.quote(f.name)})"
    )


class StoreEngine:
    """A connection to one local database file and the operations sync and the API need."""

    def __init__(
        self, path: str | Path, schemas: dict[str, ModelSchema], *, set_up: bool = True
    ) -> None:
        """Open ``path`` for ``schemas``. ``set_up=False`` only opens the connection: the
        caller then calls :meth:`set_up` (or migrates the file first, ``store/migration.py``)."""
        self.path = str(Path(path).resolve())
        self.schemas = dict(schemas)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        self._file_lock = _file_lock(self.path)
        self._locked = False  # this engine holds _file_lock
        register_functions(self.conn)
        self._tx_states: dict[tuple[str, Any], tuple[ObjectState, str | None]] = {}
        self.clock: HybridClock | None = None
        #: server time minus this machine's (ms), as the file's ``clock_offset`` holds it
        #: (read when a write transaction begins; see docs/merge.md, "Clocks")
        self.clock_offset = 0
        self.origin = ""
        self._sql: dict[str, dict[str, str]] = {}
        self._row_plans: dict[str, _RowPlan] = {}  # per model: see _row_params
        self._pk_pos: dict[str, int] = {}
        self._dead_models: dict[str, bool] = {}  # per transaction: has the model erased objects
        #: the connection is at synchronous = NORMAL (left so after a durable=False
        #: transaction, until the next durable one begins: see _begin_write)
        self._relaxed = False
        #: per transaction: _meta's commit_seq, last_version and hlc, read by begin()
        self._tx_meta: dict[str, Any] | None = None
        self._touched: Touched = {}  # per transaction: what it wrote, for notifiers
        #: models and fields downloads changed that this file lacks (see note_skipped)
        self._skipped_names: set[str] | None = None
        if set_up:
            try:
                self.set_up()
            except BaseException:
                self.conn.close()
                raise

    # --- set-up and schema ---------------------------------------------------------------

    def prepare_connection(self) -> None:
        """WAL mode (switched on for a new file), ``synchronous = FULL``, no foreign keys."""
        conn = self.conn
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._enable_wal()
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = OFF")

    def set_up(self, new_file_meta: dict[str, Any] | None = None) -> None:
        """Bring the file to the declared schemas (only additive changes: new models, new
        optional fields, indexes); :class:`SchemaMismatchError` before anything is written
        for anything else. ``new_file_meta``: ``_meta`` values a new file gets in the
        transaction that creates it (its schema version)."""
        conn = self.conn
        stored = self.stored_schemas()
        plan = self._plan_schema(stored)  # raises before anything is written
        self.prepare_connection()
        full = self._file_schemas(stored)
        definitions_changed = any(stored.get(n) != s for n, s in full.items())
        if plan or definitions_changed or self._declared_skips()[0]:
            with self.transaction():
                # Another process may have set the file up meanwhile: plan again under the lock.
                stored = self.stored_schemas()
                plan = self._plan_schema(stored)
                full = self._file_schemas(stored)
                self._create_base_tables()
                for statement in plan:
                    conn.execute(statement)
                self._refetch_skipped()
                for name, schema in full.items():
                    if stored.get(name) == schema:
                        continue
                    conn.execute(
                        "INSERT INTO _schema(model, definition) VALUES (?, ?) "
                        "ON CONFLICT(model) DO UPDATE SET definition = excluded.definition",
                        (name, json.dumps(schema.to_dict())),
                    )
                if conn.execute("SELECT value FROM _meta WHERE key='origin'").fetchone() is None:
                    conn.execute(
                        "INSERT INTO _meta(key, value) VALUES ('origin', ?)", (os.urandom(8).hex(),)
                    )
                    for key, value in (new_file_meta or {}).items():
                        self.set_meta(key, value)
        self.adopt_schemas(full)

    def adopt_schemas(self, schemas: dict[str, ModelSchema]) -> None:
        """Work on ``schemas`` from now on (the file's tables must match them): prepare
        their statements and read the file's origin id."""
        self.load_origin()
        self.schemas = dict(schemas)
        self._sql.clear()
        self._row_plans.clear()
        self._pk_pos.clear()
        for name in self.schemas:
            self._prepare_sql(name)

    def load_origin(self) -> None:
        """Read the file's origin id (the clock of :meth:`begin` needs it)."""
        self.origin = str(self.get_meta("origin"))

    def forget_states(self) -> None:
        """Drop the current transaction's cache of object states (after SQL that changed
        rows behind the engine's back, e.g. a migration's ``rename_field``)."""
        self._tx_states.clear()
        self._dead_models.clear()

    def _declared_skips(self) -> tuple[set[str], set[str]]:
        """The models and fields downloads skipped (:meth:`note_skipped`) that the declared
        models have, and all that were skipped (both empty if none)."""
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='_meta'"
        ).fetchone()
        if exists is None:  # a new file
            return set(), set()
        row = self.conn.execute("SELECT value FROM _meta WHERE key = 'skipped'").fetchone()
        if row is None or not row[0]:
            return set(), set()
        skipped = set(json.loads(row[0]))
        declared = set(self.schemas)
        declared.update(f"{n}.{f.name}" for n, s in self.schemas.items() for f in s.fields)
        return skipped & declared, skipped

    def _refetch_skipped(self) -> None:
        """The declared models have a model or field downloads skipped: download everything
        again (download cursor 0), so the file gets the server's values (the server sends
        the subscriptions' whole state again; what the file holds merges to the same)."""
        now, skipped = self._declared_skips()
        if now:
            self.set_meta("download_cursor", 0)
            self.set_meta("skipped", json.dumps(sorted(skipped - now)))

    def _file_schemas(self, stored: dict[str, ModelSchema]) -> dict[str, ModelSchema]:
        """Every model of the file as the data holds it: the declared models widened by the
        fields the file has and they leave out, and the models only the file has (an
        older release may open a newer one's file: those columns are kept and downloads
        keep them up to date; see docs/local-database.md)."""
        full = dict(stored)
        for name, schema in self.schemas.items():
            full[name] = widened(stored.get(name), schema)
        return full

    def _enable_wal(self) -> None:
        """Switch a new file to WAL mode. Several processes creating the same file at once
        can make this report "locked" at once (SQLite skips the busy handler here), so
        retry for up to the busy timeout."""
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def stored_schemas(self) -> dict[str, ModelSchema]:
        """The models' schemas as the file's ``_schema`` holds them (empty for a new file)."""
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='_schema'"
        ).fetchone()
        if not exists:
            return {}
        out: dict[str, ModelSchema] = {}
        for model, definition in self.conn.execute("SELECT model, definition FROM _schema"):
            out[model] = ModelSchema.from_dict(json.loads(definition))
        return out

    def _plan_schema(self, stored: dict[str, ModelSchema]) -> list[str]:
        """The DDL that brings the file to the declared schemas; raises on incompatibility."""
        statements: list[str] = []
        all_schemas = {**stored, **self.schemas}
        for name, schema in self.schemas.items():
            for f in schema.fields:
                if f.target is not None and f.target not in all_schemas:
                    raise SchemaMismatchError(
                        f"model {name}, field {f.name!r}: links to {f.target}, which is not "
                        "among the configured models"
                    )
        for name, schema in self.schemas.items():
            old = stored.get(name)
            table = sv.table_name(name)
            if old is None:
                statements.append(create_table_sql(schema, all_schemas))
                added = [f for f in schema.fields if f.indexed and not f.primary_key]
            else:
                new_fields = check_compatible(old, schema)
                for f in new_fields:
                    statements.append(
                        f"ALTER TABLE {table} ADD COLUMN {sv.quote(f.name)} "
                        f"{sv.column_type(f, all_schemas)}"
                    )
                added = [
                    f
                    for f in schema.fields
                    if f.indexed and not f.primary_key and not old.by_name.get(f.name, f).indexed
                ]
                added += [f for f in new_fields if f.indexed and f not in added]
            statements.extend(index_sql(name, f) for f in added)
        return statements

    def _create_base_tables(self) -> None:
        c = self.conn
        c.execute(
            "CREATE TABLE IF NOT EXISTS _schema (model TEXT PRIMARY KEY, definition TEXT NOT NULL)"
        )
        c.execute("CREATE TABLE IF NOT EXISTS _meta (key TEXT PRIMARY KEY, value)")
        c.execute(
            "CREATE TABLE IF NOT EXISTS _changelog (version INTEGER PRIMARY KEY, "
            "data BLOB NOT NULL, size INTEGER NOT NULL)"
        )
        c.execute(
            "CREATE TABLE IF NOT EXISTS _dead (model TEXT NOT NULL, pk BLOB NOT NULL, "
            "state BLOB NOT NULL, PRIMARY KEY (model, pk)) WITHOUT ROWID"
        )

    def _prepare_sql(self, model: str) -> None:
        schema = self.schemas[model]
        table = sv.table_name(model)
        fields = [sv.quote(f.name) for f in schema.fields]
        cols = [*fields, '"_state"']
        pk = sv.quote(schema.primary_key)
        sets = ", ".join(f"{c} = ?" for c in cols)
        self._sql[model] = {
            "insert": f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
            f"({', '.join('?' for _ in cols)})",
            "insert_new": f'INSERT INTO {table} ({", ".join(fields)}, "_hlc") VALUES '
            f"({', '.join('?' for _ in fields)}, ?)",
            # many rows per statement (support/sqlbatch.py): len(fields) + 1 values each
            "insert_new_head": f'INSERT INTO {table} ({", ".join(fields)}, "_hlc") VALUES',
            "update": f'UPDATE {table} SET {sets}, "_hlc" = NULL WHERE {pk} = ?',
            "delete": f"DELETE FROM {table} WHERE {pk} = ?",
            "state": f'SELECT "_state", "_hlc", {", ".join(fields)} FROM {table} WHERE {pk} = ?',
            "exists": f"SELECT 1 FROM {table} WHERE {pk} = ?",
            "row": f"SELECT {', '.join(fields)} FROM {table} WHERE {pk} = ?",
        }
        self._pk_pos[model] = [f.name for f in schema.fields].index(schema.primary_key)
        encoders = [sv.column_encoder(f, self.schemas) for f in schema.fields]
        floats = tuple(i for i, f in enumerate(schema.fields) if sv.is_float_column(f))
        self._row_plans[model] = (
            tuple(f.name for f in schema.fields),
            tuple(
                (i, enc)
                for i, enc in enumerate(encoders)
                if not sv.is_identity(enc) and i not in floats
            ),
            floats,
        )

    def sql(self, model: str, name: str) -> str:
        """A prepared statement text for a model."""
        return self._sql[model][name]

    # --- meta ----------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        """Read a value from ``_meta``."""
        row = self.conn.execute("SELECT value FROM _meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        """Write a value to ``_meta`` (inside the caller's transaction, or on its own)."""
        self.conn.execute(
            "INSERT INTO _meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- transactions --------------------------------------------------------------------

    def begin(self, *, durable: bool = True) -> None:
        """Start a write transaction (takes SQLite's write lock) and load the clock.

        ``durable=False`` commits it with ``synchronous = NORMAL`` (no ``fsync``; a power
        cut may lose it, never corrupt the file, and never keep a later durable commit
        without it: WAL frames are synced in order). Only for transactions whose loss is
        harmless: the sync client's download transactions (their changes and the download
        cursor are lost together, so they are simply downloaded again). Local writes are
        always durable."""
        self._begin_write(durable)
        try:
            self._tx_states.clear()
            self._dead_models.clear()
            self._touched = {}
            # the write lock is held: these stay as read until commit() writes them
            meta = self._tx_meta = dict(self.conn.execute(_TX_META_SQL).fetchall())
            raw = meta.get("hlc")
            last = None
            if raw:
                wall, counter = json.loads(raw)
                last = HLC(int(wall), int(counter), self.origin)
            self.clock_offset = int(meta.get("clock_offset") or 0)
            reserved = None
            raw = meta.get("hlc_reserved")
            if raw:
                r_wall, r_shift = json.loads(raw)
                reserved = (int(r_wall), int(r_shift))
            self.clock = HybridClock(self.origin, last, reserved)
        except BaseException:
            self.rollback()
            raise

    def _begin_write(self, durable: bool) -> None:
        """``BEGIN IMMEDIATE``, with ``synchronous = NORMAL`` for it unless ``durable``.

        The setting is changed only when it differs from the last transaction's: the sync
        client's connection, which applies download after download, stays at ``NORMAL``
        between them (two statements fewer each), and is set back to ``FULL`` before any
        durable transaction begins. Every write on an engine's connection is in a
        transaction begun here (outside them only idempotent ``CREATE ... IF NOT EXISTS``)."""
        if self._relaxed == durable:
            level = "FULL" if durable else "NORMAL"
            self.conn.execute(f"PRAGMA synchronous = {level}")
            self._relaxed = not durable
        self._begin_immediate()

    def _begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE`` under this process's lock of the file (see ``_FileLock``)."""
        taken = self._file_lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            if taken:
                self._file_lock.release()
            raise
        self._locked = self._locked or taken

    def _unlock(self) -> None:
        """Release the file lock once the transaction ended (committed or rolled back)."""
        if self._locked and not self.conn.in_transaction:
            self._locked = False
            self._file_lock.release()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A plain write transaction on the connection: ``BEGIN IMMEDIATE`` (under this
        process's lock of the file), ``COMMIT`` when the block ends, ``ROLLBACK`` if it
        raises. For bookkeeping tables; model writes use :meth:`begin`/:meth:`commit`.
        ``durable=False`` as for :meth:`begin` (for bookkeeping whose loss is harmless)."""
        conn = self.conn
        self._begin_write(durable)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._unlock()

    def commit(
        self,
        instructions: Sequence[Instruction],
        *,
        exact: bool = False,
        skip: object = None,
        packed: list[bytes] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int | None:
        """Record the change log entry (if anything changed) and commit.

        Returns the new client version, or ``None`` when the transaction changed nothing.
        ``exact=True`` promises that the transaction wrote model tables only through this
        engine's methods (``create``, ``apply``, ``save_state``), so notifiers in this
        process may look at just the objects it wrote; otherwise they re-run their queries.
        ``skip`` is a waker (see :func:`add_waker`) not to wake: the committer's own.
        ``packed`` gives the instructions already packed one by one (see
        :func:`~tidesync.core.packing.pack_instruction`) instead of ``instructions``.
        ``meta`` are more ``_meta`` values to write with the commit's own (one statement).
        """
        version: int | None = None
        seq = 0
        try:
            tx = self._tx_meta
            if tx is None:  # not begun by begin(): read them now
                tx = dict(self.conn.execute(_TX_META_SQL).fetchall())
            seq = int(tx.get("commit_seq") or 0) + 1
            values: list[tuple[str, Any]] = [("commit_seq", seq)]
            if instructions or packed:
                version = int(tx.get("last_version") or 0) + 1
                data = join_packed(packed) if packed else pack_instructions(list(instructions))
                self.conn.execute(
                    "INSERT INTO _changelog(version, data, size) VALUES (?, ?, ?)",
                    (version, data, len(data)),
                )
                values.append(("last_version", version))
            if self.clock is not None:
                last = self.clock.last
                values.append(("hlc", json.dumps([last.wall, last.counter])))
            if meta:
                values.extend(meta.items())
            self.conn.execute(_put_meta_sql(len(values)), [x for kv in values for x in kv])
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        finally:
            self._tx_states.clear()
            self._tx_meta = None
            self._unlock()
        _record_commit(self.path, seq, self._touched if exact else None)
        self._touched = {}
        wake(self.path, skip)
        return version

    def _touch(self, model: str, key: Any) -> None:
        """Note that the transaction wrote the object with SQL primary key ``key``."""
        touched = self._touched
        if model not in touched:
            touched[model] = {key}
            return
        keys = touched[model]
        if keys is not None:
            if len(keys) >= TOUCHED_MAX_KEYS:
                touched[model] = None
            else:
                keys.add(key)

    def rollback(self) -> None:
        """Abandon the current write transaction."""
        self._tx_states.clear()
        self._tx_meta = None
        self._skipped_names = None  # read again: the transaction's notes are gone
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self._unlock()

    def tick(self) -> HLC:
        """A new HLC for an instruction of the current transaction."""
        assert self.clock is not None, "no write transaction"
        return self.clock.tick(now_ms() + self.clock_offset)

    def now(self) -> int:
        """The time this file stamps with: this machine's clock plus the file's offset
        (as of the current or last write transaction)."""
        return max(0, now_ms() + self.clock_offset)

    # --- object states -------------------------------------------------------------------

    def load_state(self, model: str, pk: Any) -> tuple[ObjectState | None, str | None]:
        """The merge state of an object and where it lives: ``"live"``, ``"dead"`` or None."""
        key = (model, pk)
        cached = self._tx_states.get(key)
        if cached is not None:
            return cached
        schema = self.schemas[model]
        row = self.conn.execute(
            self._sql[model]["state"], (sv.scalar_to_sql(schema.pk_field.kind, pk),)
        ).fetchone()
        if row is not None:
            if row[0] is not None:
                state = ObjectState.from_bytes(row[0])
            else:  # created by a local CREATE and not changed since: rebuild it
                state = ObjectState.empty()
                values = {
                    f.name: sv.from_column(f, raw, self.schemas)
                    for f, raw in zip(schema.fields, row[2:])
                }
                wall, counter, origin = unpack(row[1])
                state.apply(
                    Instruction(Op.CREATE, model, pk, HLC(wall, counter, origin), None, values),
                    schema,
                )
            result: tuple[ObjectState | None, str | None] = (state, "live")
        elif self._has_dead(model):
            dead = self.conn.execute(
                "SELECT state FROM _dead WHERE model = ? AND pk = ?", (model, pack(pk))
            ).fetchone()
            result = (ObjectState.from_bytes(dead[0]), "dead") if dead else (None, None)
        else:
            result = (None, None)
        return result

    def _has_dead(self, model: str) -> bool:
        known = self._dead_models.get(model)
        if known is None:
            known = (
                self.conn.execute(
                    "SELECT 1 FROM _dead WHERE model = ? LIMIT 1", (model,)
                ).fetchone()
                is not None
            )
            if self.conn.in_transaction:
                self._dead_models[model] = known
        return known

    def _row_params(self, schema: ModelSchema, values: dict[str, Any]) -> list[Any]:
        schemas = self.schemas
        return [sv.to_column(f, values.get(f.name), schemas) for f in schema.fields]

    def save_state(self, model: str, pk: Any, state: ObjectState, where: str | None) -> str | None:
        """Write an object's state back: its table row if alive, ``_dead`` if erased."""
        schema = self.schemas[model]
        key_sql = sv.scalar_to_sql(schema.pk_field.kind, pk)
        self._touch(model, key_sql)
        values = state.render(schema)
        blob = state.to_bytes()
        new_where: str | None
        if values is not None:
            values[schema.primary_key] = pk
            params = self._row_params(schema, values)
            params.append(blob)
            if where == "live":
                params.append(key_sql)
                self.conn.execute(self._sql[model]["update"], params)
            else:
                if where == "dead":
                    self.conn.execute(
                        "DELETE FROM _dead WHERE model = ? AND pk = ?", (model, pack(pk))
                    )
                self.conn.execute(self._sql[model]["insert"], params)
            new_where = "live"
        else:
            if where == "live":
                self.conn.execute(self._sql[model]["delete"], (key_sql,))
            self.conn.execute(
                "INSERT INTO _dead(model, pk, state) VALUES (?, ?, ?) "
                "ON CONFLICT(model, pk) DO UPDATE SET state = excluded.state",
                (model, pack(pk), blob),
            )
            self._dead_models[model] = True
            new_where = "dead"
        self._tx_states[(model, pk)] = (state, new_where)
        return new_where

    def write_column(self, model: str, pk: Any, fs: FieldSchema, value: Any) -> bool:
        """Set one field of a live object in its column alone, its merge state restarting
        from its columns (``_state`` NULL, at its ``_hlc`` or a new one): for a local
        migration, whose writes are not synced. False if the object does not exist."""
        schema = self.schemas[model]
        key_sql = sv.scalar_to_sql(schema.pk_field.kind, pk)
        statements = self._sql[model]
        sql = statements.get(f"set:{fs.name}")
        if sql is None:
            sql = statements[f"set:{fs.name}"] = (
                f'UPDATE {sv.table_name(model)} SET {sv.quote(fs.name)} = ?, "_state" = NULL, '
                f'"_hlc" = COALESCE("_hlc", ?) WHERE {sv.quote(schema.primary_key)} = ?'
            )
        cursor = self.conn.execute(
            sql, (sv.to_column(fs, value, self.schemas), pack(self.tick()), key_sql)
        )
        self._tx_states.pop((model, pk), None)
        self._touch(model, key_sql)
        return cursor.rowcount > 0

    def create(self, ins: Instruction) -> None:
        """Apply a local CREATE of an object that must not exist yet.

        The fast path (no erased object with that key) writes the row alone: its merge state
        is implied by the columns and the create's HLC until something else changes it."""
        model, pk = ins.model, ins.pk
        if (model, pk) in self._tx_states or self._has_dead(model):
            state, where = self.load_state(model, pk)
            if where == "live":
                raise self._duplicate(model, pk)
            state = state or ObjectState.empty()
            state.apply(ins, self.schemas[model])
            self.save_state(model, pk, state, where)
            return
        params = _row_params(self._row_plans[model], ins.value)
        params.append(pack(ins.hlc))
        self._touch_row(model, params)
        try:
            self.conn.execute(self._sql[model]["insert_new"], params)
        except sqlite3.IntegrityError:
            raise self._duplicate(model, pk) from None
        except OverflowError:
            raise ValueTypeError(
                f"{model}: an int value is outside the 64-bit range tidesync stores"
            ) from None

    def _touch_many(self, model: str, keys: Sequence[Any]) -> None:
        """:meth:`_touch` for many SQL primary keys of ``model`` at once."""
        touched = self._touched
        if model not in touched:
            touched[model] = set()
        current = touched[model]
        if current is None:
            return
        current.update(keys)
        if len(current) > TOUCHED_MAX_KEYS:
            touched[model] = None

    def _touch_row(self, model: str, params: list[Any]) -> None:
        """:meth:`_touch` for an ``insert_new`` row (its primary key column's value)."""
        if self._touched.get(model, ()) is not None:
            self._touch(model, params[self._pk_pos[model]])

    @staticmethod
    def _duplicate(model: str, pk: Any) -> DuplicatePrimaryKeyError:
        return DuplicatePrimaryKeyError(
            f"a {model} with primary key {pk!r} exists (use add(obj, update=True))"
        )

    def apply(self, instructions: Sequence[Instruction]) -> None:
        """Apply instructions (local or downloaded) to their objects' states and rows.

        Fast path: a CREATE of an object this file has never held (no row, no erased state)
        is written like a local create (:meth:`create`: the row alone, its merge state
        implied by the columns and ``_hlc``), many rows per statement; everything else
        goes through the merge (load the state, apply, save). The loop is a whole-app
        download's per-object cost, so it reads each instruction once (a tuple unpacking)
        and encodes only the columns that need it (:func:`_row_params`)."""
        schemas = self.schemas
        absent = self._absent_creates(instructions)
        batch: dict[str, list[list[Any]]] = {}
        batched: set[tuple[str, Any]] = set()
        create = Op.CREATE
        pack_hlc = packer()
        plans = self._row_plans
        for ins in instructions:
            op, model, pk, hlc, field, value, _ = ins
            schema = schemas.get(model)
            if schema is None:
                self.note_skipped(model, None)  # a model neither the models nor the file have
                continue
            if op is create and type(value) is dict and len(value) > len(schema.fields):
                for name in value.keys() - schema.by_name.keys():  # a newer release's fields
                    self.note_skipped(model, name)
            key = (model, pk)
            if key in absent:
                if op is create and key not in batched and isinstance(value, dict):
                    params = _row_params(plans[model], value)
                    params.append(pack_hlc(hlc))
                    rows = batch.get(model)
                    if rows is None:
                        rows = batch[model] = []
                    rows.append(params)
                    batched.add(key)
                    continue
                absent.discard(key)
                if batched:  # the object's row must exist before its state is loaded
                    self._insert_new(batch)
                    batched.clear()
            if field is not None and field not in schema.by_name:
                self.note_skipped(model, field)  # a newer release's field this file never had
                continue
            state, where = self.load_state(model, pk)
            if state is None:
                state = ObjectState.empty()
            state.apply(ins, schema)
            self.save_state(model, pk, state, where)
        self._insert_new(batch)

    def note_skipped(self, model: str, field: str | None) -> None:
        """Note in ``_meta`` (``skipped``, inside the current transaction) that a download
        changed a model or field this file lacks: a later release that adds it downloads
        again (:meth:`_plan_schema`), so it sees the server's values."""
        name = model if field is None else f"{model}.{field}"
        known = self._skipped_names
        if known is None:
            raw = self.get_meta("skipped")
            known = self._skipped_names = set(json.loads(raw)) if raw else set()
        if name not in known:
            known.add(name)
            self.set_meta("skipped", json.dumps(sorted(known)))

    def _absent_creates(self, instructions: Sequence[Instruction]) -> set[tuple[str, Any]]:
        """Keys of CREATEs in ``instructions`` whose objects this file does not hold
        (models with erased objects are left to the merge: their states are in ``_dead``)."""
        by_model: dict[str, dict[Any, tuple[str, Any]]] = {}
        skipped: set[str] = set()  # models not declared, or with erased objects
        kinds: dict[str, Kind] = {}
        create, tx_states, to_sql = Op.CREATE, self._tx_states, sv.scalar_to_sql
        for ins in instructions:
            if ins[0] is create:
                model, pk = ins[1], ins[2]
                keys = by_model.get(model)
                if keys is None:
                    if model in skipped:
                        continue
                    if model not in self.schemas or self._has_dead(model):
                        skipped.add(model)
                        continue
                    keys = by_model[model] = {}
                    kinds[model] = self.schemas[model].pk_field.kind
                key = (model, pk)
                if key not in tx_states:
                    keys[to_sql(kinds[model], pk)] = key
        absent: set[tuple[str, Any]] = set()
        for model, keys in by_model.items():
            schema = self.schemas[model]
            table, pk_col = sv.table_name(model), sv.quote(schema.primary_key)
            present: set[Any] = set()
            raw = list(keys)
            for i in range(0, len(raw), 500):
                chunk = raw[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self.conn.execute(
                    f"SELECT {pk_col} FROM {table} WHERE {pk_col} IN ({marks})", chunk
                )
                present.update(r[0] for r in rows)
            absent.update(key for sql_pk, key in keys.items() if sql_pk not in present)
        return absent

    def present_keys(self, model: str, keys: Sequence[Any]) -> set[Any]:
        """Which of ``keys`` (SQL primary-key values of ``model``) have a row in its table;
        one ``SELECT ... IN`` per 500 keys."""
        table, pk_col = sv.table_name(model), sv.quote(self.schemas[model].primary_key)
        present: set[Any] = set()
        for i in range(0, len(keys), 500):
            chunk = list(keys[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT {pk_col} FROM {table} WHERE {pk_col} IN ({marks})", chunk
            )
            present.update(r[0] for r in rows)
        return present

    def _insert_new(self, batch: dict[str, list[list[Any]]]) -> None:
        """Write the rows :meth:`apply` batched, many per statement, and mark them for the
        notifiers (the lists in ``batch`` are emptied)."""
        for model, rows in batch.items():
            if rows:
                width = len(self.schemas[model].fields) + 1
                insert_rows(self.conn, self._sql[model]["insert_new_head"], width, rows)
                if self._touched.get(model, ()) is not None:
                    at = self._pk_pos[model]
                    self._touch_many(model, [row[at] for row in rows])
                rows.clear()

    def observe(self, hlc: HLC) -> None:
        """Move the clock past a downloaded timestamp (unless it is far ahead: see
        :meth:`~tidesync.core.hlc.HybridClock.observe`)."""
        if self.clock is not None:
            self.clock.observe(hlc, now_ms() + self.clock_offset)

    # --- change log ----------------------------------------------------------------------

    def read_changelog(self, after: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Local changesets with version > ``after``, in order, about ``max_bytes`` at most
        (always at least one if any)."""
        out: list[tuple[int, bytes]] = []
        total = 0
        for version, data, size in self.conn.execute(
            "SELECT version, data, size FROM _changelog WHERE version > ? ORDER BY version",
            (after,),
        ):
            if out and total + size > max_bytes:
                break
            out.append((version, data))
            total += size
        return out

    def pending_bytes(self, after: int) -> tuple[int, int]:
        """``(count, bytes)`` of local changesets with version > ``after``."""
        row = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM _changelog WHERE version > ?", (after,)
        ).fetchone()
        return int(row[0]), int(row[1])

    def changelog_sizes(self, after: int) -> list[tuple[int, int]]:
        """``(version, size)`` of the local changesets with version > ``after``, in order."""
        rows = self.conn.execute(
            "SELECT version, size FROM _changelog WHERE version > ? ORDER BY version", (after,)
        ).fetchall()
        return [(int(v), int(n)) for v, n in rows]

    def close_changelog_gap(self, acked: int) -> int:
        """Renumber the changesets after ``acked`` so the first follows it directly (after a
        client reset the server may expect a lower next version than the change log's first
        unacknowledged one); returns by how much they moved down (0: no gap)."""
        with self.transaction() as conn:
            first = conn.execute(
                "SELECT MIN(version) FROM _changelog WHERE version > ?", (acked,)
            ).fetchone()[0]
            last = int(self.get_meta("last_version", 0) or 0)
            gap = (int(first) if first is not None else last + 1) - (acked + 1)
            if gap > 0:
                conn.execute(
                    "UPDATE _changelog SET version = -(version - ?) WHERE version > ?",
                    (gap, acked),
                )
                conn.execute("UPDATE _changelog SET version = -version WHERE version < 0")
                self.set_meta("last_version", last - gap)
        return max(gap, 0)

    def close(self) -> None:
        """Close the connection (rolling back anything open)."""
        try:
            self.rollback()
        finally:
            self.conn.close()
