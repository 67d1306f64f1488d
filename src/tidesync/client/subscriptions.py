"""Flexible sync on the device: the subscription set, its states, and applying bootstraps.

``db.subscriptions`` is a :class:`SubscriptionSet`: the newest committed set of queries this
database wants from the server, persisted in the database file (table ``_sub_sets``: one row
per version with its state, error and packed subscriptions), so it survives restarts and is
re-sent on every BIND. ``with db.subscriptions.update() as subs:`` commits a new version
(PENDING) and hands it to the sync thread, which sends it as QUERY. The server answers with a
bootstrap (DOWNLOAD pages with ``bootstrap`` set, carrying whole objects); the state moves
PENDING -> BOOTSTRAPPING -> COMPLETE (older sets become SUPERSEDED), or to ERROR with the
server's message (QUERY_ERROR), while the previous set keeps syncing.

:class:`FlexApplier` is the sync-thread part: it applies the ``objects`` of a DOWNLOAD (whole
object states, merged with the device's own unacknowledged instructions, and evictions, which
drop an object locally without recording anything in the change log) and, at the end of a
bootstrap, evicts what the server did not send. See docs/flexible-sync.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import math
import sqlite3
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..core import query as q
from ..core.changeset import Instruction
from ..core.hlc import HLC
from ..core.merge import (
    ObjectState,
    SimpleState,
    simple_row_check,
    simple_state_reader,
    values_getter,
)
from ..core.packing import pack, packer, unpack, unpack_instructions
from ..core.schema import Collection, Kind, ModelSchema
from ..errors import CompensatingWriteError, OperationCancelledError, SubscriptionError
from ..objectid import ObjectId
from ..protocol.messages import (
    BOOTSTRAP_LAST,
    BOOTSTRAP_NONE,
    ObjectRows,
    ObjectUpdate,
    refused_of,
)
from ..store import sqlvalues as sv
from ..store.model import Model
from ..store.results import Results
from ..support.diskfull import disk_full_error
from .calls import awaitable, blocking_form

if TYPE_CHECKING:
    from ..store.engine import StoreEngine
    from .cancellation import CancellationToken
    from .database import Database

_TABLE = (
    "CREATE TABLE IF NOT EXISTS _sub_sets (version INTEGER PRIMARY KEY, state TEXT NOT NULL, "
    "error TEXT, subs BLOB NOT NULL)"
)
#: How often wait_for_synchronization looks at the set's state (seconds).
POLL_INTERVAL = 0.02


class SubscriptionSetState(enum.Enum):
    """Where a subscription set is on its way to the device."""

    PENDING = "pending"
    BOOTSTRAPPING = "bootstrapping"
    COMPLETE = "complete"
    ERROR = "error"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Subscription:
    """One query the device subscribes to: ``query`` with ``args`` over ``object_type``."""

    name: str | None
    object_type: str
    query: str
    args: tuple[Any, ...]
    created_at: float
    updated_at: float

    def _row(self) -> list[Any]:
        return [
            self.name,
            self.object_type,
            self.query,
            list(self.args),
            self.created_at,
            self.updated_at,
        ]

    @classmethod
    def _from_row(cls, row: list[Any]) -> Subscription:
        name, model, text, args, created, updated = row
        return cls(name, model, text, tuple(args), created, updated)


def query_of(results: Results[Any]) -> tuple[str, str, tuple[Any, ...]]:
    """``(model, query text, args)`` of a Results, narrowing included."""
    chain: list[Results[Any]] = []
    r: Results[Any] | None = results
    while r is not None:
        chain.append(r)
        r = r._parent
    chain.reverse()
    parsed, args = chain[0]._parsed, chain[0]._args
    for child in chain[1:]:
        parsed = q.conjoin(parsed, child._parsed, arg_offset=len(args))
        args = args + child._args
    return results.model.__name__, q.render(parsed), tuple(args)


def ensure_table(conn: sqlite3.Connection) -> None:
    """Create the subscription table if the file does not have it yet."""
    conn.execute(_TABLE)


def latest_row(
    conn: sqlite3.Connection, *, create: bool = True
) -> tuple[int, str, str | None, list[Subscription]]:
    """``(version, state, error, subscriptions)`` of the newest set (version 0: none);
    ``create`` makes the table first if the file lacks it."""
    if create:
        ensure_table(conn)
    row = conn.execute(
        "SELECT version, state, error, subs FROM _sub_sets ORDER BY version DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return 0, SubscriptionSetState.COMPLETE.value, None, []
    return int(row[0]), str(row[1]), row[2], [Subscription._from_row(x) for x in unpack(row[3])]


def stored_latest(
    conn: sqlite3.Connection,
) -> tuple[int, str, str | None, list[Subscription]] | None:
    """The newest set as :func:`latest_row` gives it, without creating anything (for a
    read-only look at a file); None if the file has never had a subscription set."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sub_sets'"
    ).fetchone()
    return None if exists is None else latest_row(conn, create=False)


def queries_of(subs: list[Subscription]) -> tuple[dict[str, list[str]], dict[str, list[list[Any]]]]:
    """The QUERY message's ``queries`` and ``args`` for a set."""
    queries: dict[str, list[str]] = {}
    args: dict[str, list[list[Any]]] = {}
    for s in subs:
        queries.setdefault(s.object_type, []).append(s.query)
        args.setdefault(s.object_type, []).append(list(s.args))
    return queries, args


class SubscriptionSet:
    """The newest subscription set of a synced database (``db.subscriptions``).

    Reading it (``len``, iteration, :meth:`find`, :meth:`find_by_name`, :attr:`state`,
    :attr:`error`) looks at the committed set; change it with :meth:`update`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _latest(self) -> tuple[int, str, str | None, list[Subscription]]:
        self._db._check_open()
        with self._db._lock:
            return latest_row(self._db._engine.conn)

    @property
    def version(self) -> int:
        """The newest set's version (0 before the first update)."""
        return self._latest()[0]

    @property
    def state(self) -> SubscriptionSetState:
        """The newest set's :class:`SubscriptionSetState`."""
        return SubscriptionSetState(self._latest()[1])

    @property
    def error(self) -> str | None:
        """The server's message when :attr:`state` is ERROR."""
        return self._latest()[2]

    def __len__(self) -> int:
        return len(self._latest()[3])

    def __iter__(self) -> Iterator[Subscription]:
        return iter(self._latest()[3])

    def find(self, results: Results[Any]) -> Subscription | None:
        """The subscription with the same model, query and arguments as ``results``."""
        model, text, args = query_of(results)
        for s in self._latest()[3]:
            if (s.object_type, s.query, s.args) == (model, text, args):
                return s
        return None

    def find_by_name(self, name: str) -> Subscription | None:
        """The subscription called ``name``."""
        for s in self._latest()[3]:
            if s.name == name:
                return s
        return None

    @contextmanager
    def update(self) -> Iterator[MutableSubscriptionSet]:
        """Change the set: committed as a new version (PENDING) when the block ends without
        an exception, then sent to the server."""
        subs = self._latest()[3]
        mutable = MutableSubscriptionSet(list(subs))
        yield mutable
        db = self._db
        db._check_open()
        try:
            with db._lock, db._engine.transaction() as conn:
                ensure_table(conn)
                row = conn.execute("SELECT MAX(version) FROM _sub_sets").fetchone()
                new_version = int(row[0] or 0) + 1
                conn.execute(
                    "INSERT INTO _sub_sets(version, state, error, subs) VALUES (?, ?, NULL, ?)",
                    (
                        new_version,
                        SubscriptionSetState.PENDING.value,
                        pack([s._row() for s in mutable._subs]),
                    ),
                )
        except sqlite3.Error as exc:  # rolled back by transaction()
            error = disk_full_error(exc, db.path, "subscriptions.update()")
            if error is not None:
                raise error from exc
            raise
        session = db._session
        if session is not None:
            worker = session._worker
            session._client.loop.call_soon_threadsafe(worker.send_query)

    @awaitable
    async def wait_for_synchronization(
        self, cancellation_token: CancellationToken | None = None
    ) -> None:
        """Wait until the server has sent all data of the newest set (COMPLETE); raise
        :class:`~tidesync.errors.SubscriptionError` with the server's message if it is in
        ERROR, :class:`~tidesync.errors.OperationCancelledError` if cancelled."""
        target = self.version
        while True:
            if cancellation_token is not None and cancellation_token.is_cancelled:
                raise OperationCancelledError("waiting for the subscriptions was cancelled")
            with self._db._lock:
                self._db._check_open()
                ensure_table(self._db._engine.conn)
                row = self._db._engine.conn.execute(
                    "SELECT state, error FROM _sub_sets WHERE version = ?", (target,)
                ).fetchone()
            if row is None:
                return  # version 0: nothing subscribed, nothing to wait for
            state = SubscriptionSetState(row[0])
            if state is SubscriptionSetState.ERROR:
                raise SubscriptionError(f"subscription set {target} was refused: {row[1]}")
            if state in (SubscriptionSetState.COMPLETE, SubscriptionSetState.SUPERSEDED):
                return
            await asyncio.sleep(POLL_INTERVAL)

    wait_for_synchronization_blocking = blocking_form(wait_for_synchronization)


class MutableSubscriptionSet:
    """The set inside ``with db.subscriptions.update() as subs:``."""

    def __init__(self, subs: list[Subscription]) -> None:
        self._subs = subs

    def __len__(self) -> int:
        return len(self._subs)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._subs))

    def add(
        self, results: Results[Any], name: str | None = None, update: bool = False
    ) -> Subscription:
        """Subscribe to ``results``. A name already used for another query raises
        :class:`~tidesync.errors.SubscriptionError` unless ``update`` (then it is replaced);
        adding an identical subscription again returns the existing one."""
        if not isinstance(results, Results):
            raise TypeError("subs.add() takes a Results (db.query(...) or db.all(...))")
        model, text, args = query_of(results)
        _check_args(args)
        now = time.time()
        for i, s in enumerate(self._subs):
            if name is not None and s.name == name:
                if (s.object_type, s.query, s.args) == (model, text, args):
                    return s
                if not update:
                    raise SubscriptionError(
                        f"a subscription named {name!r} exists with another query "
                        f"({s.object_type}: {s.query}); pass update=True to replace it"
                    )
                new = Subscription(name, model, text, args, s.created_at, now)
                self._subs[i] = new
                return new
            if (
                name is None
                and s.name is None
                and (s.object_type, s.query, s.args)
                == (
                    model,
                    text,
                    args,
                )
            ):
                return s
        new = Subscription(name, model, text, args, now, now)
        self._subs.append(new)
        return new

    def remove(self, results: Results[Any]) -> bool:
        """Remove the subscriptions with ``results``' query; True if any was removed."""
        model, text, args = query_of(results)
        before = len(self._subs)
        self._subs = [
            s for s in self._subs if (s.object_type, s.query, s.args) != (model, text, args)
        ]
        return len(self._subs) != before

    def remove_by_name(self, name: str) -> bool:
        """Remove the subscription called ``name``; True if it existed."""
        before = len(self._subs)
        self._subs = [s for s in self._subs if s.name != name]
        return len(self._subs) != before

    def remove_by_type(self, model: type[Model]) -> int:
        """Remove every subscription of ``model``; return how many."""
        before = len(self._subs)
        self._subs = [s for s in self._subs if s.object_type != model.__name__]
        return before - len(self._subs)

    def clear(self) -> None:
        """Remove every subscription."""
        self._subs = []


def _check_args(args: tuple[Any, ...]) -> None:
    try:
        pack(list(args))
    except (TypeError, ValueError) as exc:
        raise SubscriptionError(f"a subscription argument cannot be sent: {exc}") from exc


# ---------------------------------------------------------------------------------------
# sync thread side


def set_state(
    conn: sqlite3.Connection, version: int, state: SubscriptionSetState, error: str | None = None
) -> None:
    """Record a set's new state (inside the caller's transaction); COMPLETE supersedes the
    older sets that are not in ERROR."""
    ensure_table(conn)
    if state is SubscriptionSetState.BOOTSTRAPPING:
        conn.execute(
            "UPDATE _sub_sets SET state = ? WHERE version = ? AND state = ?",
            (state.value, version, SubscriptionSetState.PENDING.value),
        )
        return
    conn.execute(
        "UPDATE _sub_sets SET state = ?, error = ? WHERE version = ?", (state.value, error, version)
    )
    if state is SubscriptionSetState.COMPLETE:
        conn.execute(
            "UPDATE _sub_sets SET state = ? WHERE version < ? AND state != ?",
            (SubscriptionSetState.SUPERSEDED.value, version, SubscriptionSetState.ERROR.value),
        )


#: The Python types a column of each kind gives back exactly as they went in (None too).
_EXACT_TYPES: dict[Kind, type] = {
    Kind.BOOL: bool,
    Kind.INT: int,
    Kind.FLOAT: float,
    Kind.STR: str,
    Kind.BYTES: bytes,
    Kind.DATETIME: dt.datetime,
    Kind.DECIMAL: Decimal,
    Kind.UUID: uuid.UUID,
    Kind.OBJECTID: ObjectId,
}


#: Kinds whose column encoding is the value itself, as sqlite3 binds it (a bool binds as
#: the integer 1 or 0, which is what the column encoder of a bool gives).
_PLAIN_KINDS = frozenset((Kind.INT, Kind.FLOAT, Kind.STR, Kind.BYTES, Kind.BOOL))


class _FastSpec:
    """What the fast path needs about one model without collection or counter fields: per
    field (in column order) the value type its column gives back unchanged, and the
    encoders of the columns that do not store the value itself."""

    __slots__ = (
        "check",
        "encoders",
        "floats",
        "get",
        "names",
        "pack",
        "pk_name",
        "pk_pos",
        "read",
        "types",
    )

    def __init__(
        self,
        engine: StoreEngine,
        schema: ModelSchema,
        kinds: list[Kind],
        read: Callable[[bytes], SimpleState | None],
        check: Callable[[Any, Sequence[Any]], bool],
    ) -> None:
        self.read = read
        self.check = check
        self.pack = packer()  # the spec is its applier's, used by one sync thread
        names = [f.name for f in schema.fields]
        self.names = names
        self.get = values_getter(names)
        self.types = tuple(_EXACT_TYPES[k] for k in kinds)
        self.floats = tuple(i for i, k in enumerate(kinds) if k is Kind.FLOAT)
        self.encoders = tuple(
            (i, enc) for i, enc in engine._row_plans[schema.name][1] if kinds[i] not in _PLAIN_KINDS
        )
        self.pk_name = schema.primary_key
        self.pk_pos = engine._pk_pos[schema.name]

    def row(self, obj: ObjectUpdate) -> tuple[list[Any], list[Any]] | None:
        """The ``insert_new`` parameters and create HLC (as ``[wall, counter, origin]``) of
        ``obj`` if its state is a lone create whose values survive the columns exactly (so
        the row alone implies it)."""
        assert obj.state is not None
        got = self.read(obj.state)
        if got is None:
            return None
        created, values = got
        pk = values[self.pk_name]
        if type(pk) is not type(obj.pk) or pk != obj.pk:
            return None  # the slow path would keep the state's own pk value
        return self.params(created, self.get(values))

    def params(self, created: list[Any], row: Sequence[Any]) -> tuple[list[Any], list[Any]] | None:
        """The ``insert_new`` parameters of the values ``row`` (column order) of an object
        created at ``created`` (checked already), and ``created``; None if a column would
        not give a value back exactly."""
        if tuple(map(type, row)) != self.types:  # some None, or a value of another type
            for v, typ in zip(row, self.types, strict=True):
                if v is not None and type(v) is not typ:
                    return None
        for i in self.floats:  # NaN and -0.0 need their column encoding (sqlvalues)
            v = row[i]
            if v is not None and (v != v or (v == 0.0 and math.copysign(1.0, v) < 0)):
                return None
        params = list(row)
        for i, enc in self.encoders:
            params[i] = enc(params[i])
        params.append(self.pack(created))  # a list packs as the HLC tuple does
        return params, created


def _fast_spec(engine: StoreEngine, schema: ModelSchema) -> _FastSpec | None:
    """The model's :class:`_FastSpec`, or None if it has a collection or counter field."""
    kinds: list[Kind] = []
    for f in schema.fields:
        if f.collection is not Collection.NONE:
            return None
        kind = sv.scalar_kind(f, engine.schemas)
        if kind not in _EXACT_TYPES:
            return None
        kinds.append(kind)
    read = simple_state_reader(schema)
    check = simple_row_check(schema)
    if read is None or check is None:
        return None
    return _FastSpec(engine, schema, kinds, read, check)


class _PendingLog:
    """This device's unacknowledged instructions by object, kept in step with the change
    log: rows are appended with growing versions and dropped from the front as the server
    acknowledges them, so each changeset is read and unpacked once."""

    __slots__ = ("acked", "by_key", "newest", "versions")

    def __init__(self, acked: int) -> None:
        self.acked = acked
        #: the cached changesets (version > acked), oldest first
        self.versions: deque[tuple[int, Sequence[Instruction]]] = deque()
        #: the greatest version read so far
        self.newest = acked
        self.by_key: dict[tuple[str, Any], list[Instruction]] = {}

    def drop_upto(self, acked: int) -> None:
        """Forget the changesets with version <= ``acked``."""
        self.acked = max(self.acked, acked)
        gone: Counter[tuple[str, Any]] = Counter()
        versions = self.versions
        while versions and versions[0][0] <= acked:
            for ins in versions.popleft()[1]:
                gone[(ins.model, ins.pk)] += 1
        by_key = self.by_key
        for key, n in gone.items():
            rest = by_key[key]
            del rest[:n]  # a key's instructions are in version order
            if not rest:
                del by_key[key]

    def extend(self, rows: Iterable[tuple[int, bytes]], origin: str) -> None:
        """Add changesets newer than every cached one, in version order."""
        by_key = self.by_key
        for version, data in rows:
            instructions = unpack_instructions(data, origin)
            self.versions.append((version, instructions))
            self.newest = version
            for ins in instructions:
                key = (ins.model, ins.pk)
                have = by_key.get(key)
                if have is None:
                    by_key[key] = [ins]
                else:
                    have.append(ins)

    def matches(self, low: int | None, high: int | None, count: int) -> bool:
        """True if the cached changesets are those the change log holds (``MIN``, ``MAX``
        and ``COUNT`` of its versions above ``acked``)."""
        versions = self.versions
        if len(versions) != count:
            return False
        return count == 0 or (versions[0][0] == low and versions[-1][0] == high)


class FlexApplier:
    """Applies flexible sync's whole objects and bootstraps to one local file (sync thread)."""

    def __init__(self, engine: StoreEngine) -> None:
        self.engine = engine
        #: Keys received by the bootstrap in progress, as ``(model, the primary key as its
        #: column holds it)`` (None: no bootstrap in progress).
        self.received: set[tuple[str, Any]] | None = None
        #: The set version of the bootstrap ``received`` belongs to.
        self._receiving = 0
        self._log: _PendingLog | None = None
        self._specs: dict[str, tuple[ModelSchema, _FastSpec | None]] = {}

    def reset(self) -> None:
        """A new binding: a bootstrap cut short by a disconnect starts over (and the change
        log, which a client reset rewrites, is read again)."""
        self.received = None
        self._log = None

    def flexible(self) -> bool:
        """True once the file has a subscription set: BIND then asks for flexible sync."""
        return self.latest_query()[0] > 0

    def download_state(self) -> SubscriptionSetState:
        """The newest set's state, for download progress: PENDING (the data it asks for is
        unknown yet), BOOTSTRAPPING (pages are arriving) or COMPLETE (also: no set, ERROR,
        SUPERSEDED, i.e. nothing outstanding beyond what the server reports)."""
        ensure_table(self.engine.conn)
        row = self.engine.conn.execute(
            "SELECT state FROM _sub_sets ORDER BY version DESC LIMIT 1"
        ).fetchone()
        state = SubscriptionSetState(row[0]) if row is not None else SubscriptionSetState.COMPLETE
        if state in (SubscriptionSetState.PENDING, SubscriptionSetState.BOOTSTRAPPING):
            return state
        return SubscriptionSetState.COMPLETE

    def latest_query(self) -> tuple[int, dict[str, list[str]], dict[str, list[list[Any]]]]:
        """``(version, queries, args)`` of the newest set, for QUERY."""
        version, _, _, subs = latest_row(self.engine.conn)
        queries, args = queries_of(subs)
        return version, queries, args

    def apply(
        self,
        objects: list[ObjectUpdate],
        bootstrap: int,
        query_version: int,
        upload_acked: int,
        rows: Sequence[ObjectRows] = (),
    ) -> None:
        """Apply a DOWNLOAD's rows, objects and bootstrap flag (inside the caller's
        transaction)."""
        engine = self.engine
        if bootstrap != BOOTSTRAP_NONE and (
            self.received is None or query_version != self._receiving
        ):
            # a page of a newer set: the server gave up the bootstrap in progress (a newer
            # set replaced it) and scans again from the start; what the old one sent is
            # not the new set's, so the end of the new bootstrap must not keep it
            self.received = set()
            self._receiving = query_version
            if query_version:
                set_state(engine.conn, query_version, SubscriptionSetState.BOOTSTRAPPING)
        if objects or rows or bootstrap == BOOTSTRAP_LAST:
            pending = self._pending(upload_acked)
        else:
            pending = {}
        newest: list[Any] | None = None
        if rows:
            slow, newest = self._apply_rows(rows, pending)
            if slow:
                objects = slow + objects  # the rows come first
        # New objects whose state the row alone implies, written first and in one go: each
        # is the first update of its key here, so nothing before it touches that object.
        fast = self._fast_rows(objects, pending)
        if fast:
            by_model: dict[str, list[tuple[list[Any], list[Any]]]] = {}
            for i, made in fast.items():
                by_model.setdefault(objects[i].model, []).append(made)
            for model, made_rows in by_model.items():
                newest = self._write_rows(model, made_rows, newest)
        greatest = None if newest is None else HLC(*newest)
        if not fast:
            rest = objects
        elif len(fast) == len(objects):
            rest = []  # a bootstrap page of new objects: all written above
        else:
            rest = [o for i, o in enumerate(objects) if i not in fast]
        for obj in rest:
            schema = engine.schemas.get(obj.model)
            if schema is None:
                continue
            if obj.state is None:
                self._evict(obj.model, obj.pk)
                continue
            state = ObjectState.from_bytes(obj.state)
            if not state.fields.keys() <= schema.by_name.keys():  # a newer release's field
                for name in state.fields.keys() - schema.by_name.keys():
                    engine.note_skipped(obj.model, name)  # (see StoreEngine.note_skipped)
            for ins in pending.get((obj.model, obj.pk), ()):
                state.apply(ins, schema)
            _, where = engine.load_state(obj.model, obj.pk)
            engine.save_state(obj.model, obj.pk, state, where)
            last = state.last_hlc
            if greatest is None or last > greatest:
                greatest = last
            if self.received is not None:
                self.received.add((obj.model, sv.scalar_to_sql(schema.pk_field.kind, obj.pk)))
        if greatest is not None and greatest.wall:
            engine.observe(greatest)  # once: the clock only moves past the greatest
        if bootstrap == BOOTSTRAP_LAST:
            received = self.received or set()
            self.received = None
            # compared as the columns hold the keys: only an evicted key is converted
            schemas = engine.schemas
            mine = {
                (m, sv.scalar_to_sql(schemas[m].pk_field.kind, pk))
                for m, pk in pending
                if m in schemas
            }
            kept: dict[str, set[Any]] = {}
            for model, raw in (*received, *mine):
                kept.setdefault(model, set()).add(raw)
            for model, schema in schemas.items():
                table = sv.table_name(model)
                pk_col = sv.quote(schema.primary_key)
                stored = engine.conn.execute(f"SELECT {pk_col} FROM {table}")
                gone = {raw for (raw,) in stored}
                gone.difference_update(kept.get(model, ()))
                for raw in gone:
                    self._evict(model, sv.from_column(schema.pk_field, raw, schemas))
            if query_version:
                set_state(engine.conn, query_version, SubscriptionSetState.COMPLETE)

    def _pending(self, upload_acked: int) -> dict[tuple[str, Any], list[Instruction]]:
        """This device's instructions the server has not acknowledged, by object (the
        caller must not change it: it is cached, and only the changesets written or
        acknowledged since the last call are read or dropped)."""
        conn = self.engine.conn
        low, high, count = conn.execute(
            "SELECT MIN(version), MAX(version), COUNT(*) FROM _changelog WHERE version > ?",
            (upload_acked,),
        ).fetchone()
        log = self._log
        if log is None or upload_acked < log.acked:
            log = self._log = _PendingLog(upload_acked)
        log.drop_upto(upload_acked)
        select = "SELECT version, data FROM _changelog WHERE version > ? ORDER BY version"
        origin = self.engine.origin
        if high is not None and high > log.newest:
            log.extend(conn.execute(select, (max(log.newest, upload_acked),)), origin)
        if not log.matches(low, high, count):  # rewritten under us: read it all again
            log = self._log = _PendingLog(upload_acked)
            log.extend(conn.execute(select, (upload_acked,)), origin)
        return log.by_key

    def _apply_rows(
        self, blocks: Sequence[ObjectRows], pending: dict[tuple[str, Any], list[Instruction]]
    ) -> tuple[list[ObjectUpdate], list[Any] | None]:
        """Write the rows of ``blocks`` that are new objects the row alone implies, as
        :meth:`_fast_rows` does for object updates: absent from the file and from the
        transaction's states, first of their key, without pending instructions, of a model
        without erased objects whose columns are the block's fields and keep its values
        exactly. Returns the object updates the other rows stand for (to apply as such,
        in order, before the DOWNLOAD's objects) and the greatest create HLC written (as
        ``[wall, counter, origin]``), if any."""
        engine = self.engine
        tx_states = engine._tx_states
        newest: list[Any] | None = None
        slow: list[ObjectUpdate] = []
        for block in blocks:
            model = block.model
            schema = engine.schemas.get(model)
            if schema is None:
                continue  # as an object update of a model this file does not have
            spec = None if engine._has_dead(model) else self._spec(model, schema)
            if spec is None or block.fields != spec.names or block.pk != spec.pk_pos:
                slow += block.updates()
                continue
            pk_at, pk_pos, check, params_of = block.pk + 1, spec.pk_pos, spec.check, spec.params
            fresh: dict[Any, tuple[list[Any], list[Any], int]] = {}
            later: list[int] = []  # the rows to apply as object updates, by index
            for index, row in enumerate(block.rows):
                key = (model, row[pk_at])
                try:
                    mine = key in pending or key in tx_states
                    created = unpack(row[0])
                except (TypeError, ValueError):  # an unhashable key, a malformed HLC
                    mine, created = True, None
                values = row[1:]
                made = None if mine or not check(created, values) else params_of(created, values)
                if made is None or made[0][pk_pos] in fresh:
                    later.append(index)
                    continue
                fresh[made[0][pk_pos]] = (made[0], created, index)
            for sql_key in engine.present_keys(model, list(fresh)):
                later.append(fresh.pop(sql_key)[2])
            slow += [block.update(block.rows[index]) for index in sorted(later)]
            newest = self._write_rows(model, [made[:2] for made in fresh.values()], newest)
        return slow, newest

    def _write_rows(
        self, model: str, rows: list[tuple[list[Any], list[Any]]], newest: list[Any] | None
    ) -> list[Any] | None:
        """Insert new objects of ``model`` as rows, each ``(insert_new parameters, create
        HLC as [wall, counter, origin])``, marked for the notifiers and received by the
        bootstrap; returns the greatest of ``newest`` and their create HLCs."""
        if not rows:
            return newest
        engine = self.engine
        pk_pos = engine._pk_pos[model]
        batch = [params for params, _ in rows]
        keys = [params[pk_pos] for params in batch]
        top = max(created for _, created in rows)
        if newest is None or top > newest:
            newest = top
        if self.received is not None:
            self.received.update([(model, key) for key in keys])
        engine._insert_new({model: batch})  # marks the rows for the notifiers too
        return newest

    def _fast_rows(
        self, objects: list[ObjectUpdate], pending: dict[tuple[str, Any], list[Instruction]]
    ) -> dict[int, tuple[list[Any], list[Any]]]:
        """The objects (by index) that can be written as rows alone, like local creates:
        the first update of a key in ``objects``, absent from the file and from the
        transaction's states, without pending instructions, of a model without erased
        objects, collection or counter fields, whose state is a lone create
        (:func:`~tidesync.core.merge.simple_state`) with values the columns keep exactly.
        Their ``insert_new`` parameters and create HLCs (as ``[wall, counter, origin]``)."""
        engine = self.engine
        tx_states = engine._tx_states
        schemas = engine.schemas
        specs: dict[str, _FastSpec | None] = {}
        seen: set[tuple[str, Any]] = set()
        rows: dict[int, tuple[list[Any], list[Any]]] = {}
        by_model: dict[str, dict[Any, int]] = {}
        for i, obj in enumerate(objects):
            model = obj.model
            key = (model, obj.pk)
            if key in seen:
                continue
            seen.add(key)
            if obj.state is None or key in pending or key in tx_states:
                continue
            if model in specs:
                spec = specs[model]
            else:
                schema = schemas.get(model)
                spec = specs[model] = (
                    None if schema is None or engine._has_dead(model) else self._spec(model, schema)
                )
            if spec is None:
                continue
            row = spec.row(obj)
            if row is None:
                continue
            keys = by_model.get(model)
            if keys is None:
                keys = by_model[model] = {}
            sql_key = row[0][spec.pk_pos]
            if sql_key in keys:
                continue
            keys[sql_key] = i
            rows[i] = row
        for model, keys in by_model.items():
            for sql_key in engine.present_keys(model, list(keys)):
                del rows[keys[sql_key]]
        return rows

    def _spec(self, model: str, schema: ModelSchema) -> _FastSpec | None:
        cached = self._specs.get(model)
        if cached is not None and cached[0] is schema:
            return cached[1]
        spec = _fast_spec(self.engine, schema)
        self._specs[model] = (schema, spec)
        return spec

    def _evict(self, model: str, pk: Any) -> None:
        """Drop an object and its merge state locally; nothing goes to the change log."""
        engine = self.engine
        schema = engine.schemas[model]
        key_sql = sv.scalar_to_sql(schema.pk_field.kind, pk)
        engine._touch(model, key_sql)  # notifiers see the row go
        engine.conn.execute(engine.sql(model, "delete"), (key_sql,))
        engine.conn.execute("DELETE FROM _dead WHERE model = ? AND pk = ?", (model, pack(pk)))
        engine._tx_states.pop((model, pk), None)


def compensating_error(message: str) -> CompensatingWriteError:
    """The error handler's view of an ERROR 231."""
    return CompensatingWriteError(message.split("\n", 1)[0], refused_of(message))


def query_error(engine: StoreEngine, version: int, message: str) -> None:
    """Record the server's refusal of set ``version``."""
    with engine.transaction() as conn:
        set_state(conn, version, SubscriptionSetState.ERROR, message)


__all__ = [
    "FlexApplier",
    "MutableSubscriptionSet",
    "Subscription",
    "SubscriptionSet",
    "SubscriptionSetState",
    "query_error",
]
