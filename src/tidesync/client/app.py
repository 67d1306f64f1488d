"""``App``, ``User`` and ``Credentials``: logging in to a tidesync server and keeping tokens.

An :class:`App` talks to one server for one app id. Logging in returns a :class:`User` with
an access token (short-lived) and a refresh token; users are kept in ``base_path`` (file mode
0600) so they survive restarts. Every synced database of a user shares one WebSocket.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jwt

from ..errors import AuthError, TidesyncError, TooManyAttemptsError
from .calls import awaitable, blocking_form
from .urls import check_app_id, check_base_url, host_and_port
from .wording import describe_failure

if TYPE_CHECKING:
    from .config import SyncConfiguration
    from .database import Database
    from .session import Session
    from .syncclient import SyncClient


@dataclass(frozen=True)
class SyncTimeoutOptions:
    """Timeouts and reconnect backoff of sync connections, in seconds."""

    connect_timeout: float = 120.0
    connection_linger_time: float = 30.0
    ping_keep_alive_period: float = 60.0
    pong_keep_alive_timeout: float = 120.0
    fast_reconnect_limit: float = 60.0
    reconnect_initial_delay: float = 1.0
    reconnect_max_delay: float = 300.0
    reconnect_urgent_ping_timeout: float = 5.0


@dataclass(frozen=True)
class AppConfiguration:
    """Where the server is and where this app keeps its files.

    ``app_id`` and ``base_url`` are checked here: a bad one raises
    :class:`~tidesync.ConfigurationError` naming it and what is wrong (``base_url`` is
    ``http://`` or ``https://``, a host, an optional port in 1-65535 and no path beyond a
    trailing ``/``; docs/sync-session.md, "Logging")."""

    app_id: str
    base_url: str = "http://127.0.0.1:8765"
    base_path: str | Path | None = None
    sync_timeouts: SyncTimeoutOptions = field(default_factory=SyncTimeoutOptions)
    request_timeout: float = 30.0
    #: PEM file of the certificate authorities to trust for ``https``/``wss`` (instead of
    #: the system's); certificates are always verified.
    ca_bundle: str | Path | None = None

    def __post_init__(self) -> None:
        check_app_id(self.app_id)
        check_base_url(self.base_url)

    def resolved_base_path(self) -> Path:
        """``base_path``, or ``./tidesync/<app_id>`` when not given."""
        if self.base_path is not None:
            return Path(self.base_path)
        return Path.cwd() / "tidesync" / self.app_id


@dataclass(frozen=True)
class Credentials:
    """How to log in: ``Credentials.anonymous()``."""

    provider: str
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def anonymous(cls) -> Credentials:
        """A new anonymous user."""
        return cls("anonymous")

    @classmethod
    def email_password(cls, email: str, password: str) -> Credentials:
        """An email/password account (register it first with ``app.email_password_auth``)."""
        return cls("email_password", {"email": email, "password": password})

    @classmethod
    def api_key(cls, key: str) -> Credentials:
        """A user's API key (``user.api_keys.create``) or a server admin key."""
        return cls("api_key", {"key": key})

    @classmethod
    def jwt(cls, token: str) -> Credentials:
        """A token signed by the app's external identity provider (custom JWT)."""
        return cls("jwt", {"token": token})


#: Where each provider logs in.
_LOGIN_PATHS = {
    "anonymous": "auth/anonymous",
    "email_password": "auth/email/login",
    "api_key": "auth/api_key/login",
    "jwt": "auth/jwt/login",
}


def _token_expiry(token: str) -> float:
    """The ``exp`` claim of a token, read without checking the signature (only the server
    can check it); 0 when absent or unreadable."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        return float(claims.get("exp", 0))
    except jwt.PyJWTError:
        return 0.0


class User:
    """A logged-in user of an :class:`App`."""

    def __init__(self, app: App, user_id: str, access_token: str, refresh_token: str) -> None:
        self.app = app
        self.id = user_id
        self._access_token = access_token
        self._refresh_token = refresh_token
        self._logged_in = True
        self._lock = threading.Lock()

    @property
    def is_logged_in(self) -> bool:
        """False after :meth:`log_out`."""
        return self._logged_in

    @property
    def access_token(self) -> str:
        """The current access token."""
        return self._access_token

    @property
    def refresh_token(self) -> str:
        """The refresh token."""
        return self._refresh_token

    def access_token_expires_at(self) -> float:
        """Unix time at which the access token expires (0 if unknown)."""
        return _token_expiry(self._access_token)

    @property
    def api_keys(self) -> ApiKeyClient:
        """The user's own API keys: create, list, disable, enable, delete."""
        return ApiKeyClient(self)

    @awaitable
    async def delete(self) -> None:
        """Delete this user on the server (its live sync connections end) and forget it
        on this device; local database files are kept."""
        token = await self.valid_access_token()
        await self.app._post(
            "auth/me", None, bearer=token, what="deleting the user", method="DELETE"
        )
        self._logged_in = False
        self.app._forget_user(self)

    delete_blocking = blocking_form(delete)

    def default_path(self) -> Path:
        """Where this user's synced databases live unless a path is given."""
        return self.app.base_path / "users" / self.id / "default.tidesync"

    @awaitable
    async def refresh_access_token(self) -> str:
        """Get a new access token with the refresh token (raises :class:`AuthError`)."""
        data = await self.app._post(
            "auth/refresh", {}, bearer=self._refresh_token, what="refreshing the access token"
        )
        token = data.get("access_token")
        if not isinstance(token, str):
            raise AuthError("the server's refresh answer has no access_token")
        rotated = data.get("refresh_token")
        with self._lock:
            self._access_token = token
            if isinstance(rotated, str) and rotated:
                self._refresh_token = rotated
        self.app._save_users()
        return token

    refresh_access_token_blocking = blocking_form(refresh_access_token)

    @awaitable
    async def valid_access_token(self, margin: float = 5.0) -> str:
        """The access token, refreshed first if it expires within ``margin`` seconds."""
        exp = self.access_token_expires_at()
        if exp and exp - time.time() < margin:
            return await self.refresh_access_token()
        return self._access_token

    valid_access_token_blocking = blocking_form(valid_access_token)

    @awaitable
    async def log_out(self) -> None:
        """Log out: revoke the refresh token on the server (best effort) and forget the user.

        Local database files are kept."""
        if not self._logged_in:
            return
        self._logged_in = False
        self.app._forget_user(self)
        try:
            await self.app._post("auth/logout", {}, bearer=self._refresh_token, what="logging out")
        except (AuthError, TidesyncError):
            pass

    log_out_blocking = blocking_form(log_out)

    def __repr__(self) -> str:
        return f"<User {self.id} of {self.app.id}>"


class App:
    """A client of one app on one tidesync server."""

    def __init__(self, config: AppConfiguration) -> None:
        if not isinstance(config, AppConfiguration):
            raise TypeError("App() takes a tidesync.AppConfiguration")
        self.config = config
        self.id = config.app_id
        self.base_url = config.base_url.rstrip("/")
        self.base_path = config.resolved_base_path()
        self.base_path.mkdir(parents=True, exist_ok=True)
        self._users: dict[str, User] = {}
        self._current: User | None = None
        self._lock = threading.RLock()
        self._sync_client: SyncClient | None = None
        self._ssl: ssl.SSLContext | None = None
        self._load_users()

    # --- users ---------------------------------------------------------------------------

    @property
    def current_user(self) -> User | None:
        """The user logged in last (or switched to), if any."""
        return self._current

    @property
    def all_users(self) -> list[User]:
        """Every logged-in user of this app on this device."""
        return list(self._users.values())

    def switch_user(self, user: User) -> None:
        """Make ``user`` the current user."""
        if user.id not in self._users:
            raise AuthError(f"user {user.id} is not logged in to this app")
        self._current = user
        self._save_users()

    @awaitable
    async def remove_user(self, user: User) -> None:
        """Log ``user`` out (revoking its refresh token) and remove it from this device's
        users; its local database files are kept (delete them with ``Database.delete``)."""
        if user.id not in self._users:
            raise AuthError(f"user {user.id} is not on this device")
        if user.is_logged_in:
            await user.log_out()
        self._forget_user(user)

    remove_user_blocking = blocking_form(remove_user)

    @property
    def email_password_auth(self) -> EmailPasswordAuth:
        """Registration, confirmation and password reset of email/password accounts."""
        return EmailPasswordAuth(self)

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of ``https``/``wss`` connections: verifying, with the
        configuration's ``ca_bundle`` when one is given."""
        with self._lock:
            if self._ssl is None:
                cafile = self.config.ca_bundle
                self._ssl = ssl.create_default_context(
                    cafile=str(cafile) if cafile is not None else None
                )
            return self._ssl

    @awaitable
    async def log_in(self, credentials: Credentials) -> User:
        """Log in and return the user (raises :class:`AuthError` when refused)."""
        path = _LOGIN_PATHS.get(credentials.provider)
        if path is None:
            raise AuthError(f"unsupported credentials provider {credentials.provider!r}")
        data = await self._post(path, credentials.payload, what="logging in")
        try:
            user = User(
                self, str(data["user_id"]), str(data["access_token"]), str(data["refresh_token"])
            )
        except KeyError as exc:
            raise AuthError(f"the server's login answer lacks {exc}") from None
        with self._lock:
            self._users[user.id] = user
            self._current = user
        self._save_users()
        return user

    log_in_blocking = blocking_form(log_in)

    def _forget_user(self, user: User) -> None:
        with self._lock:
            self._users.pop(user.id, None)
            if self._current is user:
                self._current = next(iter(self._users.values()), None)
        self._save_users()

    def _users_file(self) -> Path:
        return self.base_path / "users.json"

    def _save_users(self) -> None:
        with self._lock:
            data = {
                "current": self._current.id if self._current else None,
                "users": [
                    {"id": u.id, "access_token": u.access_token, "refresh_token": u.refresh_token}
                    for u in self._users.values()
                ],
            }
            path = self._users_file()
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)

    def _load_users(self) -> None:
        path = self._users_file()
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            for item in data.get("users", []):
                user = User(self, item["id"], item["access_token"], item["refresh_token"])
                self._users[user.id] = user
            current = data.get("current")
            self._current = self._users.get(current) if current else None
        except (ValueError, KeyError, TypeError) as exc:
            raise TidesyncError(f"the users file {path} is damaged: {exc}") from exc

    # --- HTTP ----------------------------------------------------------------------------

    def _url(self, tail: str) -> str:
        return f"{self.base_url}/api/v1/apps/{self.id}/{tail}"

    def sync_url(self) -> str:
        """The WebSocket URL of the sync endpoint."""
        base = self.base_url
        if base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        return f"{base}/api/v1/apps/{self.id}/sync"

    async def _post(
        self,
        tail: str,
        body: dict[str, Any] | None,
        *,
        bearer: str | None = None,
        what: str,
        method: str = "POST",
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        verify: ssl.SSLContext | bool = (
            self.ssl_context() if self.base_url.startswith("https://") else True
        )
        try:
            async with httpx.AsyncClient(
                timeout=self.config.request_timeout, verify=verify
            ) as http:
                resp = await http.request(method, self._url(tail), json=body, headers=headers)
        except httpx.HTTPError as exc:
            words = describe_failure(exc, host_and_port(self.base_url))
            raise AuthError(f"{what} failed: {words}") from exc
        if resp.status_code == 204:
            return {}
        try:
            data = resp.json()
        except ValueError:
            data = {}
        if resp.status_code == 429:
            message = data.get("error") if isinstance(data, dict) else None
            raise TooManyAttemptsError(f"{what} failed: {message or 'too many attempts'}")
        if resp.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise AuthError(f"{what} failed ({resp.status_code}): {message or resp.text[:200]}")
        if not isinstance(data, dict):
            raise AuthError(f"{what}: the server answered with something that is not a JSON object")
        return data

    # --- sync ----------------------------------------------------------------------------

    def _client(self) -> SyncClient:
        from .syncclient import SyncClient

        with self._lock:
            if self._sync_client is None or self._sync_client.is_closed:
                self._sync_client = SyncClient(self)
            return self._sync_client

    def _open_session(self, db: Database, sync: SyncConfiguration) -> Session:
        from .session import open_shared

        return open_shared(self._client(), db, sync)  # one session per file (session.py)

    def reconnect(self) -> None:
        """Make every active session try to connect now, resetting every backoff timer; a
        connection that looks open but is dead is detected with an urgent ping."""
        client = self._sync_client
        if client is not None:
            client.reconnect()

    def close(self) -> None:
        """Stop the sync client thread (sessions of open databases end)."""
        client = self._sync_client
        if client is not None:
            client.close()


class EmailPasswordAuth:
    """``app.email_password_auth``: the email/password account flows."""

    def __init__(self, app: App) -> None:
        self.app = app

    @awaitable
    async def register_user(self, email: str, password: str) -> None:
        """Create an account; unless the app confirms automatically, the server sends
        (or, in development mode, logs) a confirmation token."""
        body = {"email": email, "password": password}
        await self.app._post("auth/email/register", body, what="registering")

    register_user_blocking = blocking_form(register_user)

    @awaitable
    async def confirm_user(self, token: str) -> None:
        """Confirm an account with the token the server delivered."""
        await self.app._post("auth/email/confirm", {"token": token}, what="confirming")

    confirm_user_blocking = blocking_form(confirm_user)

    @awaitable
    async def resend_confirmation_email(self, email: str) -> None:
        """Ask for a new confirmation token."""
        await self.app._post("auth/email/resend", {"email": email}, what="resending")

    resend_confirmation_email_blocking = blocking_form(resend_confirmation_email)

    @awaitable
    async def send_reset_password_email(self, email: str) -> None:
        """Ask for a password reset token (the answer is the same for unknown addresses)."""
        await self.app._post(
            "auth/email/reset/send", {"email": email}, what="asking for a password reset"
        )

    send_reset_password_email_blocking = blocking_form(send_reset_password_email)

    @awaitable
    async def reset_password(self, token: str, password: str) -> None:
        """Set a new password with a reset token (every refresh token is revoked)."""
        body = {"token": token, "password": password}
        await self.app._post("auth/email/reset", body, what="resetting the password")

    reset_password_blocking = blocking_form(reset_password)


@dataclass(frozen=True)
class ApiKey:
    """A user's API key; ``key`` is set only in the answer of :meth:`ApiKeyClient.create`."""

    id: str
    name: str
    disabled: bool
    key: str | None = None

    @classmethod
    def _from(cls, data: dict[str, Any]) -> ApiKey:
        try:
            key = data.get("key")
            return cls(
                str(data["id"]),
                str(data["name"]),
                bool(data["disabled"]),
                key if isinstance(key, str) else None,
            )
        except KeyError as exc:
            raise AuthError(f"the server's API key answer lacks {exc}") from None


class ApiKeyClient:
    """``user.api_keys``: the user's own API keys."""

    def __init__(self, user: User) -> None:
        self.user = user

    async def _call(
        self, tail: str, body: dict[str, Any] | None, what: str, method: str = "POST"
    ) -> dict[str, Any]:
        token = await self.user.valid_access_token()
        return await self.user.app._post(
            f"auth/api_keys{tail}", body, bearer=token, what=what, method=method
        )

    @awaitable
    async def create(self, name: str) -> ApiKey:
        """A new key (the returned :attr:`ApiKey.key` is never shown again)."""
        return ApiKey._from(await self._call("", {"name": name}, "creating an API key"))

    create_blocking = blocking_form(create)

    @awaitable
    async def list(self) -> list[ApiKey]:
        """The user's keys, oldest first."""
        data = await self._call("", None, "listing API keys", "GET")
        keys = data.get("api_keys")
        if not isinstance(keys, list):
            raise AuthError("the server's API key list is malformed")
        return [ApiKey._from(k) for k in keys if isinstance(k, dict)]

    list_blocking = blocking_form(list)

    @awaitable
    async def get(self, key_id: str) -> ApiKey | None:
        """One key by id, or None."""
        return next((k for k in await self.list() if k.id == key_id), None)

    get_blocking = blocking_form(get)

    @awaitable
    async def disable(self, key_id: str) -> None:
        """Disable a key (logins with it are refused until it is enabled)."""
        await self._call(f"/{key_id}/disable", None, "disabling an API key")

    disable_blocking = blocking_form(disable)

    @awaitable
    async def enable(self, key_id: str) -> None:
        """Enable a disabled key."""
        await self._call(f"/{key_id}/enable", None, "enabling an API key")

    enable_blocking = blocking_form(enable)

    @awaitable
    async def delete(self, key_id: str) -> None:
        """Delete a key."""
        await self._call(f"/{key_id}", None, "deleting an API key", "DELETE")

    delete_blocking = blocking_form(delete)
