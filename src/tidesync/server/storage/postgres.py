"""Server storage on PostgreSQL (asyncpg): several server processes share one database.

Layout (all tables in one PostgreSQL schema, ``tidesync`` unless told otherwise; see
``docs/deploying.md``): ``apps`` (one counter row per app), ``schemas``, ``clients``, ``log``
(the history, one row per server version) and ``objects`` (merge state, packed values and a
JSONB rendering of the values so queries and permission rules can run in SQL).

Ordering. An integrate transaction first locks the counter rows of its apps
(``SELECT ... FOR UPDATE``, in app order), so commits of one app are serialised across every
process: versions are assigned *and committed* in order, and the counter row moves in the
same commit as the log rows. A reader takes one snapshot (``REPEATABLE READ``) and reads the
counter and the log together, so it can never see version N+1 without N.

Group commit. Calls to :meth:`PostgresStorage.integrate` that arrive while a commit runs are
queued and integrated together in the next transaction, sharing one WAL flush.

Fan-out. Every commit that adds versions sends ``NOTIFY`` on the schema's channel with
``"<latest>:<sender>:<app>"`` as payload (delivered at commit). :meth:`PostgresStorage.watch`
callbacks fire when a watched app's latest version grows through another process's commit; a
poll of the watched apps' counters every ``poll_interval`` seconds covers any
missed notification (and a dropped listener connection, which the poll re-opens).

SQL views. Per app, a schema of read-only views (one per model, typed columns, and the change
log) lets reporting tools read the data with plain SQL; :mod:`.pgviews` makes them, in the
``put_schemas`` transaction and at ``open`` (``docs/storage.md``). Integrating never
touches them.

Migrations are versioned (``schema_migrations``) and run by :meth:`PostgresStorage.open`
under a PostgreSQL advisory lock, so several processes may start at once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from ...core.changeset import Changeset
from ...core.merge import ObjectState, stored_state
from ...core.packing import pack, pack_instructions, unpack
from ...core.query import BoundQuery
from ...core.schema import ModelSchema
from ...objectid import ObjectId
from ...support.gcpause import gc_paused
from .base import (
    BatchRejectedError,
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
    StoredObject,
    UploadBatch,
    UploadResult,
    apply_changesets,
    held_in,
    instructions_by_object,
    lone_creates,
    matches_everything,
    merge_schemas,
    object_matches,
    only_new_creates,
    rechecked,
    select_new_changesets,
)
from .pgquery import compile_filter
from .pgviews import (
    VIEWS_TABLE_DDL,
    drop_app_views,
    drop_views_of_storage,
    refresh_views,
    stale_apps,
    views_current,
    views_schema_name,
)

log = logging.getLogger("tidesync.server.storage.postgres")

#: The PostgreSQL schema the tables live in unless the URL's ``schema`` parameter says otherwise.
DEFAULT_SCHEMA = "tidesync"
#: How often watched apps' counters are polled (seconds), in case a NOTIFY was missed.
DEFAULT_POLL_INTERVAL = 1.0
#: How many log rows one ``read_log`` call looks at, at most (bounds excluded runs).
MAX_SCAN_ROWS = 10_000
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
_FETCH = 200  # log rows fetched per round trip in read_log

#: Versioned migrations: (version, statements). Never edit a released one; append.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE apps (
            app TEXT PRIMARY KEY,
            latest_version BIGINT NOT NULL DEFAULT 0,
            total_bytes BIGINT NOT NULL DEFAULT 0,
            trimmed_version BIGINT NOT NULL DEFAULT 0,
            schema_generation BIGINT NOT NULL DEFAULT 0
        );
        CREATE TABLE schemas (
            app TEXT NOT NULL,
            model TEXT NOT NULL,
            definition JSONB NOT NULL,
            PRIMARY KEY (app, model)
        );
        CREATE TABLE clients (
            app TEXT NOT NULL,
            origin TEXT NOT NULL,
            user_id TEXT NOT NULL,
            last_version BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (app, origin)
        );
        CREATE TABLE log (
            app TEXT NOT NULL,
            server_version BIGINT NOT NULL,
            origin TEXT NOT NULL,
            client_version BIGINT NOT NULL,
            instructions BYTEA NOT NULL,
            size INTEGER NOT NULL,
            cum_size BIGINT NOT NULL,
            PRIMARY KEY (app, server_version)
        );
        CREATE TABLE objects (
            app TEXT NOT NULL,
            model TEXT NOT NULL,
            pk BYTEA NOT NULL,
            state BYTEA NOT NULL,
            vals BYTEA,
            doc JSONB,
            alive BOOLEAN NOT NULL,
            PRIMARY KEY (app, model, pk)
        );
        """,
    ),
    # the apps' read-only SQL views (pgviews); made for existing apps by ``open``
    (2, VIEWS_TABLE_DDL),
    (
        3,
        """
        CREATE TABLE records (
            app TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (app, key)
        );
        CREATE TABLE leases (
            app TEXT NOT NULL,
            name TEXT NOT NULL,
            holder TEXT NOT NULL,
            expires TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (app, name)
        );
        """,
    ),
]
#: The newest layout this code knows.
FORMAT_VERSION = MIGRATIONS[-1][0]

_UPSERT_OBJECTS = """
    INSERT INTO objects (app, model, pk, state, vals, doc, alive)
    SELECT $1, m, p, s, v, d::jsonb, a
    FROM unnest($2::text[], $3::bytea[], $4::bytea[], $5::bytea[], $6::text[], $7::bool[])
        AS u(m, p, s, v, d, a)
    ON CONFLICT (app, model, pk) DO UPDATE SET
        state = excluded.state, vals = excluded.vals, doc = excluded.doc, alive = excluded.alive
"""

#: The objects of one model with the given primary keys ($3), columns ``{}``: one index
#: lookup per key, whatever the table's size or statistics. ``pk = ANY($3)`` is planned on
#: the statistics: on a table that grew since its last ANALYZE (a first push), and in the
#: generic plan a prepared statement switches to after five runs, PostgreSQL filters every
#: object of the model against the whole array (5 s for 10,000 keys among 60,000 objects);
#: a plain join hashes every object of the model. ``OFFSET 0`` keeps the subquery a
#: per-key index scan (docs/storage.md).
_BY_KEYS = (
    "SELECT o.* FROM unnest($3::bytea[]) AS u(key) CROSS JOIN LATERAL "
    "(SELECT {} FROM objects WHERE app = $1 AND model = $2 AND pk = u.key OFFSET 0) AS o"
)

#: Errors from the driver or the network that mean "the storage failed".
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)

#: ``watch`` callbacks get nothing: they only wake the watcher, which reads the log.
Watcher = Callable[[], None]


def split_storage_url(url: str) -> tuple[str, str]:
    """``(dsn, schema)`` from a ``postgresql://...`` URL with an optional ``schema=`` parameter."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise StorageError(f"not a PostgreSQL URL: {parts.scheme}://...")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    kept: list[tuple[str, str]] = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), schema


class PostgresStorage(ServerStorage):
    """Server storage in PostgreSQL at ``dsn``, in the PostgreSQL schema ``schema``.

    ``pool_size`` bounds the connections used for queries (one more is used for LISTEN).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_size: int = 8,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        command_timeout: float = 30.0,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise StorageError(
                f"invalid PostgreSQL schema name {schema!r} (lower case letters, digits, _)"
            )
        if pool_size < 1 or poll_interval <= 0:
            raise ValueError("pool_size and poll_interval must be positive")
        self._dsn = dsn
        self._schema = schema
        self._channel = f"tidesync_{schema}"
        self._pool_size = pool_size
        self._poll_interval = poll_interval
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._poller: asyncio.Task[None] | None = None
        self._schemas: dict[str, tuple[int, dict[str, ModelSchema]]] = {}
        self._pending: list[tuple[list[UploadBatch], asyncio.Future[list[UploadResult]]]] = []
        self._flush: asyncio.Task[None] | None = None
        self._closing = False
        self._watchers: dict[str, set[Watcher]] = {}
        self._known: dict[str, int] = {}  # watched app -> latest version its watchers saw
        self._instance = uuid.uuid4().hex[:16]  # tells our own NOTIFYs from others'
        #: How many integrate transactions ran (one per group of queued calls).
        self.commits = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStorage:
        """Storage for ``postgresql://user@host:port/db?schema=name`` (schema optional)."""
        dsn, schema = split_storage_url(url)
        return cls(dsn, schema=schema, **options)

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the tables."""
        return self._schema

    def views_schema(self, app_id: str) -> str:
        """The PostgreSQL schema of ``app_id``'s read-only SQL views (see :mod:`.pgviews`)."""
        return views_schema_name(self._schema, app_id)

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, run pending migrations (under an advisory lock), start listening."""
        if self._pool is not None:
            raise StorageError("the storage is already open")
        self._closing = False
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._command_timeout,
                server_settings={
                    "search_path": self._schema,
                    "application_name": "tidesync",
                    "TimeZone": "UTC",  # naive datetimes in ``doc`` are UTC
                },
            )
        except (*_DRIVER_ERRORS, ValueError) as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn)
                await self._refresh_stale_views(conn)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, _DRIVER_ERRORS):
                raise StorageError(f"PostgreSQL migration failed: {exc}") from exc
            raise
        self._pool = pool
        await self._connect_listener()
        self._poller = asyncio.create_task(self._poll_loop(), name="tidesync-pg-poll")

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        await run_migrations(conn, self._schema, "schema_migrations", MIGRATIONS, "format")

    async def _refresh_stale_views(self, conn: asyncpg.Connection) -> None:
        """Make the SQL views of apps that lack them or whose views are out of date."""
        for app_id, _ in await stale_apps(conn):
            async with conn.transaction():
                generation = await _lock_app(conn, app_id)
                if await views_current(conn, app_id, generation):
                    continue  # another process made them meanwhile
                schemas = await self._schemas_at(conn, app_id, generation)
                await refresh_views(conn, self._schema, app_id, schemas, generation)

    async def _connect_listener(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn, command_timeout=self._command_timeout)
            await conn.add_listener(self._channel, self._on_notify)
        except _DRIVER_ERRORS as exc:
            log.warning("LISTEN connection failed (polling meanwhile): %s", exc)
            return
        self._listener = conn

    async def close(self) -> None:
        """Finish queued uploads, stop listening and polling, close every connection."""
        pool = self._pool
        if pool is None:
            return
        self._closing = True
        while self._flush is not None:
            await asyncio.wait([self._flush])
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await listener.close(timeout=5)
            except _DRIVER_ERRORS:
                listener.terminate()
        self._pool = None
        self._schemas.clear()
        try:
            await asyncio.wait_for(pool.close(), timeout=10)
        except _DRIVER_ERRORS:
            pool.terminate()

    @property
    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("the storage is not open")
        return self._pool

    async def check_ready(self) -> None:
        """Raise :class:`StorageError` unless PostgreSQL answers a query within 5 s."""
        try:
            async with self._db.acquire(timeout=5) as conn:
                await conn.fetchval("SELECT 1", timeout=5)
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"PostgreSQL is not reachable: {exc}") from exc

    # -- watching commits -----------------------------------------------------------------

    def watch(self, app_id: str, callback: Watcher) -> Callable[[], None]:
        """Call ``callback`` (on this event loop) when another process commits to ``app_id``.

        Returns the function that stops watching. This process's own commits do not call
        it (the hub wakes its sessions itself).
        """
        self._watchers.setdefault(app_id, set()).add(callback)
        self._known.setdefault(app_id, -1)

        def unwatch() -> None:
            callbacks = self._watchers.get(app_id)
            if callbacks is not None:
                callbacks.discard(callback)
                if not callbacks:
                    del self._watchers[app_id]
                    self._known.pop(app_id, None)

        return unwatch

    def _advance(self, app_id: str, latest: int) -> None:
        """Record ``latest`` for a watched app; wake its watchers if it grew."""
        known = self._known.get(app_id)
        if known is None or latest <= known:
            return
        self._known[app_id] = latest
        for callback in list(self._watchers.get(app_id, ())):
            try:
                callback()
            except Exception:
                log.exception("commit watcher of app %s failed", app_id)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        latest, _, rest = payload.partition(":")
        sender, _, app_id = rest.partition(":")
        try:
            version = int(latest)
        except ValueError:
            log.warning("ignoring malformed notification %r", payload)
            return
        if sender == self._instance:
            known = self._known.get(app_id)
            if known is not None and version > known:
                self._known[app_id] = version  # our own commit: the hub woke its sessions
            return
        self._advance(app_id, version)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                if self._listener is None or self._listener.is_closed():
                    self._listener = None
                    await self._connect_listener()
                apps = list(self._watchers)
                if not apps:
                    continue
                rows = await self._db.fetch(
                    "SELECT app, latest_version FROM apps WHERE app = ANY($1::text[])", apps
                )
                for row in rows:
                    self._advance(row["app"], int(row["latest_version"]))
            except (*_DRIVER_ERRORS, StorageError) as exc:
                log.warning("polling commits failed: %s", exc)

    # -- clients and schemas --------------------------------------------------------------

    async def register_client(self, app_id: str, origin: str, user_id: str) -> int:
        """Register ``origin`` for ``user_id``; return its last integrated version."""
        try:
            async with self._db.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO clients (app, origin, user_id) VALUES ($1, $2, $3) "
                    "ON CONFLICT DO NOTHING",
                    app_id,
                    origin,
                    user_id,
                )
                row = await conn.fetchrow(
                    "SELECT user_id, last_version FROM clients WHERE app = $1 AND origin = $2",
                    app_id,
                    origin,
                )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"register_client failed: {exc}") from exc
        if row["user_id"] != user_id:
            raise ClientOwnershipError(
                f"client file {origin} of app {app_id} belongs to another user"
            )
        return int(row["last_version"])

    async def client_known(self, app_id: str, origin: str) -> bool:
        """Was ``origin`` ever registered for ``app_id``?"""
        value = await self._fetchval(
            "SELECT 1 FROM clients WHERE app = $1 AND origin = $2", app_id, origin
        )
        return value is not None

    async def client_version(self, app_id: str, origin: str) -> int:
        """The last client version of ``origin`` integrated (0 if none)."""
        value = await self._fetchval(
            "SELECT last_version FROM clients WHERE app = $1 AND origin = $2", app_id, origin
        )
        return int(value) if value is not None else 0

    async def get_schemas(self, app_id: str) -> dict[str, ModelSchema]:
        """The app's models by name (empty for an unknown app)."""
        try:
            async with self._db.acquire() as conn:
                gen = await conn.fetchval(
                    "SELECT schema_generation FROM apps WHERE app = $1", app_id
                )
                return dict(await self._schemas_at(conn, app_id, int(gen or 0)))
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"get_schemas failed: {exc}") from exc

    async def _schemas_at(
        self, conn: asyncpg.Connection, app_id: str, generation: int
    ) -> dict[str, ModelSchema]:
        """The app's schemas at ``generation`` (cached; reloaded when another process moved it)."""
        cached = self._schemas.get(app_id)
        if cached is not None and cached[0] == generation:
            return cached[1]
        rows = await conn.fetch(
            "SELECT definition FROM schemas WHERE app = $1 ORDER BY model", app_id
        )
        models: dict[str, ModelSchema] = {}
        for row in rows:
            model = ModelSchema.from_dict(json.loads(row["definition"]))
            models[model.name] = model
        self._schemas[app_id] = (generation, models)
        return models

    async def put_schemas(self, app_id: str, schemas: list[ModelSchema]) -> dict[str, ModelSchema]:
        """Add new models and fields; return the merged set (see ``base.merge_schemas``)."""
        try:
            async with self._db.acquire() as conn, conn.transaction():
                gen = await _lock_app(conn, app_id)
                stored = await self._schemas_at(conn, app_id, gen)
                merged = merge_schemas(stored, schemas)
                changed = [m for name, m in merged.items() if stored.get(name) != m]
                if not changed:
                    return dict(merged)
                await conn.executemany(
                    "INSERT INTO schemas (app, model, definition) VALUES ($1, $2, $3::jsonb) "
                    "ON CONFLICT (app, model) DO UPDATE SET definition = excluded.definition",
                    [(app_id, m.name, json.dumps(m.to_dict())) for m in changed],
                )
                for model in changed:
                    if model.name in stored:
                        await _rerender(conn, app_id, model)
                await conn.execute(
                    "UPDATE apps SET schema_generation = $2 WHERE app = $1", app_id, gen + 1
                )
                names = None if not stored else [m.name for m in changed]
                await refresh_views(conn, self._schema, app_id, merged, gen + 1, names)
            self._schemas[app_id] = (gen + 1, merged)
            return dict(merged)
        except _DRIVER_ERRORS as exc:
            self._schemas.pop(app_id, None)
            raise StorageError(f"put_schemas failed: {exc}") from exc

    # -- integration ----------------------------------------------------------------------

    async def integrate(self, batches: list[UploadBatch]) -> list[UploadResult]:
        """Integrate uploads durably; calls that arrive during a commit share the next one."""
        if self._pool is None or self._closing:
            raise StorageError("the storage is not open")
        if not batches:
            return []
        waiter: asyncio.Future[list[UploadResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((list(batches), waiter))
        if self._flush is None:
            self._flush = asyncio.create_task(self._flush_loop(), name="tidesync-pg-commit")
        return await waiter

    async def _flush_loop(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                batches = [b for bs, _ in group for b in bs]
                error: BaseException | None = None
                results: list[UploadResult] = []
                try:
                    results = await self._integrate_group(batches)
                except _DRIVER_ERRORS as exc:
                    error = StorageError(f"commit failed: {exc}")
                    error.__cause__ = exc
                except Exception as exc:
                    error = exc
                start = 0
                for bs, waiter in group:
                    if not waiter.done():
                        if error is not None:
                            waiter.set_exception(error)
                        else:
                            waiter.set_result(results[start : start + len(bs)])
                    start += len(bs)
        finally:
            self._flush = None
            for _, waiter in self._pending if self._closing else ():
                if not waiter.done():
                    waiter.set_exception(StorageError("the storage closed"))

    async def _integrate_group(self, batches: list[UploadBatch]) -> list[UploadResult]:
        self.commits += 1
        async with self._db.acquire() as conn:
            try:
                try:
                    group, results = await self._integrate_txn(conn, batches, guess=True)
                except _GuessedWrong:  # rolled back: again, looking every object up
                    group, results = await self._integrate_txn(conn, batches, guess=False)
            except BaseException:
                self._schemas.clear()
                raise
        for app_id, (latest, _) in group.apps.items():
            known = self._known.get(app_id)
            if known is not None and latest > known:
                self._known[app_id] = latest  # the hub wakes its own sessions
        return results

    async def _integrate_txn(
        self, conn: asyncpg.Connection, batches: list[UploadBatch], *, guess: bool
    ) -> tuple[_Group, list[UploadResult]]:
        """One group-commit transaction. With ``guess``, the objects that uploads only
        CREATE are taken for new (not looked up; see ``only_new_creates``) and COPYed in:
        if one is stored after all (two devices created one primary key), the COPY fails on
        the primary key, the transaction is rolled back and ``_GuessedWrong`` raised."""
        async with conn.transaction():
            group = _Group(self, conn, guess=guess)
            await group.lock_apps(sorted({b.app_id for b in batches}))
            results = [await group.integrate(b) for b in batches]
            await group.write()
        return group, results

    # -- reading --------------------------------------------------------------------------

    async def read_log(
        self, app_id: str, after: int, max_bytes: int, exclude_origin: str | None = None
    ) -> LogPage:
        """Entries after ``after``, up to about ``max_bytes`` (see ``ServerStorage``)."""
        if after < 0 or max_bytes < 0:
            raise ValueError("after and max_bytes must not be negative")
        try:
            async with (
                self._db.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                return await _read_log(conn, app_id, after, max_bytes, exclude_origin)
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"read_log failed: {exc}") from exc

    async def latest_version(self, app_id: str) -> int:
        """The app's latest server version (0 if none)."""
        value = await self._fetchval("SELECT latest_version FROM apps WHERE app = $1", app_id)
        return int(value) if value is not None else 0

    async def get_objects(self, app_id: str, model: str) -> dict[Any, dict[str, Any]]:
        """Primary key -> rendered values of every alive object of ``model``."""
        try:
            rows = await self._db.fetch(
                "SELECT pk, vals FROM objects WHERE app = $1 AND model = $2 AND alive",
                app_id,
                model,
            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"get_objects failed: {exc}") from exc
        return {unpack(row["pk"]): unpack(row["vals"]) for row in rows}

    # -- flexible sync ----------------------------------------------------------------------

    async def read_objects(
        self, app_id: str, model: str, after: bytes | None, limit: int
    ) -> list[StoredObject]:
        """Up to ``limit`` alive objects of ``model`` after packed pk ``after``, in pk order
        (``bytea`` compares bytewise, like SQLite's BLOB)."""
        try:
            rows = await self._db.fetch(
                "SELECT pk, state, vals FROM objects WHERE app = $1 AND model = $2 AND alive "
                "AND pk > $3 ORDER BY pk LIMIT $4",
                app_id,
                model,
                after if after is not None else b"",
                max(1, limit),
            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"read_objects failed: {exc}") from exc
        return [StoredObject(r["pk"], r["state"], unpack(r["vals"])) for r in rows]

    async def get_states(
        self, app_id: str, keys: Iterable[ObjectKey]
    ) -> dict[ObjectKey, StoredObject]:
        """The stored objects of ``keys`` (erased ones with ``values`` None)."""
        by_model: dict[str, list[bytes]] = {}
        for model, pk in keys:
            by_model.setdefault(model, []).append(pk)
        out: dict[ObjectKey, StoredObject] = {}
        try:
            async with self._db.acquire() as conn:
                for model, pks in by_model.items():
                    rows = await conn.fetch(_BY_KEYS.format("pk, state, vals"), app_id, model, pks)
                    for r in rows:
                        vals = r["vals"]
                        out[(model, r["pk"])] = StoredObject(
                            r["pk"], r["state"], unpack(vals) if vals is not None else None
                        )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"get_states failed: {exc}") from exc
        return out

    async def get_state_bytes(
        self, app_id: str, keys: Iterable[ObjectKey]
    ) -> dict[ObjectKey, bytes]:
        """The state bytes of ``keys`` (the values are not read)."""
        by_model: dict[str, list[bytes]] = {}
        for model, pk in keys:
            by_model.setdefault(model, []).append(pk)
        out: dict[ObjectKey, bytes] = {}
        try:
            async with self._db.acquire() as conn:
                for model, pks in by_model.items():
                    rows = await conn.fetch(_BY_KEYS.format("pk, state"), app_id, model, pks)
                    for r in rows:
                        out[(model, r["pk"])] = r["state"]
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"get_state_bytes failed: {exc}") from exc
        return out

    async def objects_size(self, app_id: str, model: str) -> tuple[int, int]:
        """``(count, total state bytes)`` of the alive objects of ``model``."""
        try:
            row = await self._db.fetchrow(
                "SELECT count(*), coalesce(sum(length(state)), 0) FROM objects "
                "WHERE app = $1 AND model = $2 AND alive",
                app_id,
                model,
            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"objects_size failed: {exc}") from exc
        return int(row[0]), int(row[1])

    async def read_matching(
        self,
        app_id: str,
        model: str,
        queries: Sequence[BoundQuery] | None,
        rule: BoundQuery | None,
        after: bytes | None,
        limit: int,
    ) -> MatchPage:
        """Up to ``limit`` objects after ``after`` matching ``queries`` and ``rule``, the
        queries evaluated *in PostgreSQL* (see :mod:`.pgquery`); rows SQL cannot decide
        exactly are evaluated in Python (``object_matches``)."""
        limit = max(1, limit)
        start = after if after is not None else b""
        flt = compile_filter(queries, rule, 5)
        sql = (
            "SELECT pk, state, vals, sure FROM (SELECT pk, state, vals, "
            f"{flt.sql} AS sure FROM objects WHERE app = $1 AND model = $2 AND alive "
            "AND pk > $3) AS c WHERE sure IS NOT FALSE ORDER BY pk LIMIT $4"
        )
        try:
            async with (
                self._db.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                rows = await conn.fetch(sql, app_id, model, start, limit, *flt.params)
                done = len(rows) < limit
                cursor = rows[-1]["pk"] if rows else after
                scanned = await conn.fetchval(
                    "SELECT coalesce(sum(length(state)), 0) FROM objects WHERE app = $1 "
                    "AND model = $2 AND alive AND pk > $3 AND ($4 OR pk <= $5)",
                    app_id,
                    model,
                    start,
                    done,
                    cursor if cursor is not None else b"",
                )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"read_matching failed: {exc}") from exc
        if matches_everything(queries, rule):  # the filter is TRUE: leave the values packed
            every: list[StoredObject] = [
                PackedStoredObject(r["pk"], r["state"], r["vals"]) for r in rows
            ]
            return MatchPage(every, cursor, int(scanned), done)
        hits: list[StoredObject] = []
        for r in rows:
            values = unpack(r["vals"])
            if r["sure"] is None and not object_matches(queries, rule, values):
                continue
            hits.append(StoredObject(r["pk"], r["state"], values))
        return MatchPage(hits, cursor, int(scanned), done)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._db.fetchval(sql, *args)
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"query failed: {exc}") from exc

    # -- the backend API ------------------------------------------------------------------

    async def client_users(self, app_id: str, origins: Iterable[str]) -> dict[str, str]:
        """The user id of each registered origin of ``origins``."""
        wanted = sorted(set(origins))
        if not wanted:
            return {}
        try:
            rows = await self._db.fetch(
                "SELECT origin, user_id FROM clients WHERE app = $1 AND origin = ANY($2::text[])",
                app_id,
                wanted,
            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"client_users failed: {exc}") from exc
        return {str(r["origin"]): str(r["user_id"]) for r in rows}

    async def get_record(self, app_id: str, key: str) -> str | None:
        """The durable value under ``key`` (None if none)."""
        value = await self._fetchval(
            "SELECT value FROM records WHERE app = $1 AND key = $2", app_id, key
        )
        return None if value is None else str(value)

    async def put_record(self, app_id: str, key: str, value: str) -> None:
        """Store ``value`` under ``key``, durably."""
        try:
            await self._db.execute(
                "INSERT INTO records (app, key, value) VALUES ($1, $2, $3) "
                "ON CONFLICT (app, key) DO UPDATE SET value = excluded.value",
                app_id,
                key,
                value,
            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"put_record failed: {exc}") from exc

    async def take_lease(self, app_id: str, name: str, holder: str, ttl: float) -> bool:
        """Hold the lease ``name`` for ``ttl`` seconds unless another holder's runs (the
        database's clock decides, so the processes' clocks need not agree)."""
        try:
            got = await self._db.fetchval(
                "INSERT INTO leases (app, name, holder, expires) "
                "VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4)) "
                "ON CONFLICT (app, name) DO UPDATE SET holder = excluded.holder, "
                "expires = excluded.expires "
                "WHERE leases.holder = excluded.holder OR leases.expires <= clock_timestamp() "
                "RETURNING holder",
                app_id,
                name,
                holder,
                float(ttl),
            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"take_lease failed: {exc}") from exc
        return bool(got == holder)

    async def drop_lease(self, app_id: str, name: str, holder: str) -> None:
        """Give up the lease ``name`` if ``holder`` holds it."""
        try:
            await self._db.execute(
                "DELETE FROM leases WHERE app = $1 AND name = $2 AND holder = $3",
                app_id,
                name,
                holder,
            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"drop_lease failed: {exc}") from exc

    # -- administration -------------------------------------------------------------------

    async def trim_history(self, app_id: str, before_version: int) -> int:
        """Delete log entries ``<= before_version`` (clamped to the latest)."""
        try:
            async with self._db.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT latest_version, trimmed_version FROM apps WHERE app = $1 FOR UPDATE",
                    app_id,
                )
                if row is None:
                    return 0
                point = min(before_version, int(row["latest_version"]))
                if point <= int(row["trimmed_version"]):
                    return 0
                status = await conn.execute(
                    "DELETE FROM log WHERE app = $1 AND server_version <= $2", app_id, point
                )
                await conn.execute(
                    "UPDATE apps SET trimmed_version = $2 WHERE app = $1", app_id, point
                )
                return int(status.split()[-1])
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"trim_history failed: {exc}") from exc

    async def wipe_app(self, app_id: str) -> None:
        """Delete all of the app's data."""
        try:
            async with self._db.acquire() as conn, conn.transaction():
                await drop_app_views(conn, self._schema, app_id)
                for table in ("objects", "log", "clients", "schemas", "apps", "records", "leases"):
                    await conn.execute(f"DELETE FROM {table} WHERE app = $1", app_id)
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"wipe_app failed: {exc}") from exc
        finally:
            self._schemas.pop(app_id, None)

    async def drop_schema(self) -> None:
        """Drop the whole PostgreSQL schema with every app in it (tests, decommissioning)."""
        try:
            async with self._db.acquire() as conn, conn.transaction():
                await drop_views_of_storage(conn, self._schema)
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self._schema}" CASCADE')
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"drop_schema failed: {exc}") from exc
        self._schemas.clear()


async def _lock_app(conn: asyncpg.Connection, app_id: str) -> int:
    """Create the app's counter row if needed, lock it; return its schema generation."""
    await conn.execute("INSERT INTO apps (app) VALUES ($1) ON CONFLICT DO NOTHING", app_id)
    gen = await conn.fetchval(
        "SELECT schema_generation FROM apps WHERE app = $1 FOR UPDATE", app_id
    )
    return int(gen)


class _Group:
    """The state of one group-commit transaction, written with bulk SQL at the end."""

    def __init__(
        self, storage: PostgresStorage, conn: asyncpg.Connection, *, guess: bool = False
    ) -> None:
        self.storage = storage
        self.conn = conn
        self.guess = guess
        self.apps: dict[str, tuple[int, int]] = {}  # app -> (latest_version, total_bytes)
        self.start: dict[str, int] = {}
        self.generations: dict[str, int] = {}
        self.clients: dict[tuple[str, str], int | None] = {}
        self.dirty_clients: set[tuple[str, str]] = set()
        self.raw: dict[tuple[str, str, bytes], bytes] = {}
        self.states: dict[tuple[str, str, bytes], ObjectState] = {}
        self.schemas: dict[tuple[str, str, bytes], ModelSchema] = {}
        #: objects taken for new (one CREATE, not looked up): state head, packed values
        self.fresh: dict[tuple[str, str, bytes], tuple[bytes, bytes]] = {}
        self.log_rows: list[tuple[str, int, str, int, bytes, int, int]] = []

    async def lock_apps(self, apps: list[str]) -> None:
        """Lock every app's counter row, in order (so two groups never deadlock)."""
        await self.conn.executemany(
            "INSERT INTO apps (app) VALUES ($1) ON CONFLICT DO NOTHING", [(a,) for a in apps]
        )
        rows = await self.conn.fetch(
            "SELECT app, latest_version, total_bytes, schema_generation FROM apps "
            "WHERE app = ANY($1::text[]) ORDER BY app FOR UPDATE",
            apps,
        )
        for row in rows:
            app = row["app"]
            self.apps[app] = (int(row["latest_version"]), int(row["total_bytes"]))
            self.start[app] = int(row["latest_version"])
            self.generations[app] = int(row["schema_generation"])

    def moved(self, app: str) -> bool:
        """True if this group added versions to ``app``."""
        return self.apps[app][0] > self.start[app]

    async def client_last(self, app: str, origin: str) -> int | None:
        key = (app, origin)
        if key not in self.clients:
            value = await self.conn.fetchval(
                "SELECT last_version FROM clients WHERE app = $1 AND origin = $2", app, origin
            )
            self.clients[key] = int(value) if value is not None else None
        return self.clients[key]

    async def integrate(self, batch: UploadBatch) -> UploadResult:
        app = batch.app_id
        last = await self.client_last(app, batch.origin)
        if last is None:
            return UploadResult(
                batch.origin,
                0,
                [],
                f"origin {batch.origin} is not registered with app {app}",
                RejectReason.UNKNOWN_CLIENT,
            )
        schemas = await self.storage._schemas_at(self.conn, app, self.generations[app])
        try:
            # the cyclic collector is paused where an upload's many short-lived objects are
            # made (they form no cycles); not across the awaits, where other tasks run
            with gc_paused:
                new = select_new_changesets(batch, last, schemas)
                if not new:
                    return UploadResult(batch.origin, last, [])
                if self.guess:
                    held = held_in(app, self.states, self.raw, self.fresh)
                    made = only_new_creates(new, schemas, held)
                    # (the transaction knows none of these objects: nothing to recheck on)
                    if made is not None and rechecked(batch, new, {}) is new:
                        fresh, keyed = made
                        versions = self._append_log(app, batch.origin, new, last)
                        for (model, pk), encoded in fresh.items():
                            self.fresh[(app, model, pk)] = encoded
                        created = {k: v for keys, v in zip(keyed, versions) for k in keys}
                        return UploadResult(
                            batch.origin, last + len(new), versions, created=created
                        )
                by_object = instructions_by_object(new)
            seen: dict[ObjectKey, bytes] | None = None if batch.check is None else {}
            overlay = await self.working_copies(app, by_object.keys(), seen)
            with gc_paused:
                if seen is not None:  # the write check again, on what this transaction sees
                    checked = rechecked(batch, new, seen)
                    if checked is not new:
                        new = checked
                        by_object = instructions_by_object(new)
                        overlay = {k: v for k, v in overlay.items() if k in by_object}
                lone = {k: v for k, v in by_object.items() if len(v) == 1 and k not in overlay}
                apply_changesets(by_object, schemas, overlay)
        except BatchRejectedError as exc:
            return UploadResult(batch.origin, last, [], str(exc), exc.reason)
        versions = self._append_log(app, batch.origin, new, last)
        created = lone_creates(lone, (), new, versions)
        for (model, pk), state in overlay.items():
            self.states[(app, model, pk)] = state
            self.schemas[(app, model, pk)] = schemas[model]
            self.fresh.pop((app, model, pk), None)
        return UploadResult(batch.origin, last + len(new), versions, created=created)

    def _append_log(self, app: str, origin: str, new: list[Changeset], last: int) -> list[int]:
        """Add ``new``'s log rows and move the app's and the client's counters; returns the
        server versions given."""
        latest, total = self.apps[app]
        versions: list[int] = []
        for cs in new:
            blob = pack_instructions(cs.instructions)
            latest += 1
            total += len(blob)
            self.log_rows.append((app, latest, origin, cs.version, blob, len(blob), total))
            versions.append(latest)
        self.apps[app] = (latest, total)
        self.clients[(app, origin)] = last + len(new)
        self.dirty_clients.add((app, origin))
        return versions

    async def working_copies(
        self, app: str, keys: Iterable[ObjectKey], seen: dict[ObjectKey, bytes] | None = None
    ) -> dict[ObjectKey, ObjectState]:
        """Private copies of the touched objects' states (absent = never stored); ``seen``
        gets the state bytes each copy was made from."""
        keys = list(keys)
        missing: dict[str, list[bytes]] = {}
        for model, pk in keys:
            full = (app, model, pk)
            if full not in self.states and full not in self.raw and full not in self.fresh:
                missing.setdefault(model, []).append(pk)
        for model, pks in missing.items():
            rows = await self.conn.fetch(_BY_KEYS.format("pk, state"), app, model, pks)
            for row in rows:
                self.raw[(app, model, row["pk"])] = row["state"]
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

    async def write(self) -> None:
        conn = self.conn
        if self.log_rows:
            await conn.copy_records_to_table(
                "log",
                records=self.log_rows,
                columns=[
                    "app",
                    "server_version",
                    "origin",
                    "client_version",
                    "instructions",
                    "size",
                    "cum_size",
                ],
                schema_name=self.storage.schema,
            )
        if self.fresh:
            await _insert_new_objects(conn, self.fresh, self.storage.schema)
        by_app: dict[str, list[tuple[str, bytes, ObjectState, ModelSchema]]] = {}
        for (app, model, pk), state in self.states.items():
            by_app.setdefault(app, []).append((model, pk, state, self.schemas[(app, model, pk)]))
        for app, items in by_app.items():
            await _upsert_objects(conn, app, items)
        if self.dirty_clients:
            await conn.executemany(
                "UPDATE clients SET last_version = $1 WHERE app = $2 AND origin = $3",
                [(self.clients[k], *k) for k in self.dirty_clients],
            )
        for app, (latest, total) in self.apps.items():
            if not self.moved(app):
                continue
            await conn.execute(
                "UPDATE apps SET latest_version = $2, total_bytes = $3 WHERE app = $1",
                app,
                latest,
                total,
            )
            await conn.execute(
                "SELECT pg_notify($1, $2)",
                self.storage._channel,
                f"{latest}:{self.storage._instance}:{app}",
            )


class _GuessedWrong(Exception):
    """An object taken for new (``_Group.fresh``) is stored: the group is done again."""


async def _insert_new_objects(
    conn: asyncpg.Connection,
    fresh: dict[tuple[str, str, bytes], tuple[bytes, bytes]],
    schema: str,
) -> None:
    """Insert the objects taken for new (COPY: a stored one fails it, ``_GuessedWrong``)."""
    with gc_paused:
        records = [
            (
                app,
                model,
                pk,
                stored_state(head, packed),
                packed,
                json.dumps(to_json(unpack(packed))),
                True,
            )
            for (app, model, pk), (head, packed) in fresh.items()
        ]
    try:
        await conn.copy_records_to_table(
            "objects",
            records=records,
            columns=["app", "model", "pk", "state", "vals", "doc", "alive"],
            schema_name=schema,
        )
    except asyncpg.UniqueViolationError as exc:
        raise _GuessedWrong from exc


async def _upsert_objects(
    conn: asyncpg.Connection, app: str, items: list[tuple[str, bytes, ObjectState, ModelSchema]]
) -> None:
    models, pks, states, vals, docs, alive = [], [], [], [], [], []
    with gc_paused:
        for model, pk, state, schema in items:
            rendered = state.render(schema) if state.alive else None
            models.append(model)
            pks.append(pk)
            states.append(state.to_bytes())
            vals.append(pack(rendered) if rendered is not None else None)
            docs.append(json.dumps(to_json(rendered)) if rendered is not None else None)
            alive.append(rendered is not None)
    await conn.execute(_UPSERT_OBJECTS, app, models, pks, states, vals, docs, alive)


async def _rerender(conn: asyncpg.Connection, app: str, schema: ModelSchema) -> None:
    """Render a model's stored objects again after its schema gained fields."""
    rows = await conn.fetch(
        "SELECT pk, state FROM objects WHERE app = $1 AND model = $2", app, schema.name
    )
    items = [(schema.name, r["pk"], ObjectState.from_bytes(r["state"]), schema) for r in rows]
    if items:
        await _upsert_objects(conn, app, items)


def to_json(value: Any) -> Any:
    """A JSON rendering of object values, for the ``objects.doc`` JSONB column.

    Numbers, booleans, strings and null stay as they are (a NaN or infinite float becomes
    the string ``"NaN"``/``"Infinity"``/``"-Infinity"``); datetimes become ISO 8601 strings
    (UTC), Decimal/UUID/ObjectId their canonical strings, bytes base64, sets and lists arrays,
    dicts objects. PostgreSQL's JSONB cannot hold U+0000, so it becomes U+FFFD here (the
    packed values keep the exact string).
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID | ObjectId):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k).replace("\x00", "\ufffd"): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [to_json(v) for v in value]
        if isinstance(value, set | frozenset):
            items.sort(key=lambda x: json.dumps(x, sort_keys=True))
        return items
    return str(value)


async def _read_log(
    conn: asyncpg.Connection, app: str, after: int, max_bytes: int, exclude: str | None
) -> LogPage:
    row = await conn.fetchrow(
        "SELECT latest_version, total_bytes, trimmed_version FROM apps WHERE app = $1", app
    )
    latest, total, trimmed = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
    if after > latest:
        raise CursorAheadError(f"app {app}: cursor {after} is past the latest version {latest}")
    if after < trimmed:
        raise HistoryTrimmedError(
            f"app {app}: history up to version {trimmed} was trimmed (cursor {after})", trimmed
        )
    entries: list[LogEntry] = []
    used = scanned = 0
    cursor, cursor_cum = after, total
    position = after
    while position < latest and scanned < MAX_SCAN_ROWS:
        rows = await conn.fetch(
            "SELECT server_version, origin, client_version, "
            "CASE WHEN origin = $1 THEN NULL ELSE instructions END AS blob, size, cum_size "
            "FROM log WHERE app = $2 AND server_version > $3 AND server_version <= $4 "
            "ORDER BY server_version LIMIT $5",
            exclude,
            app,
            position,
            latest,
            _FETCH,
        )
        if not rows:
            break
        for r in rows:
            version, blob, size = int(r["server_version"]), r["blob"], int(r["size"])
            if blob is not None:
                if entries and used + size > max_bytes:
                    return LogPage(entries, cursor, latest, total - cursor_cum)
                entries.append(LogEntry(version, r["origin"], int(r["client_version"]), blob))
                used += size
            cursor, cursor_cum = version, int(r["cum_size"])
            scanned += 1
            if scanned >= MAX_SCAN_ROWS or (entries and used >= max_bytes):
                return LogPage(entries, cursor, latest, total - cursor_cum)
        position = cursor
    return LogPage(entries, cursor, latest, total - cursor_cum)


__all__ = [
    "DEFAULT_SCHEMA",
    "FORMAT_VERSION",
    "MIGRATIONS",
    "PostgresStorage",
    "run_migrations",
    "to_json",
]


async def run_migrations(
    conn: asyncpg.Connection,
    schema: str,
    table: str,
    migrations: Sequence[tuple[int, str]],
    what: str,
) -> None:
    """Apply the ``(version, ddl)`` steps newer than those recorded in ``schema.table``.

    Every migrator of a schema (the storage's and the user store's) takes the same advisory
    lock, so processes starting at once migrate one after the other; a schema newer than
    this code knows (``what`` names it in the error) is refused."""
    key = f"tidesync-migrate:{schema}"
    newest = max((v for v, _ in migrations), default=0)
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", key)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ("
            "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
        if current > newest:
            raise StorageError(
                f"PostgreSQL schema {schema!r} has {what} {current}; this version "
                f"of tidesync reads up to {newest} (upgrade tidesync)"
            )
        for version, ddl in migrations:
            if version <= current:
                continue
            async with conn.transaction():
                await conn.execute(ddl)
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", version)
            log.info("schema %s: %s migrated to %d", schema, what, version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
