"""Users, credentials and the signing secret in PostgreSQL, shared by every server process.

With ``--storage postgresql://...`` the user records live in the storage's PostgreSQL
schema (tables ``users``, ``identities``, ``email_accounts``, ``pending_tokens``,
``api_keys``, ``refresh_tokens``, ``signing_keys`` and ``user_events``), so a client may log
in through one server process, sync through another and refresh through a third.

Migrations are versioned in ``user_migrations`` and run by :meth:`PostgresUserStore.open`
under the same advisory lock as the storage's, so several processes may start at once.

Consistency across processes:

- the signing secret is created once (``INSERT ... ON CONFLICT DO NOTHING``, then read);
- rotating a refresh token locks the user's row (``SELECT ... FOR UPDATE``) and checks and
  changes the token in that transaction; disabling and deleting a user lock the same row,
  so a rotation either finishes before the revocation (and its new token is revoked with
  the others) or sees it; reuse of a rotated token revokes the whole family the same way;
- disabling or deleting a user writes a row to ``user_events`` and sends ``NOTIFY`` in the
  same transaction. Every process LISTENs, and also polls the recent events every
  ``poll_interval`` seconds (a missed notification, a dropped listener connection), then
  tells its listener (:meth:`UserStore.set_user_gone_listener`), which closes the user's
  live sync connections on that process;
- a logout (:meth:`PostgresUserStore.end_login`) revokes the login's refresh tokens and
  writes an event naming the login's family the same way; the other processes tell their
  login-ended listener, which closes that login's live connections. Access tokens of the
  login are refused from the commit on, on every process (:meth:`login_active` reads the
  shared table).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from argon2 import PasswordHasher

from ..errors import AuthError
from .signing import DEFAULT_KID, SigningKey
from .storage.base import StorageError
from .storage.postgres import DEFAULT_SCHEMA, run_migrations, split_storage_url
from .users import (
    DELETED_REASON,
    DISABLED_REASON,
    LOGGED_OUT_REASON,
    MAX_KEY_NAME_LENGTH,
    PENDING_TOKEN_TTL,
    SECRET_BYTES,
    ApiKeyInfo,
    EmailTakenError,
    RefreshOutcome,
    RefreshRecord,
    UserRecord,
    UserStore,
    address_or_empty,
    check_password,
    new_secret,
    normalize_email,
    page_size,
    token_hash,
    user_record,
    verify_password,
)

log = logging.getLogger("tidesync.server.users")

#: How often the recent user events are polled, in case a NOTIFY was missed (seconds).
DEFAULT_POLL_INTERVAL = 1.0
#: How far back each poll looks for user events it has not acted on yet (seconds).
EVENT_WINDOW = 300.0
#: User events older than this are deleted (seconds).
EVENT_RETENTION = 3600.0
#: How often old user events are deleted (seconds).
EVENT_PRUNE_INTERVAL = 600.0
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")  # as the storage's

#: Versioned migrations of the user tables: (version, statements). Never edit one; append.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE users (
            app_id TEXT NOT NULL, user_id TEXT NOT NULL, provider TEXT NOT NULL,
            disabled BOOLEAN NOT NULL DEFAULT false, created_at DOUBLE PRECISION NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (app_id, user_id)
        );
        CREATE TABLE identities (
            app_id TEXT NOT NULL, provider TEXT NOT NULL, external_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            PRIMARY KEY (app_id, provider, external_id)
        );
        CREATE INDEX identities_by_user ON identities (app_id, user_id);
        CREATE TABLE email_accounts (
            app_id TEXT NOT NULL, email TEXT NOT NULL, user_id TEXT NOT NULL,
            password_hash TEXT NOT NULL, confirmed BOOLEAN NOT NULL,
            PRIMARY KEY (app_id, email)
        );
        CREATE INDEX email_accounts_by_user ON email_accounts (app_id, user_id);
        CREATE TABLE pending_tokens (
            token_hash TEXT PRIMARY KEY, app_id TEXT NOT NULL, kind TEXT NOT NULL,
            email TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, user_id TEXT NOT NULL,
            name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            disabled BOOLEAN NOT NULL DEFAULT false, created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (app_id, user_id, name)
        );
        CREATE TABLE refresh_tokens (
            token_hash TEXT PRIMARY KEY, app_id TEXT NOT NULL, user_id TEXT NOT NULL,
            family TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
            revoked BOOLEAN NOT NULL DEFAULT false, replaced_at DOUBLE PRECISION
        );
        CREATE INDEX refresh_tokens_by_user ON refresh_tokens (app_id, user_id);
        CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family);
        CREATE TABLE signing_keys (
            name TEXT PRIMARY KEY, secret BYTEA NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE user_events (
            id BIGSERIAL PRIMARY KEY, app_id TEXT NOT NULL, user_id TEXT NOT NULL,
            reason TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX user_events_by_time ON user_events (at);
        """,
    ),
    (
        2,
        """
        ALTER TABLE user_events ADD COLUMN family TEXT;
        """,
    ),
    (
        3,
        """
        ALTER TABLE signing_keys ADD COLUMN signs_from DOUBLE PRECISION NOT NULL DEFAULT 0;
        """,
    ),
    (
        4,
        """
        ALTER TABLE users ADD COLUMN last_login_at DOUBLE PRECISION;
        """,
    ),
]
#: The newest user-table layout this code knows.
FORMAT_VERSION = MIGRATIONS[-1][0]

#: The users of the list query (``{where}`` names the id condition after ``$1``, the app).
_USER_ROWS = (
    "SELECT user_id, provider, disabled, created_at, data, email, last_login_at FROM ("
    " SELECT u.user_id, u.provider, u.disabled, u.created_at, u.data, u.last_login_at,"
    " (SELECT min(e.email) FROM email_accounts e"
    "  WHERE e.app_id = u.app_id AND e.user_id = u.user_id) AS email"
    " FROM users u WHERE u.app_id = $1 AND {where}) AS t "
)

#: Errors from the driver or the network that mean "the user database failed".
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


def _has_nul(*values: object) -> bool:
    """True if a string among ``values`` holds U+0000 (PostgreSQL text cannot: such a
    value matches nothing and cannot be stored)."""
    return any(isinstance(v, str) and "\x00" in v for v in values)


def _count(status: str) -> int:
    """The row count of a command status such as ``"UPDATE 3"``."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


class PostgresUserStore(UserStore):
    """The user store in PostgreSQL at ``dsn``, in the PostgreSQL schema ``schema``.

    ``pool_size`` bounds the connections used for queries; one more is used for LISTEN.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_size: int = 4,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        command_timeout: float = 30.0,
        hasher: PasswordHasher | None = None,
    ) -> None:
        super().__init__()
        if not _SCHEMA_NAME.match(schema):
            raise StorageError(
                f"invalid PostgreSQL schema name {schema!r} (lower case letters, digits, _)"
            )
        if pool_size < 1 or poll_interval <= 0:
            raise ValueError("pool_size and poll_interval must be positive")
        self._dsn = dsn
        self._schema = schema
        self._channel = f"tidesync_users_{schema}"
        self._pool_size = pool_size
        self._poll_interval = poll_interval
        self._command_timeout = command_timeout
        self.hasher = hasher or PasswordHasher()
        self._dummy_hash = ""
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._seen: dict[int, float] = {}  # user event id -> when this process acted on it
        self._instance = uuid.uuid4().hex[:16]

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresUserStore:
        """The store for ``postgresql://user@host:port/db?schema=name`` (schema optional)."""
        dsn, schema = split_storage_url(url)
        return cls(dsn, schema=schema, **options)

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the tables."""
        return self._schema

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, run pending migrations (under the advisory lock), start listening."""
        if self._pool is not None:
            raise StorageError("the user store is already open")
        self._dummy_hash = await asyncio.to_thread(self.hasher.hash, new_secret())
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._command_timeout,
                server_settings={
                    "search_path": self._schema,
                    "application_name": "tidesync-users",
                    "TimeZone": "UTC",
                },
            )
        except (*_DRIVER_ERRORS, ValueError) as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn)
                rows = await conn.fetch(
                    "SELECT id FROM user_events WHERE at > now() - make_interval(secs => $1)",
                    EVENT_WINDOW,
                )
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, _DRIVER_ERRORS):
                raise StorageError(
                    f"PostgreSQL migration of the user tables failed: {exc}"
                ) from exc
            raise
        now = time.monotonic()
        self._seen = {int(r["id"]): now for r in rows}  # history: nothing to act on
        self._pool = pool
        self._wake = asyncio.Event()
        await self._connect_listener()
        self._watcher = asyncio.create_task(self._watch_loop(), name="tidesync-users-watch")

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        # the storage's lock and helper: one migrator of the schema at a time
        await run_migrations(
            conn, self._schema, "user_migrations", MIGRATIONS, "user tables of format"
        )

    async def _connect_listener(self) -> None:
        try:
            conn = await asyncpg.connect(
                self._dsn, command_timeout=self._command_timeout, timeout=10
            )
        except _DRIVER_ERRORS as exc:
            log.warning("user events: LISTEN connection failed (polling meanwhile): %s", exc)
            return
        try:
            await conn.add_listener(self._channel, self._on_notify)
        except _DRIVER_ERRORS as exc:
            conn.terminate()
            log.warning("user events: LISTEN failed (polling meanwhile): %s", exc)
            return
        self._listener = conn

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload.partition(":")[2] != self._instance:
            self._wake.set()

    async def _watch_loop(self) -> None:
        pruned = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            self._wake.clear()
            try:
                if self._listener is None or self._listener.is_closed():
                    self._listener = None
                    await self._connect_listener()
                await self._check_events()
                if time.monotonic() - pruned > EVENT_PRUNE_INTERVAL:
                    pruned = time.monotonic()
                    await self._db.execute(
                        "DELETE FROM user_events WHERE at < now() - make_interval(secs => $1)",
                        EVENT_RETENTION,
                    )
            except (*_DRIVER_ERRORS, StorageError) as exc:
                log.warning("user events: polling failed: %s", exc)

    async def _check_events(self) -> None:
        """Act on the recent user events this process has not seen yet."""
        rows = await self._db.fetch(
            "SELECT id, app_id, user_id, reason, family FROM user_events "
            "WHERE at > now() - make_interval(secs => $1) ORDER BY id",
            EVENT_WINDOW,
        )
        now = time.monotonic()
        for row in rows:
            event = int(row["id"])
            if event in self._seen:
                continue
            self._seen[event] = now
            try:
                if row["family"] is not None:
                    if self._login_ended is not None:
                        self._login_ended(row["app_id"], row["user_id"], row["family"])
                elif self._user_gone is not None:
                    self._user_gone(row["app_id"], row["user_id"], row["reason"])
            except Exception as exc:
                log.warning("user events: the listener failed: %r", exc)
        if len(self._seen) > 256:
            cutoff = now - 2 * EVENT_WINDOW
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}

    async def close(self) -> None:
        """Stop watching, close every connection."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await listener.close(timeout=5)
            except _DRIVER_ERRORS:
                listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except _DRIVER_ERRORS:
                pool.terminate()

    @property
    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("the user store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (in a transaction if asked); driver failures become
        :class:`StorageError`, unique violations pass through for the caller."""
        try:
            async with self._db.acquire() as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except asyncpg.UniqueViolationError:
            raise
        except asyncpg.CharacterNotInRepertoireError as exc:
            raise AuthError("text values must not contain NUL characters") from exc
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"the user database failed: {exc}") from exc

    async def _event(
        self,
        conn: asyncpg.Connection,
        app_id: str,
        user_id: str,
        reason: str,
        family: str | None = None,
    ) -> None:
        """Record that a user was disabled or deleted (or, with ``family``, that one login
        ended), for the other processes."""
        event = await conn.fetchval(
            "INSERT INTO user_events (app_id, user_id, reason, family) "
            "VALUES ($1, $2, $3, $4) RETURNING id",
            app_id,
            user_id,
            reason,
            family,
        )
        self._seen[int(event)] = time.monotonic()  # this process acts on it itself
        await conn.execute("SELECT pg_notify($1, $2)", self._channel, f"{event}:{self._instance}")

    async def signing_keys(self) -> list[SigningKey]:
        """The shared signing keys (the first process to ask creates the default one; once
        it is dropped after a rotation it is not made again)."""
        async with self._conn(transaction=True) as conn:
            await conn.execute(
                "INSERT INTO signing_keys (name, secret, signs_from) "
                "SELECT $1, $2, 0 WHERE NOT EXISTS (SELECT 1 FROM signing_keys) "
                "ON CONFLICT DO NOTHING",
                DEFAULT_KID,
                secrets.token_bytes(SECRET_BYTES),
            )
            rows = await conn.fetch("SELECT name, secret, signs_from FROM signing_keys")
        keys = [SigningKey(str(r["name"]), r["secret"], float(r["signs_from"])) for r in rows]
        if any(not isinstance(k.secret, bytes) or len(k.secret) < SECRET_BYTES for k in keys):
            raise AuthError("a signing secret in PostgreSQL is truncated")
        return keys

    async def add_signing_key(self, signs_from: float) -> SigningKey:
        """A new shared key (the default one is made first if need be)."""
        await self.signing_keys()
        key = SigningKey(uuid.uuid4().hex[:16], secrets.token_bytes(SECRET_BYTES), signs_from)
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO signing_keys (name, secret, signs_from) VALUES ($1, $2, $3)",
                key.kid,
                key.secret,
                key.signs_from,
            )
        return key

    async def drop_signing_keys(self, kids: list[str]) -> None:
        """Delete shared keys by id."""
        async with self._conn() as conn:
            await conn.execute("DELETE FROM signing_keys WHERE name = ANY($1::text[])", kids)

    # -- users ------------------------------------------------------------------------------

    async def create_user(
        self, app_id: str, provider: str, data: dict[str, Any] | None = None
    ) -> str:
        """A new user record; returns its id."""
        user_id = uuid.uuid4().hex
        async with self._conn() as conn:
            await _insert_user(conn, app_id, user_id, provider, data or {})
        return user_id

    async def user_for_identity(
        self, app_id: str, provider: str, external_id: str, data: dict[str, Any]
    ) -> str:
        """The user linked to an external identity (created on first login); the
        identity's fields are refreshed on every login."""
        async with self._conn(transaction=True) as conn:
            # One login at a time per identity, across processes: no duplicate users.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                f"tidesync-identity:{app_id}\x1f{provider}\x1f{external_id}",
            )
            found = await conn.fetchval(
                "SELECT user_id FROM identities WHERE app_id = $1 AND provider = $2 "
                "AND external_id = $3",
                app_id,
                provider,
                external_id,
            )
            if found is None:
                user_id = uuid.uuid4().hex
                await _insert_user(conn, app_id, user_id, provider, data)
                await conn.execute(
                    "INSERT INTO identities VALUES ($1, $2, $3, $4)",
                    app_id,
                    provider,
                    external_id,
                    user_id,
                )
            else:
                user_id = str(found)
                await conn.execute(
                    "UPDATE users SET data = $3 WHERE app_id = $1 AND user_id = $2",
                    app_id,
                    user_id,
                    json.dumps(data),
                )
        return user_id

    async def user_status(self, app_id: str, user_id: str) -> str | None:
        """ "active", "disabled" or None (no such user)."""
        if _has_nul(app_id, user_id):
            return None
        async with self._conn() as conn:
            disabled = await conn.fetchval(
                "SELECT disabled FROM users WHERE app_id = $1 AND user_id = $2", app_id, user_id
            )
        if disabled is None:
            return None
        return "disabled" if disabled else "active"

    async def user_data(self, app_id: str, user_id: str) -> dict[str, Any] | None:
        """The user's profile fields (from its provider), or None."""
        if _has_nul(app_id, user_id):
            return None
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT provider, data FROM users WHERE app_id = $1 AND user_id = $2",
                app_id,
                user_id,
            )
        if row is None:
            return None
        data: dict[str, Any] = json.loads(row["data"])
        return {"provider": row["provider"], **data}

    async def list_users(
        self, app_id: str, search: str = "", *, after: str = "", limit: int = 100
    ) -> list[UserRecord]:
        """The app's users by id (see :meth:`UserStore.list_users`)."""
        if _has_nul(app_id, search, after):
            return []
        sql = _USER_ROWS.format(where="u.user_id > $2") + (
            "WHERE $3 = '' OR left(user_id, length($3)) = $3 "
            "OR lower(left(email, length($3))) = lower($3) ORDER BY user_id LIMIT $4"
        )
        async with self._conn() as conn:
            rows = await conn.fetch(sql, app_id, after, search, page_size(limit))
        return [user_record(*row) for row in rows]

    async def get_user(self, app_id: str, user_id: str) -> UserRecord | None:
        """One user, or None."""
        if _has_nul(app_id, user_id):
            return None
        async with self._conn() as conn:
            row = await conn.fetchrow(_USER_ROWS.format(where="u.user_id = $2"), app_id, user_id)
        return None if row is None else user_record(*row)

    async def set_disabled(self, app_id: str, user_id: str, disabled: bool) -> bool:
        """Disable (or enable) a user; disabling revokes every refresh token and tells the
        other processes. False if the user does not exist."""
        if _has_nul(app_id, user_id):
            return False
        async with self._conn(transaction=True) as conn:
            status = await conn.execute(
                "UPDATE users SET disabled = $3 WHERE app_id = $1 AND user_id = $2",
                app_id,
                user_id,
                disabled,
            )
            found = _count(status) > 0
            if found and disabled:
                await conn.execute(
                    "UPDATE refresh_tokens SET revoked = true WHERE app_id = $1 AND user_id = $2",
                    app_id,
                    user_id,
                )
                await self._event(conn, app_id, user_id, DISABLED_REASON)
        return found

    async def delete_user(self, app_id: str, user_id: str) -> bool:
        """Delete a user and everything that lets it log in, and tell the other processes;
        False if it did not exist."""
        if _has_nul(app_id, user_id):
            return False
        async with self._conn(transaction=True) as conn:
            status = await conn.execute(
                "DELETE FROM users WHERE app_id = $1 AND user_id = $2", app_id, user_id
            )
            for table in ("identities", "email_accounts", "api_keys", "refresh_tokens"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE app_id = $1 AND user_id = $2", app_id, user_id
                )
            found = _count(status) > 0
            if found:
                await self._event(conn, app_id, user_id, DELETED_REASON)
        return found

    # -- email / password -------------------------------------------------------------------

    async def register_email(self, app_id: str, email: str, password: str, confirmed: bool) -> str:
        """Create an email/password account (and its user); returns the user id."""
        address = normalize_email(email)
        check_password(password)
        if _has_nul(password):
            raise AuthError("the password must not contain NUL characters")
        hashed = await asyncio.to_thread(self.hasher.hash, password)
        user_id = uuid.uuid4().hex
        try:
            async with self._conn(transaction=True) as conn:
                await conn.execute(
                    "INSERT INTO email_accounts VALUES ($1, $2, $3, $4, $5)",
                    app_id,
                    address,
                    user_id,
                    hashed,
                    confirmed,
                )
                await _insert_user(conn, app_id, user_id, "email_password", {"email": address})
        except asyncpg.UniqueViolationError:
            raise EmailTakenError("this email address is already registered") from None
        return user_id

    async def check_email_password(self, app_id: str, email: str, password: str) -> str | None:
        """The user id if ``email`` has ``password`` and is confirmed; None otherwise
        (unknown address and wrong password cost the same time). Raises
        :class:`AuthError` only for an unconfirmed account with the right password."""
        address = address_or_empty(email)
        row = None
        if address and not _has_nul(app_id):
            async with self._conn() as conn:
                row = await conn.fetchrow(
                    "SELECT user_id, password_hash, confirmed FROM email_accounts "
                    "WHERE app_id = $1 AND email = $2",
                    app_id,
                    address,
                )
        stored = str(row["password_hash"]) if row is not None else self._dummy_hash
        ok = await asyncio.to_thread(verify_password, self.hasher, stored, password)
        if not ok or row is None:
            return None
        if not row["confirmed"]:
            raise AuthError("the account's email address is not confirmed yet")
        if self.hasher.check_needs_rehash(stored):
            rehashed = await asyncio.to_thread(self.hasher.hash, password)
            async with self._conn() as conn:
                await conn.execute(
                    "UPDATE email_accounts SET password_hash = $3 "
                    "WHERE app_id = $1 AND email = $2 AND password_hash = $4",
                    app_id,
                    address,
                    rehashed,
                    stored,
                )
        return str(row["user_id"])

    async def email_exists(self, app_id: str, email: str) -> bool:
        """True if ``email`` has an account (confirmed or not)."""
        if _has_nul(app_id, email):
            return False
        async with self._conn() as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM email_accounts WHERE app_id = $1 AND email = $2", app_id, email
            )
        return found is not None

    async def set_password(self, app_id: str, email: str, password: str) -> bool:
        """Set a new password; revokes the user's refresh tokens. False if no account."""
        check_password(password)
        if _has_nul(password):
            raise AuthError("the password must not contain NUL characters")
        if _has_nul(app_id, email):
            return False
        hashed = await asyncio.to_thread(self.hasher.hash, password)
        async with self._conn(transaction=True) as conn:
            user_id = await conn.fetchval(
                "SELECT user_id FROM email_accounts WHERE app_id = $1 AND email = $2 FOR UPDATE",
                app_id,
                email,
            )
            if user_id is None:
                return False
            # The user's row lock orders this with refresh-token rotations.
            await conn.execute(
                "SELECT 1 FROM users WHERE app_id = $1 AND user_id = $2 FOR UPDATE",
                app_id,
                user_id,
            )
            await conn.execute(
                "UPDATE email_accounts SET password_hash = $3 WHERE app_id = $1 AND email = $2",
                app_id,
                email,
                hashed,
            )
            await conn.execute(
                "UPDATE refresh_tokens SET revoked = true WHERE app_id = $1 AND user_id = $2",
                app_id,
                user_id,
            )
        return True

    async def confirm_email(self, app_id: str, email: str) -> bool:
        """Mark an account confirmed; False if there is no such account."""
        if _has_nul(app_id, email):
            return False
        async with self._conn() as conn:
            status = await conn.execute(
                "UPDATE email_accounts SET confirmed = true WHERE app_id = $1 AND email = $2",
                app_id,
                email,
            )
        return _count(status) > 0

    async def add_pending(self, app_id: str, kind: str, email: str) -> str:
        """A new confirmation or reset token for ``email`` (only its hash is stored)."""
        token = new_secret()
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO pending_tokens VALUES ($1, $2, $3, $4, $5)",
                token_hash(token),
                app_id,
                kind,
                email,
                time.time() + PENDING_TOKEN_TTL,
            )
        return token

    async def take_pending(self, app_id: str, kind: str, token: str) -> str | None:
        """Consume a pending token (once, even with several processes): the email it was
        issued for, or None if unknown, of another kind or app, or expired."""
        if not isinstance(token, str) or not token or _has_nul(app_id, kind):
            return None
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "DELETE FROM pending_tokens WHERE token_hash = $1 AND app_id = $2 AND kind = $3 "
                "RETURNING email, expires_at",
                token_hash(token),
                app_id,
                kind,
            )
        if row is None or float(row["expires_at"]) <= time.time():
            return None
        return str(row["email"])

    # -- API keys ---------------------------------------------------------------------------

    async def create_api_key(self, app_id: str, user_id: str, name: str) -> tuple[ApiKeyInfo, str]:
        """A new key for ``user_id``: its info and the key itself (shown once)."""
        if (
            not isinstance(name, str)
            or not name.strip()
            or len(name) > MAX_KEY_NAME_LENGTH
            or _has_nul(name)
        ):
            raise AuthError(
                f"an API key needs a name of 1 to {MAX_KEY_NAME_LENGTH} characters (no NUL)"
            )
        key = "tsk_" + new_secret()
        info = ApiKeyInfo(uuid.uuid4().hex, name, False, time.time())
        try:
            async with self._conn() as conn:
                await conn.execute(
                    "INSERT INTO api_keys (key_id, app_id, user_id, name, key_hash, created_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    info.id,
                    app_id,
                    user_id,
                    name,
                    token_hash(key),
                    info.created_at,
                )
        except asyncpg.UniqueViolationError:
            raise AuthError(f"an API key named {name!r} already exists") from None
        return info, key

    async def list_api_keys(self, app_id: str, user_id: str) -> list[ApiKeyInfo]:
        """The user's keys, oldest first."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT key_id, name, disabled, created_at FROM api_keys "
                "WHERE app_id = $1 AND user_id = $2 ORDER BY created_at, key_id",
                app_id,
                user_id,
            )
        return [
            ApiKeyInfo(str(r["key_id"]), str(r["name"]), bool(r["disabled"]), r["created_at"])
            for r in rows
        ]

    async def set_api_key_disabled(
        self, app_id: str, user_id: str, key_id: str, disabled: bool
    ) -> bool:
        """Disable or enable one of the user's keys; False if it has no such key."""
        if _has_nul(key_id):
            return False
        async with self._conn() as conn:
            status = await conn.execute(
                "UPDATE api_keys SET disabled = $4 WHERE app_id = $1 AND user_id = $2 "
                "AND key_id = $3",
                app_id,
                user_id,
                key_id,
                disabled,
            )
        return _count(status) > 0

    async def delete_api_key(self, app_id: str, user_id: str, key_id: str) -> bool:
        """Delete one of the user's keys; False if it has no such key."""
        if _has_nul(key_id):
            return False
        async with self._conn() as conn:
            status = await conn.execute(
                "DELETE FROM api_keys WHERE app_id = $1 AND user_id = $2 AND key_id = $3",
                app_id,
                user_id,
                key_id,
            )
        return _count(status) > 0

    async def user_for_api_key(self, app_id: str, key: str) -> str | None:
        """The owner of an enabled key of ``app_id``, or None."""
        if not isinstance(key, str) or not key or _has_nul(app_id):
            return None
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT user_id, disabled FROM api_keys WHERE app_id = $1 AND key_hash = $2",
                app_id,
                token_hash(key),
            )
        if row is None or row["disabled"]:
            return None
        return str(row["user_id"])

    # -- refresh tokens ---------------------------------------------------------------------

    async def add_refresh(
        self, app_id: str, user_id: str, token: str, expires_at: float, family: str | None = None
    ) -> None:
        """Store a refresh token's hash (``family`` links the tokens of one login) and note
        the login's time as the user's last login."""
        async with self._conn(transaction=True) as conn:
            await conn.execute(
                "UPDATE users SET last_login_at = $1 WHERE app_id = $2 AND user_id = $3",
                time.time(),
                app_id,
                user_id,
            )
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, app_id, user_id, family, expires_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                token_hash(token),
                app_id,
                user_id,
                family or uuid.uuid4().hex,
                expires_at,
            )

    async def get_refresh(self, token: str) -> RefreshRecord | None:
        """The stored record of a refresh token, or None."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT app_id, user_id, family, expires_at, revoked, replaced_at "
                "FROM refresh_tokens WHERE token_hash = $1",
                token_hash(token),
            )
        if row is None:
            return None
        return RefreshRecord(
            str(row["app_id"]),
            str(row["user_id"]),
            str(row["family"]),
            float(row["expires_at"]),
            bool(row["revoked"]),
            row["replaced_at"],
        )

    async def rotate_refresh(
        self,
        app_id: str,
        user_id: str,
        token: str,
        new_token: str,
        expires_at: float,
        now: float,
        grace: float,
    ) -> RefreshOutcome:
        """Exchange a refresh token for a new one in one transaction that holds the user's
        row lock (see :meth:`UserStore.rotate_refresh`)."""
        if _has_nul(app_id, user_id):
            return RefreshOutcome.UNKNOWN
        digest = token_hash(token)
        async with self._conn(transaction=True) as conn:
            disabled = await conn.fetchval(
                "SELECT disabled FROM users WHERE app_id = $1 AND user_id = $2 FOR UPDATE",
                app_id,
                user_id,
            )
            row = await conn.fetchrow(
                "SELECT app_id, user_id, family, revoked, replaced_at FROM refresh_tokens "
                "WHERE token_hash = $1",
                digest,
            )
            if row is None or row["app_id"] != app_id or row["user_id"] != user_id:
                return RefreshOutcome.UNKNOWN
            if disabled is None or disabled:
                return RefreshOutcome.DISABLED
            if row["revoked"]:
                return RefreshOutcome.REVOKED
            replaced = row["replaced_at"]
            if replaced is not None and now - float(replaced) > grace:
                await conn.execute(
                    "UPDATE refresh_tokens SET revoked = true WHERE family = $1", row["family"]
                )
                return RefreshOutcome.REUSED
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, app_id, user_id, family, expires_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                token_hash(new_token),
                app_id,
                user_id,
                row["family"],
                expires_at,
            )
            await conn.execute(
                "UPDATE refresh_tokens SET replaced_at = $2 "
                "WHERE token_hash = $1 AND replaced_at IS NULL",
                digest,
                now,
            )
        return RefreshOutcome.ROTATED

    async def revoke_refresh(self, token: str) -> None:
        """Revoke one refresh token."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE refresh_tokens SET revoked = true WHERE token_hash = $1",
                token_hash(token),
            )

    async def end_login(self, app_id: str, user_id: str, family: str) -> None:
        """Revoke every refresh token of one login and tell the other processes, in one
        transaction."""
        async with self._conn(transaction=True) as conn:
            await conn.execute(
                "UPDATE refresh_tokens SET revoked = true "
                "WHERE family = $1 AND app_id = $2 AND user_id = $3",
                family,
                app_id,
                user_id,
            )
            await self._event(conn, app_id, user_id, LOGGED_OUT_REASON, family)

    async def login_active(self, family: str) -> bool:
        """True while the login has a refresh token that is not revoked."""
        async with self._conn() as conn:
            row = await conn.fetchval(
                "SELECT 1 FROM refresh_tokens WHERE family = $1 AND NOT revoked LIMIT 1", family
            )
        return row is not None

    async def purge_expired(self, now: float) -> int:
        """Delete expired refresh and pending tokens; returns how many rows went."""
        async with self._conn(transaction=True) as conn:
            a = await conn.execute("DELETE FROM refresh_tokens WHERE expires_at <= $1", now)
            b = await conn.execute("DELETE FROM pending_tokens WHERE expires_at <= $1", now)
        return _count(a) + _count(b)

    async def drop_tables(self) -> None:
        """Drop the user tables (tests, decommissioning); the storage's tables stay."""
        async with self._conn(transaction=True) as conn:
            for table in (
                "users",
                "identities",
                "email_accounts",
                "pending_tokens",
                "api_keys",
                "refresh_tokens",
                "signing_keys",
                "user_events",
                "user_migrations",
            ):
                await conn.execute(f"DROP TABLE IF EXISTS {table}")


async def _insert_user(
    conn: asyncpg.Connection, app_id: str, user_id: str, provider: str, data: dict[str, Any]
) -> None:
    """Add a user record, created now."""
    await conn.execute(
        "INSERT INTO users (app_id, user_id, provider, created_at, data) "
        "VALUES ($1, $2, $3, $4, $5)",
        app_id,
        user_id,
        provider,
        time.time(),
        json.dumps(data),
    )


__all__ = ["FORMAT_VERSION", "MIGRATIONS", "PostgresUserStore"]
