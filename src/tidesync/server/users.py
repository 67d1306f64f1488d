"""User records of the sync server: accounts, identities, API keys, refresh tokens, secret.

:class:`UserStore` is the interface the authenticator uses; two implementations exist:

- :class:`SQLiteUserStore` (the default, with SQLite storage): ``users.sqlite3`` and the
  token signing secret ``secret.key`` in the data folder, for one server process;
- :class:`~tidesync.server.users_pg.PostgresUserStore` (with PostgreSQL storage): the same
  records in the storage's PostgreSQL schema, so every server process on that database
  shares users, tokens and the signing secret, and a user disabled or deleted through one
  process loses its live connections on all of them.

:func:`user_store_for` picks the one that matches the storage URL. Nothing secret is
stored in clear:

- passwords: argon2id hashes (``argon2-cffi``'s defaults, salted, tunable cost);
- API keys, refresh tokens, confirmation and reset tokens: SHA-256 of the token. These
  are 256-bit random values, so a fast hash is enough and lookups stay indexed.

Every method is a coroutine; blocking work (SQLite, argon2) runs in worker threads so the
event loop never waits on disk or on a password hash.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ..errors import AuthError
from .signing import DEFAULT_KID, SigningKey, current_key

USERS_FILE = "users.sqlite3"
#: The signing secret's file in the data folder (SQLite user store).
SECRET_FILE = "secret.key"
#: Bytes of a token signing secret.
SECRET_BYTES = 32
MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 6
MAX_PASSWORD_LENGTH = 256
MAX_KEY_NAME_LENGTH = 128
#: How long confirmation and reset tokens stay valid (seconds).
PENDING_TOKEN_TTL = 24 * 3600.0
#: The most users :meth:`UserStore.list_users` answers at once.
MAX_USER_PAGE = 500
#: Reasons given to live connections of a user that was disabled or deleted.
DISABLED_REASON = "the user was disabled"
DELETED_REASON = "the user was deleted"

#: Called with (app_id, user_id, reason) when another server process disabled or deleted a
#: user (only stores shared by several processes call it).
UserGoneListener = Callable[[str, str, str], None]
#: Called with (app_id, user_id, family) when another server process ended one login (a
#: logout): the live connections authenticated by that login's tokens must close.
LoginEndedListener = Callable[[str, str, str], None]
#: The reason given to the live connections of a login that was logged out.
LOGGED_OUT_REASON = "the login was logged out"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    app_id TEXT NOT NULL, user_id TEXT NOT NULL, provider TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (app_id, user_id)
);
CREATE TABLE IF NOT EXISTS identities (
    app_id TEXT NOT NULL, provider TEXT NOT NULL, external_id TEXT NOT NULL,
    user_id TEXT NOT NULL, PRIMARY KEY (app_id, provider, external_id)
);
CREATE TABLE IF NOT EXISTS email_accounts (
    app_id TEXT NOT NULL, email TEXT NOT NULL, user_id TEXT NOT NULL,
    password_hash TEXT NOT NULL, confirmed INTEGER NOT NULL,
    PRIMARY KEY (app_id, email)
);
CREATE TABLE IF NOT EXISTS pending_tokens (
    token_hash TEXT PRIMARY KEY, app_id TEXT NOT NULL, kind TEXT NOT NULL,
    email TEXT NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE, disabled INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY, app_id TEXT NOT NULL, user_id TEXT NOT NULL,
    family TEXT NOT NULL, expires_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
    replaced_at REAL
);
CREATE INDEX IF NOT EXISTS refresh_by_user ON refresh_tokens (app_id, user_id);
CREATE INDEX IF NOT EXISTS refresh_by_family ON refresh_tokens (family);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY, secret BLOB NOT NULL, signs_from REAL NOT NULL
);
"""


_INSERT_USER = (
    "INSERT INTO users (app_id, user_id, provider, disabled, created_at, data) "
    "VALUES (?, ?, ?, 0, ?, ?)"
)
#: Columns added to the SQLite tables after their first release: (table, column, type).
_ADDED_COLUMNS = (("users", "last_login_at", "REAL"),)


class EmailTakenError(AuthError):
    """The email address is registered already (the HTTP API answers as for a new one)."""


def token_hash(token: str) -> str:
    """SHA-256 (hex) of a high-entropy secret: what the store keeps instead of the secret."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    """A fresh 256-bit random secret, URL-safe."""
    return secrets.token_urlsafe(32)


def address_or_empty(email: str) -> str:
    """:func:`normalize_email`, or "" for something that is not an address (a login with
    it then fails like a wrong password, in the same time)."""
    try:
        return normalize_email(email)
    except AuthError:
        return ""


def normalize_email(email: str) -> str:
    """``email`` trimmed and lower-cased; raises :class:`AuthError` if it is not an address."""
    if not isinstance(email, str):
        raise AuthError("the email address must be a string")
    value = email.strip().lower()
    local, at, domain = value.partition("@")
    if (
        not at
        or not local
        or "." not in domain
        or "@" in domain
        or len(value) > MAX_EMAIL_LENGTH
        or any(c.isspace() or ord(c) < 32 for c in value)
    ):
        raise AuthError("the email address is not valid")
    return value


def check_password(password: str) -> None:
    """Raise :class:`AuthError` if ``password`` is unacceptable as a new password."""
    if not isinstance(password, str):
        raise AuthError("the password must be a string")
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise AuthError(
            f"the password must have {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters"
        )


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """An API key as its owner sees it (the key itself is shown only once, at creation)."""

    id: str
    name: str
    disabled: bool
    created_at: float

    def to_json(self) -> dict[str, Any]:
        """The JSON form sent over HTTP."""
        return {
            "id": self.id,
            "name": self.name,
            "disabled": self.disabled,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as an operator sees it: no credentials, no profile beyond the e-mail.

    ``last_login_at`` is the last login's time (a new login; refreshing its tokens is not
    one), None for a user that has not logged in since the stores kept it."""

    user_id: str
    provider: str
    disabled: bool
    #: When the user was made (seconds since the epoch).
    created_at: float
    #: The e-mail/password account's address, else the provider's ``email`` field.
    email: str | None
    #: When the user last logged in (None: not since login times are kept).
    last_login_at: float | None

    def to_json(self) -> dict[str, Any]:
        """The JSON form sent over HTTP."""
        return {
            "user_id": self.user_id,
            "provider": self.provider,
            "disabled": self.disabled,
            "created_at": self.created_at,
            "email": self.email,
            "last_login": self.last_login_at,
        }


def user_record(
    user_id: str,
    provider: str,
    disabled: object,
    created_at: float,
    data: str,
    email: object,
    last_login_at: float | None,
) -> UserRecord:
    """A :class:`UserRecord` from a row of the list query (both stores)."""
    if not isinstance(email, str):
        try:
            found = json.loads(data).get("email")
        except (ValueError, AttributeError):
            found = None
        email = found if isinstance(found, str) else None
    last = None if last_login_at is None else float(last_login_at)
    return UserRecord(str(user_id), str(provider), bool(disabled), float(created_at), email, last)


def page_size(limit: int) -> int:
    """``limit`` bounded to 1..:data:`MAX_USER_PAGE`."""
    return max(1, min(int(limit), MAX_USER_PAGE))


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    """A stored refresh token (by hash)."""

    app_id: str
    user_id: str
    family: str
    expires_at: float
    revoked: bool
    replaced_at: float | None


class RefreshOutcome(enum.Enum):
    """What :meth:`UserStore.rotate_refresh` did with a presented refresh token."""

    #: Rotated: the new token is stored, the old one retired (usable for the grace period).
    ROTATED = "rotated"
    #: No such token (never issued, deleted with its user, or of another app or user).
    UNKNOWN = "unknown"
    #: The token's user is disabled (or gone).
    DISABLED = "disabled"
    #: The token was revoked (logged out, password changed, login revoked).
    REVOKED = "revoked"
    #: The token had been rotated and was presented again after the grace period: the
    #: whole login (its token family) is now revoked.
    REUSED = "reused"


def load_or_create_secret(data_dir: Path) -> bytes:
    """The signing secret in ``data_dir/secret.key``, created (mode 0600) on first use."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = -1
    if fd < 0:
        secret = path.read_bytes()
        if len(secret) < SECRET_BYTES:
            raise AuthError(f"{path}: the signing secret is truncated; delete it to start over")
        return secret
    secret = os.urandom(SECRET_BYTES)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


def verify_password(hasher: PasswordHasher, stored: str, password: object) -> bool:
    """True if ``password`` matches the argon2 hash ``stored`` (blocking: argon2)."""
    if not isinstance(password, str):
        return False
    try:
        return bool(hasher.verify(stored, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class UserStore(ABC):
    """Where one server keeps its users, their credentials and the token signing secret.

    Call :meth:`open` before anything else and :meth:`close` at shutdown. Every method is
    safe to call concurrently from one event loop.
    """

    def __init__(self) -> None:
        self._user_gone: UserGoneListener | None = None
        self._login_ended: LoginEndedListener | None = None

    @abstractmethod
    async def open(self) -> None:
        """Connect (and create or migrate the tables)."""

    @abstractmethod
    async def close(self) -> None:
        """Release every connection and stop every background task."""

    def set_user_gone_listener(self, listener: UserGoneListener | None) -> None:
        """Be told when another server process disables or deletes a user (the stores
        that are shared by several processes call it; this process's own changes do not)."""
        self._user_gone = listener

    def set_login_ended_listener(self, listener: LoginEndedListener | None) -> None:
        """Be told when another server process ends one login (:meth:`end_login`; shared
        stores call it, this process's own logouts do not)."""
        self._login_ended = listener

    @abstractmethod
    async def signing_keys(self) -> list[SigningKey]:
        """Every kept token signing key (the first call creates the default one)."""

    @abstractmethod
    async def add_signing_key(self, signs_from: float) -> SigningKey:
        """A new random signing key that signs from ``signs_from`` (a rotation)."""

    @abstractmethod
    async def drop_signing_keys(self, kids: list[str]) -> None:
        """Forget these keys: tokens they signed no longer verify."""

    async def signing_secret(self) -> bytes:
        """The secret of the key that signs now (created on first use)."""
        return current_key(await self.signing_keys(), time.time()).secret

    # -- users ------------------------------------------------------------------------------

    @abstractmethod
    async def create_user(
        self, app_id: str, provider: str, data: dict[str, Any] | None = None
    ) -> str:
        """A new user record; returns its id."""

    @abstractmethod
    async def user_for_identity(
        self, app_id: str, provider: str, external_id: str, data: dict[str, Any]
    ) -> str:
        """The user linked to an external identity (created on first login); the
        identity's fields are refreshed on every login."""

    @abstractmethod
    async def user_status(self, app_id: str, user_id: str) -> str | None:
        """ "active", "disabled" or None (no such user)."""

    @abstractmethod
    async def user_data(self, app_id: str, user_id: str) -> dict[str, Any] | None:
        """The user's profile fields (from its provider), or None."""

    @abstractmethod
    async def set_disabled(self, app_id: str, user_id: str, disabled: bool) -> bool:
        """Disable (or enable) a user; disabling revokes every refresh token. False if the
        user does not exist."""

    @abstractmethod
    async def list_users(
        self, app_id: str, search: str = "", *, after: str = "", limit: int = 100
    ) -> list[UserRecord]:
        """The app's users by id, from the first id greater than ``after``, at most
        ``limit`` (bounded by :data:`MAX_USER_PAGE`). A ``search`` keeps those whose id
        starts with it, or whose e-mail/password account's address does (ignoring case; a
        provider's ``email`` profile field is shown, not searched)."""

    @abstractmethod
    async def get_user(self, app_id: str, user_id: str) -> UserRecord | None:
        """One user, or None."""

    @abstractmethod
    async def delete_user(self, app_id: str, user_id: str) -> bool:
        """Delete a user and everything that lets it log in; False if it did not exist."""

    # -- email / password -------------------------------------------------------------------

    @abstractmethod
    async def register_email(self, app_id: str, email: str, password: str, confirmed: bool) -> str:
        """Create an email/password account (and its user); returns the user id.

        Raises :class:`AuthError` if the address is already registered or the password
        is unacceptable."""

    @abstractmethod
    async def check_email_password(self, app_id: str, email: str, password: str) -> str | None:
        """The user id if ``email`` has ``password`` and is confirmed; None otherwise
        (unknown address and wrong password cost the same time). Raises
        :class:`AuthError` only for an unconfirmed account with the right password."""

    @abstractmethod
    async def email_exists(self, app_id: str, email: str) -> bool:
        """True if ``email`` has an account (confirmed or not)."""

    @abstractmethod
    async def set_password(self, app_id: str, email: str, password: str) -> bool:
        """Set a new password; revokes the user's refresh tokens. False if no account."""

    @abstractmethod
    async def confirm_email(self, app_id: str, email: str) -> bool:
        """Mark an account confirmed; False if there is no such account."""

    @abstractmethod
    async def add_pending(self, app_id: str, kind: str, email: str) -> str:
        """A new confirmation or reset token for ``email`` (only its hash is stored)."""

    @abstractmethod
    async def take_pending(self, app_id: str, kind: str, token: str) -> str | None:
        """Consume a pending token: the email it was issued for, or None if it is
        unknown, of another kind or app, or expired. A token works once."""

    # -- API keys ---------------------------------------------------------------------------

    @abstractmethod
    async def create_api_key(self, app_id: str, user_id: str, name: str) -> tuple[ApiKeyInfo, str]:
        """A new key for ``user_id``: its info and the key itself (shown once)."""

    @abstractmethod
    async def list_api_keys(self, app_id: str, user_id: str) -> list[ApiKeyInfo]:
        """The user's keys, oldest first."""

    @abstractmethod
    async def set_api_key_disabled(
        self, app_id: str, user_id: str, key_id: str, disabled: bool
    ) -> bool:
        """Disable or enable one of the user's keys; False if it has no such key."""

    @abstractmethod
    async def delete_api_key(self, app_id: str, user_id: str, key_id: str) -> bool:
        """Delete one of the user's keys; False if it has no such key."""

    @abstractmethod
    async def user_for_api_key(self, app_id: str, key: str) -> str | None:
        """The owner of an enabled key of ``app_id``, or None."""

    # -- refresh tokens ---------------------------------------------------------------------

    @abstractmethod
    async def add_refresh(
        self, app_id: str, user_id: str, token: str, expires_at: float, family: str | None = None
    ) -> None:
        """Store a refresh token's hash (``family`` links the tokens of one login)."""

    @abstractmethod
    async def get_refresh(self, token: str) -> RefreshRecord | None:
        """The stored record of a refresh token, or None."""

    @abstractmethod
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
        """Exchange refresh ``token`` of ``user_id`` for ``new_token``, atomically.

        The old token stays usable for ``grace`` seconds after its first rotation (two
        concurrent refreshes of one client); presented later, it revokes its whole family
        (every token of that login) and the answer is :attr:`RefreshOutcome.REUSED`. The
        check and the change are one transaction, serialised with every other rotation,
        disabling and deletion of the same user (across processes where the store is
        shared), so a revoked login never gains a live token."""

    @abstractmethod
    async def revoke_refresh(self, token: str) -> None:
        """Revoke one refresh token."""

    @abstractmethod
    async def end_login(self, app_id: str, user_id: str, family: str) -> None:
        """End one login (a logout): revoke every refresh token of ``family``, so that
        :meth:`login_active` answers False for it on every process from now on, and tell
        the other processes (their login-ended listeners)."""

    @abstractmethod
    async def login_active(self, family: str) -> bool:
        """True while the login ``family`` has a refresh token that is not revoked (an
        access token of an ended login, or of a disabled or deleted user, is refused)."""

    @abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Delete expired refresh and pending tokens; returns how many rows went."""


def user_store_for(storage_url: str, data_dir: str | Path) -> UserStore:
    """The user store that goes with a storage: PostgreSQL (the storage's schema) for a
    ``postgresql://`` URL, else SQLite in ``data_dir``."""
    if storage_url:
        from .users_pg import PostgresUserStore  # needs the ``postgres`` extra

        return PostgresUserStore.from_url(storage_url)
    return SQLiteUserStore.in_folder(data_dir)


class SQLiteUserStore(UserStore):
    """Users in ``users.sqlite3`` and the signing secret in ``secret.key``, in one folder.

    For one server process: a second process on another machine would not see them.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        secret_dir: str | Path | None = None,
        hasher: PasswordHasher | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self._secret_dir = Path(secret_dir) if secret_dir is not None else self.path.parent
        self._hasher = hasher
        self._db: _SQLiteUsers | None = None

    @classmethod
    def in_folder(cls, data_dir: str | Path, **kwargs: Any) -> SQLiteUserStore:
        """The store in ``data_dir/users.sqlite3`` (secret in ``data_dir/secret.key``)."""
        return cls(Path(data_dir) / USERS_FILE, **kwargs)

    async def open(self) -> None:
        """Open (and create) the database file."""
        if self._db is None:
            self._db = await asyncio.to_thread(_SQLiteUsers, self.path, hasher=self._hasher)

    async def close(self) -> None:
        """Close the database."""
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(db.close)

    @property
    def db(self) -> _SQLiteUsers:
        """The blocking implementation (open only)."""
        if self._db is None:
            raise AuthError("the user store is not open")
        return self._db

    async def signing_keys(self) -> list[SigningKey]:
        """The default key in ``secret.key`` (created, mode 0600, on first use, and gone
        once dropped after a rotation) and the rotated keys in ``users.sqlite3``."""
        return await asyncio.to_thread(self._signing_keys)

    def _signing_keys(self) -> list[SigningKey]:
        rotated = self.db.signing_key_rows()
        if rotated and not (self._secret_dir / SECRET_FILE).exists():
            return rotated  # the default key was dropped: never make it again
        default = SigningKey(DEFAULT_KID, load_or_create_secret(self._secret_dir), 0.0)
        return [default, *rotated]

    async def add_signing_key(self, signs_from: float) -> SigningKey:
        """A new key in ``users.sqlite3`` (the default key is made first if need be)."""
        await self.signing_keys()
        key = SigningKey(uuid.uuid4().hex[:16], os.urandom(SECRET_BYTES), signs_from)
        await asyncio.to_thread(self.db.add_signing_key, key)
        return key

    async def drop_signing_keys(self, kids: list[str]) -> None:
        """Delete the keys (the default one by deleting ``secret.key``)."""
        await asyncio.to_thread(self.db.drop_signing_keys, kids)
        if DEFAULT_KID in kids:
            (self._secret_dir / SECRET_FILE).unlink(missing_ok=True)

    async def create_user(
        self, app_id: str, provider: str, data: dict[str, Any] | None = None
    ) -> str:
        """A new user record; returns its id."""
        return await asyncio.to_thread(self.db.create_user, app_id, provider, data)

    async def user_for_identity(
        self, app_id: str, provider: str, external_id: str, data: dict[str, Any]
    ) -> str:
        """The user linked to an external identity (created on first login)."""
        return await asyncio.to_thread(
            self.db.user_for_identity, app_id, provider, external_id, data
        )

    async def user_status(self, app_id: str, user_id: str) -> str | None:
        """ "active", "disabled" or None (no such user)."""
        return await asyncio.to_thread(self.db.user_status, app_id, user_id)

    async def user_data(self, app_id: str, user_id: str) -> dict[str, Any] | None:
        """The user's profile fields (from its provider), or None."""
        return await asyncio.to_thread(self.db.user_data, app_id, user_id)

    async def set_disabled(self, app_id: str, user_id: str, disabled: bool) -> bool:
        """Disable (or enable) a user; disabling revokes every refresh token."""
        return await asyncio.to_thread(self.db.set_disabled, app_id, user_id, disabled)

    async def list_users(
        self, app_id: str, search: str = "", *, after: str = "", limit: int = 100
    ) -> list[UserRecord]:
        """The app's users by id (see :meth:`UserStore.list_users`)."""
        return await asyncio.to_thread(self.db.list_users, app_id, search, after, page_size(limit))

    async def get_user(self, app_id: str, user_id: str) -> UserRecord | None:
        """One user, or None."""
        return await asyncio.to_thread(self.db.get_user, app_id, user_id)

    async def delete_user(self, app_id: str, user_id: str) -> bool:
        """Delete a user and everything that lets it log in."""
        return await asyncio.to_thread(self.db.delete_user, app_id, user_id)

    async def register_email(self, app_id: str, email: str, password: str, confirmed: bool) -> str:
        """Create an email/password account (and its user); returns the user id."""
        return await asyncio.to_thread(self.db.register_email, app_id, email, password, confirmed)

    async def check_email_password(self, app_id: str, email: str, password: str) -> str | None:
        """The user id if ``email`` has ``password`` and is confirmed; None otherwise."""
        return await asyncio.to_thread(self.db.check_email_password, app_id, email, password)

    async def email_exists(self, app_id: str, email: str) -> bool:
        """True if ``email`` has an account (confirmed or not)."""
        return await asyncio.to_thread(self.db.email_exists, app_id, email)

    async def set_password(self, app_id: str, email: str, password: str) -> bool:
        """Set a new password; revokes the user's refresh tokens."""
        return await asyncio.to_thread(self.db.set_password, app_id, email, password)

    async def confirm_email(self, app_id: str, email: str) -> bool:
        """Mark an account confirmed; False if there is no such account."""
        return await asyncio.to_thread(self.db.confirm_email, app_id, email)

    async def add_pending(self, app_id: str, kind: str, email: str) -> str:
        """A new confirmation or reset token for ``email``."""
        return await asyncio.to_thread(self.db.add_pending, app_id, kind, email)

    async def take_pending(self, app_id: str, kind: str, token: str) -> str | None:
        """Consume a pending token: the email it was issued for, or None."""
        return await asyncio.to_thread(self.db.take_pending, app_id, kind, token)

    async def create_api_key(self, app_id: str, user_id: str, name: str) -> tuple[ApiKeyInfo, str]:
        """A new key for ``user_id``: its info and the key itself (shown once)."""
        return await asyncio.to_thread(self.db.create_api_key, app_id, user_id, name)

    async def list_api_keys(self, app_id: str, user_id: str) -> list[ApiKeyInfo]:
        """The user's keys, oldest first."""
        return await asyncio.to_thread(self.db.list_api_keys, app_id, user_id)

    async def set_api_key_disabled(
        self, app_id: str, user_id: str, key_id: str, disabled: bool
    ) -> bool:
        """Disable or enable one of the user's keys."""
        return await asyncio.to_thread(
            self.db.set_api_key_disabled, app_id, user_id, key_id, disabled
        )

    async def delete_api_key(self, app_id: str, user_id: str, key_id: str) -> bool:
        """Delete one of the user's keys."""
        return await asyncio.to_thread(self.db.delete_api_key, app_id, user_id, key_id)

    async def user_for_api_key(self, app_id: str, key: str) -> str | None:
        """The owner of an enabled key of ``app_id``, or None."""
        return await asyncio.to_thread(self.db.user_for_api_key, app_id, key)

    async def add_refresh(
        self, app_id: str, user_id: str, token: str, expires_at: float, family: str | None = None
    ) -> None:
        """Store a refresh token's hash."""
        await asyncio.to_thread(self.db.add_refresh, app_id, user_id, token, expires_at, family)

    async def get_refresh(self, token: str) -> RefreshRecord | None:
        """The stored record of a refresh token, or None."""
        return await asyncio.to_thread(self.db.get_refresh, token)

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
        """Exchange a refresh token for a new one, atomically (see :class:`UserStore`)."""
        return await asyncio.to_thread(
            self.db.rotate_refresh, app_id, user_id, token, new_token, expires_at, now, grace
        )

    async def revoke_refresh(self, token: str) -> None:
        """Revoke one refresh token."""
        await asyncio.to_thread(self.db.revoke_refresh, token)

    async def end_login(self, app_id: str, user_id: str, family: str) -> None:
        """Revoke every refresh token of one login (one process: no one else to tell)."""
        await asyncio.to_thread(self.db.end_login, app_id, user_id, family)

    async def login_active(self, family: str) -> bool:
        """True while the login has a refresh token that is not revoked."""
        return await asyncio.to_thread(self.db.login_active, family)

    async def purge_expired(self, now: float) -> int:
        """Delete expired refresh and pending tokens."""
        return await asyncio.to_thread(self.db.purge_expired, now)


class _SQLiteUsers:
    """The blocking SQLite implementation behind :class:`SQLiteUserStore`."""

    def __init__(self, path: str | Path, *, hasher: PasswordHasher | None = None) -> None:
        self.path = Path(path)
        self.hasher = hasher or PasswordHasher()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.touch(mode=0o600)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        for table, column, kind in _ADDED_COLUMNS:  # files made before the column
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                try:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # another opener added it just now
                    if "duplicate column" not in str(exc):
                        raise
        # A hash of a random password: verifying against it costs what a real check costs,
        # so an unknown email takes as long as a wrong password.
        self._dummy_hash = self.hasher.hash(new_secret())

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    # -- users ------------------------------------------------------------------------------

    def create_user(self, app_id: str, provider: str, data: dict[str, Any] | None = None) -> str:
        """A new user record; returns its id."""
        user_id = uuid.uuid4().hex
        with self._lock:
            self._run(
                _INSERT_USER,
                (app_id, user_id, provider, time.time(), json.dumps(data or {})),
            )
        return user_id

    def user_for_identity(
        self, app_id: str, provider: str, external_id: str, data: dict[str, Any]
    ) -> str:
        """The user linked to an external identity (created on first login); the
        identity's fields are refreshed on every login."""
        with self._lock:
            self._run("BEGIN IMMEDIATE")
            try:
                row = self._run(
                    "SELECT user_id FROM identities WHERE app_id=? AND provider=? "
                    "AND external_id=?",
                    (app_id, provider, external_id),
                ).fetchone()
                if row is None:
                    user_id = uuid.uuid4().hex
                    self._run(
                        _INSERT_USER,
                        (app_id, user_id, provider, time.time(), json.dumps(data)),
                    )
                    self._run(
                        "INSERT INTO identities VALUES (?, ?, ?, ?)",
                        (app_id, provider, external_id, user_id),
                    )
                else:
                    user_id = str(row[0])
                    self._run(
                        "UPDATE users SET data=? WHERE app_id=? AND user_id=?",
                        (json.dumps(data), app_id, user_id),
                    )
                self._run("COMMIT")
            except BaseException:
                self._run("ROLLBACK")
                raise
        return user_id

    def user_status(self, app_id: str, user_id: str) -> str | None:
        """ "active", "disabled" or None (no such user)."""
        with self._lock:
            row = self._run(
                "SELECT disabled FROM users WHERE app_id=? AND user_id=?", (app_id, user_id)
            ).fetchone()
        if row is None:
            return None
        return "disabled" if row[0] else "active"

    def user_data(self, app_id: str, user_id: str) -> dict[str, Any] | None:
        """The user's profile fields (from its provider), or None."""
        with self._lock:
            row = self._run(
                "SELECT provider, data FROM users WHERE app_id=? AND user_id=?", (app_id, user_id)
            ).fetchone()
        if row is None:
            return None
        data: dict[str, Any] = json.loads(row[1])
        return {"provider": row[0], **data}

    def set_disabled(self, app_id: str, user_id: str, disabled: bool) -> bool:
        """Disable (or enable) a user; disabling revokes every refresh token. False if the
        user does not exist."""
        with self._lock:
            cur = self._run(
                "UPDATE users SET disabled=? WHERE app_id=? AND user_id=?",
                (int(disabled), app_id, user_id),
            )
            if disabled:
                self._run(
                    "UPDATE refresh_tokens SET revoked=1 WHERE app_id=? AND user_id=?",
                    (app_id, user_id),
                )
        return cur.rowcount > 0

    _USER_ROWS = (
        "SELECT user_id, provider, disabled, created_at, data, email, last_login_at FROM ("
        " SELECT u.user_id, u.provider, u.disabled, u.created_at, u.data, u.last_login_at,"
        " (SELECT min(e.email) FROM email_accounts e"
        "  WHERE e.app_id = u.app_id AND e.user_id = u.user_id) AS email"
        " FROM users u WHERE u.app_id = ? AND {where}) AS t "
    )

    def list_users(self, app_id: str, search: str, after: str, limit: int) -> list[UserRecord]:
        """The app's users by id (see :meth:`UserStore.list_users`)."""
        sql = self._USER_ROWS.format(where="u.user_id > ?") + (
            "WHERE ? = '' OR substr(user_id, 1, length(?)) = ? "
            "OR lower(substr(email, 1, length(?))) = lower(?) ORDER BY user_id LIMIT ?"
        )
        with self._lock:
            rows = self._run(
                sql, (app_id, after, search, search, search, search, search, limit)
            ).fetchall()
        return [user_record(*row) for row in rows]

    def get_user(self, app_id: str, user_id: str) -> UserRecord | None:
        """One user, or None."""
        with self._lock:
            row = self._run(
                self._USER_ROWS.format(where="u.user_id = ?"), (app_id, user_id)
            ).fetchone()
        return None if row is None else user_record(*row)

    def delete_user(self, app_id: str, user_id: str) -> bool:
        """Delete a user and everything that lets it log in; False if it did not exist."""
        with self._lock:
            self._run("BEGIN IMMEDIATE")
            try:
                cur = self._run("DELETE FROM users WHERE app_id=? AND user_id=?", (app_id, user_id))
                for table in ("identities", "email_accounts", "api_keys", "refresh_tokens"):
                    self._run(
                        f"DELETE FROM {table} WHERE app_id=? AND user_id=?", (app_id, user_id)
                    )
                self._run("COMMIT")
            except BaseException:
                self._run("ROLLBACK")
                raise
        return cur.rowcount > 0

    # -- email / password -------------------------------------------------------------------

    def register_email(self, app_id: str, email: str, password: str, confirmed: bool) -> str:
        """Create an email/password account (and its user); returns the user id.

        Raises :class:`AuthError` if the address is already registered."""
        address = normalize_email(email)
        check_password(password)
        hashed = self.hasher.hash(password)
        user_id = uuid.uuid4().hex
        with self._lock:
            self._run("BEGIN IMMEDIATE")
            try:
                self._run(
                    "INSERT INTO email_accounts VALUES (?, ?, ?, ?, ?)",
                    (app_id, address, user_id, hashed, int(confirmed)),
                )
                self._run(
                    _INSERT_USER,
                    (
                        app_id,
                        user_id,
                        "email_password",
                        time.time(),
                        json.dumps({"email": address}),
                    ),
                )
                self._run("COMMIT")
            except sqlite3.IntegrityError:
                self._run("ROLLBACK")
                raise EmailTakenError("this email address is already registered") from None
            except BaseException:
                self._run("ROLLBACK")
                raise
        return user_id

    def check_email_password(self, app_id: str, email: str, password: str) -> str | None:
        """The user id if ``email`` has ``password`` and is confirmed; None otherwise
        (unknown address and wrong password cost the same time). Raises
        :class:`AuthError` only for an unconfirmed account with the right password."""
        address = address_or_empty(email)
        with self._lock:
            row = self._run(
                "SELECT user_id, password_hash, confirmed FROM email_accounts "
                "WHERE app_id=? AND email=?",
                (app_id, address),
            ).fetchone()
        stored = str(row[1]) if row is not None else self._dummy_hash
        try:
            ok: bool = isinstance(password, str) and self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if not ok or row is None:
            return None
        if not row[2]:
            raise AuthError("the account's email address is not confirmed yet")
        if self.hasher.check_needs_rehash(stored):
            self.set_password(app_id, address, password)
        return str(row[0])

    def email_exists(self, app_id: str, email: str) -> bool:
        """True if ``email`` has an account (confirmed or not)."""
        with self._lock:
            row = self._run(
                "SELECT 1 FROM email_accounts WHERE app_id=? AND email=?", (app_id, email)
            ).fetchone()
        return row is not None

    def set_password(self, app_id: str, email: str, password: str) -> bool:
        """Set a new password; revokes the user's refresh tokens. False if no account."""
        check_password(password)
        hashed = self.hasher.hash(password)
        with self._lock:
            row = self._run(
                "SELECT user_id FROM email_accounts WHERE app_id=? AND email=?", (app_id, email)
            ).fetchone()
            if row is None:
                return False
            self._run(
                "UPDATE email_accounts SET password_hash=? WHERE app_id=? AND email=?",
                (hashed, app_id, email),
            )
            self._run(
                "UPDATE refresh_tokens SET revoked=1 WHERE app_id=? AND user_id=?",
                (app_id, row[0]),
            )
        return True

    def confirm_email(self, app_id: str, email: str) -> bool:
        """Mark an account confirmed; False if there is no such account."""
        with self._lock:
            cur = self._run(
                "UPDATE email_accounts SET confirmed=1 WHERE app_id=? AND email=?", (app_id, email)
            )
        return cur.rowcount > 0

    def add_pending(self, app_id: str, kind: str, email: str) -> str:
        """A new confirmation or reset token for ``email`` (only its hash is stored)."""
        token = new_secret()
        with self._lock:
            self._run(
                "INSERT INTO pending_tokens VALUES (?, ?, ?, ?, ?)",
                (token_hash(token), app_id, kind, email, time.time() + PENDING_TOKEN_TTL),
            )
        return token

    def take_pending(self, app_id: str, kind: str, token: str) -> str | None:
        """Consume a pending token: the email it was issued for, or None if it is
        unknown, of another kind or app, or expired. A token works once."""
        if not isinstance(token, str) or not token:
            return None
        digest = token_hash(token)
        with self._lock:
            row = self._run(
                "SELECT app_id, kind, email, expires_at FROM pending_tokens WHERE token_hash=?",
                (digest,),
            ).fetchone()
            if row is None or row[0] != app_id or row[1] != kind:
                return None
            self._run("DELETE FROM pending_tokens WHERE token_hash=?", (digest,))
        if float(row[3]) <= time.time():
            return None
        return str(row[2])

    # -- API keys ---------------------------------------------------------------------------

    def create_api_key(self, app_id: str, user_id: str, name: str) -> tuple[ApiKeyInfo, str]:
        """A new key for ``user_id``: its info and the key itself (shown once)."""
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_KEY_NAME_LENGTH:
            raise AuthError(f"an API key needs a name of 1 to {MAX_KEY_NAME_LENGTH} characters")
        key = "tsk_" + new_secret()
        info = ApiKeyInfo(uuid.uuid4().hex, name, False, time.time())
        with self._lock:
            if self._run(
                "SELECT 1 FROM api_keys WHERE app_id=? AND user_id=? AND name=?",
                (app_id, user_id, name),
            ).fetchone():
                raise AuthError(f"an API key named {name!r} already exists")
            self._run(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, 0, ?)",
                (info.id, app_id, user_id, name, token_hash(key), info.created_at),
            )
        return info, key

    def list_api_keys(self, app_id: str, user_id: str) -> list[ApiKeyInfo]:
        """The user's keys, oldest first."""
        with self._lock:
            rows = self._run(
                "SELECT key_id, name, disabled, created_at FROM api_keys "
                "WHERE app_id=? AND user_id=? ORDER BY created_at",
                (app_id, user_id),
            ).fetchall()
        return [ApiKeyInfo(str(r[0]), str(r[1]), bool(r[2]), float(r[3])) for r in rows]

    def set_api_key_disabled(self, app_id: str, user_id: str, key_id: str, disabled: bool) -> bool:
        """Disable or enable one of the user's keys; False if it has no such key."""
        with self._lock:
            cur = self._run(
                "UPDATE api_keys SET disabled=? WHERE app_id=? AND user_id=? AND key_id=?",
                (int(disabled), app_id, user_id, key_id),
            )
        return cur.rowcount > 0

    def delete_api_key(self, app_id: str, user_id: str, key_id: str) -> bool:
        """Delete one of the user's keys; False if it has no such key."""
        with self._lock:
            cur = self._run(
                "DELETE FROM api_keys WHERE app_id=? AND user_id=? AND key_id=?",
                (app_id, user_id, key_id),
            )
        return cur.rowcount > 0

    def user_for_api_key(self, app_id: str, key: str) -> str | None:
        """The owner of an enabled key of ``app_id``, or None."""
        if not isinstance(key, str) or not key:
            return None
        with self._lock:
            row = self._run(
                "SELECT user_id, disabled FROM api_keys WHERE app_id=? AND key_hash=?",
                (app_id, token_hash(key)),
            ).fetchone()
        if row is None or row[1]:
            return None
        return str(row[0])

    # -- refresh tokens ---------------------------------------------------------------------

    def add_refresh(
        self, app_id: str, user_id: str, token: str, expires_at: float, family: str | None = None
    ) -> None:
        """Store a refresh token's hash (``family`` links the tokens of one login) and note
        the login's time as the user's last login."""
        with self._lock:
            self._run("BEGIN IMMEDIATE")
            try:
                self._run(
                    "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, ?, 0, NULL)",
                    (token_hash(token), app_id, user_id, family or uuid.uuid4().hex, expires_at),
                )
                self._run(
                    "UPDATE users SET last_login_at=? WHERE app_id=? AND user_id=?",
                    (time.time(), app_id, user_id),
                )
                self._run("COMMIT")
            except BaseException:
                self._run("ROLLBACK")
                raise

    def get_refresh(self, token: str) -> RefreshRecord | None:
        """The stored record of a refresh token, or None."""
        with self._lock:
            row = self._run(
                "SELECT app_id, user_id, family, expires_at, revoked, replaced_at "
                "FROM refresh_tokens WHERE token_hash=?",
                (token_hash(token),),
            ).fetchone()
        if row is None:
            return None
        return RefreshRecord(
            str(row[0]), str(row[1]), str(row[2]), float(row[3]), bool(row[4]), row[5]
        )

    def rotate_refresh(
        self,
        app_id: str,
        user_id: str,
        token: str,
        new_token: str,
        expires_at: float,
        now: float,
        grace: float,
    ) -> RefreshOutcome:
        """Exchange a refresh token for a new one in one transaction (see
        :meth:`UserStore.rotate_refresh`)."""
        digest = token_hash(token)
        with self._lock:
            self._run("BEGIN IMMEDIATE")
            try:
                outcome = self._rotate(app_id, user_id, digest, new_token, expires_at, now, grace)
                self._run("COMMIT")
            except BaseException:
                self._run("ROLLBACK")
                raise
        return outcome

    def _rotate(
        self,
        app_id: str,
        user_id: str,
        digest: str,
        new_token: str,
        expires_at: float,
        now: float,
        grace: float,
    ) -> RefreshOutcome:
        row = self._run(
            "SELECT app_id, user_id, family, revoked, replaced_at FROM refresh_tokens "
            "WHERE token_hash=?",
            (digest,),
        ).fetchone()
        if row is None or row[0] != app_id or row[1] != user_id:
            return RefreshOutcome.UNKNOWN
        user = self._run(
            "SELECT disabled FROM users WHERE app_id=? AND user_id=?", (app_id, user_id)
        ).fetchone()
        if user is None or user[0]:
            return RefreshOutcome.DISABLED
        if row[3]:
            return RefreshOutcome.REVOKED
        if row[4] is not None and now - float(row[4]) > grace:
            self._run("UPDATE refresh_tokens SET revoked=1 WHERE family=?", (row[2],))
            return RefreshOutcome.REUSED
        self._run(
            "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, ?, 0, NULL)",
            (token_hash(new_token), app_id, user_id, row[2], expires_at),
        )
        self._run(
            "UPDATE refresh_tokens SET replaced_at=? WHERE token_hash=? AND replaced_at IS NULL",
            (now, digest),
        )
        return RefreshOutcome.ROTATED

    def mark_replaced(self, token: str, now: float) -> None:
        """Record that a refresh token was rotated (it stays usable for a short grace)."""
        with self._lock:
            self._run(
                "UPDATE refresh_tokens SET replaced_at=? "
                "WHERE token_hash=? AND replaced_at IS NULL",
                (now, token_hash(token)),
            )

    def revoke_refresh(self, token: str) -> None:
        """Revoke one refresh token."""
        with self._lock:
            self._run(
                "UPDATE refresh_tokens SET revoked=1 WHERE token_hash=?", (token_hash(token),)
            )

    def signing_key_rows(self) -> list[SigningKey]:
        """The rotated signing keys (not the default one, which is a file)."""
        with self._lock:
            rows = self._run("SELECT kid, secret, signs_from FROM signing_keys").fetchall()
        return [SigningKey(str(k), bytes(s), float(f)) for k, s, f in rows]

    def add_signing_key(self, key: SigningKey) -> None:
        """Store one rotated key."""
        with self._lock:
            self._run(
                "INSERT INTO signing_keys VALUES (?, ?, ?)", (key.kid, key.secret, key.signs_from)
            )

    def drop_signing_keys(self, kids: list[str]) -> None:
        """Delete rotated keys by id."""
        with self._lock:
            for kid in kids:
                self._run("DELETE FROM signing_keys WHERE kid=?", (kid,))

    def end_login(self, app_id: str, user_id: str, family: str) -> None:
        """Revoke every refresh token of one login of one user."""
        with self._lock:
            self._run(
                "UPDATE refresh_tokens SET revoked=1 WHERE family=? AND app_id=? AND user_id=?",
                (family, app_id, user_id),
            )

    def login_active(self, family: str) -> bool:
        """True while the login has a refresh token that is not revoked."""
        with self._lock:
            row = self._run(
                "SELECT 1 FROM refresh_tokens WHERE family=? AND revoked=0 LIMIT 1", (family,)
            ).fetchone()
        return row is not None

    def revoke_family(self, family: str) -> None:
        """Revoke every token of one login (a rotated token was reused: likely stolen)."""
        with self._lock:
            self._run("UPDATE refresh_tokens SET revoked=1 WHERE family=?", (family,))

    def purge_expired(self, now: float) -> int:
        """Delete expired refresh and pending tokens; returns how many rows went."""
        with self._lock:
            a = self._run("DELETE FROM refresh_tokens WHERE expires_at <= ?", (now,)).rowcount
            b = self._run("DELETE FROM pending_tokens WHERE expires_at <= ?", (now,)).rowcount
        return a + b
