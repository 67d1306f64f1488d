"""Authentication: providers, signed tokens, refresh-token rotation and the HTTP auth API.

Clients log in over HTTP with one of the app's providers (anonymous, email/password, API
key, custom JWT) and receive a short-lived *access* token (sent in the sync connection's
HELLO) and a *refresh* token (exchanged for new tokens). Both are JWTs signed with HS256 by
a secret generated once and kept by the user store (``secret.key`` in the data folder with
SQLite, a table with PostgreSQL, shared by every server process), so tokens stay valid
across restarts and processes.

Refresh tokens rotate: every refresh returns a new one and retires the old one, which stays
usable for ``refresh_reuse_grace`` seconds (two concurrent refreshes of one client) and is
then refused; presenting a retired token after that revokes the whole login (the token was
copied). Refresh tokens are stored as SHA-256 hashes by the user store
(:mod:`~tidesync.server.users`); logging out, disabling or deleting the user revokes them.

Claims: ``sub`` (user id), ``app`` (app id), ``typ`` ("access" or "refresh"), ``iat``,
``exp`` (seconds since the epoch, with millisecond precision) and ``jti``.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import AuthError, TooManyAttemptsError
from .config import ServerConfig
from .limits import RateLimiter
from .rules import AppRules, parse_rules, user_values
from .settings import (
    ANONYMOUS,
    API_KEY,
    EMAIL_PASSWORD,
    JWT,
    REGISTERED_AGAIN,
    AppSettings,
    DeliveryMessage,
)
from .signing import DEFAULT_KID, SigningKey, current_key, expired_keys
from .users import SECRET_FILE as SECRET_FILE
from .users import (
    EmailTakenError,
    RefreshOutcome,
    UserStore,
    normalize_email,
    token_hash,
    user_store_for,
)
from .users import load_or_create_secret as load_or_create_secret

log = logging.getLogger("tidesync.server.auth")

_ALGORITHM = "HS256"
ACCESS = "access"
REFRESH = "refresh"
#: How long a delivery command may run.
DELIVERY_TIMEOUT = 30.0
#: The one message for every failed credential check (no account enumeration).
BAD_CREDENTIALS = "invalid credentials: unknown user or wrong password"


class InvalidTokenError(AuthError):
    """A token is missing, malformed, forged, revoked or of the wrong kind."""


class TokenExpiredError(AuthError):
    """A genuine token whose lifetime is over."""


class WrongAppError(AuthError):
    """A genuine token issued for another app."""


class _HttpError(Exception):
    """An HTTP error answer (status, message, code)."""

    def __init__(self, status: int, message: str, code: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified claims of a token."""

    user_id: str
    app_id: str
    kind: str
    issued_at: float
    expires_at: float
    jti: str
    #: The login the token belongs to (every token of one login shares it; a logout ends
    #: them all). None for tokens issued before logins were named.
    family: str | None = None


@dataclass(frozen=True, slots=True)
class LoginResult:
    """What a successful login or refresh returns to the client."""

    user_id: str
    access_token: str
    refresh_token: str

    def to_json(self) -> dict[str, str]:
        """The JSON answer."""
        return {
            "user_id": self.user_id,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
        }


#: Called with (app_id, user_id, reason) when a user must lose its live connections.
UserGoneHook = Callable[[str, str, str], Awaitable[Any]]
#: Called with (app_id, user_id, family) when one login's live connections must close.
LoginEndedHook = Callable[[str, str, str], Awaitable[Any]]


class Authenticator:
    """Issues and verifies tokens and runs every login provider for every app of one server.

    ``clock`` returns seconds since the epoch (``time.time`` unless a test passes another).
    The user records live in ``users`` (default: the store that goes with
    ``config.storage_url``: ``data_dir/users.sqlite3``, or the PostgreSQL storage's schema).
    Call :meth:`open` before use and :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        data_dir: Path,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.time,
        users: UserStore | None = None,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._config = config
        self._clock = clock
        self._keys: dict[str, SigningKey] = {}
        self.users = users if users is not None else user_store_for(config.storage_url, data_dir)
        limits = config.limits
        self._per_account = RateLimiter(limits.login_attempts_per_account)
        self._per_address = RateLimiter(limits.login_attempts_per_address)
        # failed logins: per (account, address), per address, per account overall
        self._failed_here = RateLimiter(limits.login_attempts_per_account)
        self._failed_from = RateLimiter(limits.login_attempts_per_address)
        self._failed_total = RateLimiter(limits.login_attempts_per_account_total)
        self._anonymous = RateLimiter(limits.anonymous_logins_per_address)
        #: Set by the server so disabling/deleting a user closes its sync connections.
        self.on_user_gone: UserGoneHook | None = None
        #: Set by the server so a logout closes the sync connections of that login.
        self.on_login_ended: LoginEndedHook | None = None
        self._gone_tasks: set[asyncio.Future[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the user store and load the signing keys; listen for users disabled or
        deleted and logins ended through other server processes (shared stores); start
        the maintenance task (key reloads, token purges)."""
        await self.users.open()
        try:
            await self.reload_keys()
        except BaseException:
            await self.users.close()
            raise
        self.users.set_user_gone_listener(self._user_gone_elsewhere)
        self.users.set_login_ended_listener(self._login_ended_elsewhere)
        self._maintenance = asyncio.get_running_loop().create_task(
            self._maintain(), name="tidesync-auth-maintenance"
        )

    async def reload_keys(self) -> None:
        """Read the signing keys again (a rotation made by ``tidesync keys rotate``)."""
        keys = await self.users.signing_keys()
        if not keys:
            raise AuthError("the user store has no signing key")
        self._keys = {k.kid: k for k in keys}

    async def _maintain(self) -> None:
        """Every ``key_reload_interval``: reload the keys and drop those no token can need
        any more; every ``token_purge_interval``: delete expired tokens."""
        config = self._config
        purged = self._clock()
        while True:
            await asyncio.sleep(min(config.key_reload_interval, config.token_purge_interval))
            try:
                await self.reload_keys()
                now = self._clock()
                old = expired_keys(self._keys.values(), now, config.refresh_token_ttl)
                if old:
                    await self.users.drop_signing_keys(old)
                    log.info("dropped %d signing key(s) whose tokens have all expired", len(old))
                    await self.reload_keys()
                if now - purged >= config.token_purge_interval:
                    purged = now
                    gone = await self.users.purge_expired(now)
                    if gone:
                        log.info("purged %d expired token(s)", gone)
            except Exception as exc:  # a maintenance round: log it, try again next time
                log.warning("auth maintenance failed (tried again shortly): %r", exc)

    def _signing_key(self) -> SigningKey:
        if not self._keys:  # never sign or verify with an empty key
            raise RuntimeError("the authenticator is not open (no signing key)")
        return current_key(self._keys.values(), self._clock())

    def _user_gone_elsewhere(self, app_id: str, user_id: str, reason: str) -> None:
        hook = self.on_user_gone
        if hook is not None:
            self._own(hook(app_id, user_id, reason))

    def _login_ended_elsewhere(self, app_id: str, user_id: str, family: str) -> None:
        hook = self.on_login_ended
        if hook is not None:
            self._own(hook(app_id, user_id, family))

    def _own(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._gone_tasks.add(task)
        task.add_done_callback(self._gone_tasks.discard)

    async def aclose(self) -> None:
        """Stop listening and close the user store."""
        self.users.set_user_gone_listener(None)
        self.users.set_login_ended_listener(None)
        tasks = list(self._gone_tasks)
        maintenance, self._maintenance = self._maintenance, None
        if maintenance is not None:
            tasks.append(maintenance)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.users.close()

    def now(self) -> float:
        """The authenticator's current time (seconds since the epoch)."""
        return self._clock()

    def app_settings(self, app_id: str) -> AppSettings | None:
        """The app's settings (None: no such app in production mode)."""
        return self._config.auth.app(app_id, self._config.development_mode)

    # -- issuing --------------------------------------------------------------------------

    def issue(self, user_id: str, app_id: str, kind: str, family: str | None = None) -> str:
        """A signed token of ``kind`` ("access" or "refresh") for ``user_id`` in ``app_id``,
        of the login ``family`` if given.

        A refresh token made here is not yet stored: use :meth:`new_login` for logins."""
        if kind not in (ACCESS, REFRESH):
            raise ValueError(f"unknown token kind {kind!r}")
        ttl = self._config.access_token_ttl if kind == ACCESS else self._config.refresh_token_ttl
        now = self._clock()
        claims = {
            "sub": user_id,
            "app": app_id,
            "typ": kind,
            "iat": round(now, 3),
            "exp": round(now + ttl, 3),
            "jti": uuid.uuid4().hex,
        }
        if family is not None:
            claims["fam"] = family
        key = self._signing_key()
        return jwt.encode(claims, key.secret, algorithm=_ALGORITHM, headers={"kid": key.kid})

    async def new_login(self, user_id: str, app_id: str, family: str | None = None) -> LoginResult:
        """Fresh access and refresh tokens of one login (``family``, new if None); the
        refresh token's hash is stored."""
        family = family or uuid.uuid4().hex
        access = self.issue(user_id, app_id, ACCESS, family)
        refresh = self.issue(user_id, app_id, REFRESH, family)
        expires = self._clock() + self._config.refresh_token_ttl
        await self.users.add_refresh(app_id, user_id, refresh, expires, family)
        return LoginResult(user_id, access, refresh)

    # -- verifying ------------------------------------------------------------------------

    def verify(self, token: str, app_id: str, kind: str) -> TokenClaims:
        """The claims of a genuine, unexpired ``kind`` token for ``app_id`` (signature and
        claims only: :meth:`refresh` also checks the stored state of refresh tokens).

        Raises :class:`InvalidTokenError` (missing, malformed, forged, wrong kind),
        :class:`WrongAppError` or :class:`TokenExpiredError`.
        """
        if not token or not isinstance(token, str):
            raise InvalidTokenError("no token was given")
        if not self._keys:
            raise RuntimeError("the authenticator is not open (no signing key)")
        try:
            kid = jwt.get_unverified_header(token).get("kid", DEFAULT_KID)
        except jwt.PyJWTError as exc:
            raise InvalidTokenError(f"the token is malformed: {exc}") from exc
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidTokenError(
                "the token was signed with a key this server does not keep (rotated out "
                "after all its tokens expired, or forged)"
            )
        try:
            raw: dict[str, Any] = jwt.decode(
                token,
                key.secret,
                algorithms=[_ALGORITHM],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidSignatureError as exc:
            raise InvalidTokenError("the token's signature is not valid (forged?)") from exc
        except jwt.PyJWTError as exc:
            raise InvalidTokenError(f"the token is malformed: {exc}") from exc
        claims = _claims(raw)
        if claims.kind != kind:
            raise InvalidTokenError(f"expected an {kind} token, got a {claims.kind} token")
        if claims.app_id != app_id:
            raise WrongAppError(f"the token was issued for app {claims.app_id!r}, not {app_id!r}")
        if claims.expires_at <= self._clock():
            raise TokenExpiredError(f"the {kind} token has expired")
        return claims

    async def user_active(self, app_id: str, user_id: str) -> bool:
        """True if the user exists and is not disabled."""
        status = await self.users.user_status(app_id, user_id)
        return status == "active"

    async def rule_values(self, app_id: str, user_id: str) -> dict[str, Any]:
        """The field values permission rules see for a user (``$user.id``, ``$user.email``
        ...: :func:`~tidesync.server.rules.user_values` of the user's record), read off the
        event loop when the user store is synchronous."""
        users: Any = self.users
        fetch = users.user_data
        if inspect.iscoroutinefunction(fetch):
            record = await fetch(app_id, user_id)
        else:  # a synchronous store: keep the disk off the event loop
            record = await asyncio.to_thread(fetch, app_id, user_id)
        return user_values(user_id, record)

    def app_rules(self, app_id: str) -> AppRules | None:
        """The app's parsed permission rules (None: no restrictions, or no such app)."""
        settings = self.app_settings(app_id)
        if settings is None:
            return None
        jwt_fields = settings.jwt.fields if settings.jwt is not None else {}
        return parse_rules(settings.rules, f"apps.{app_id}.rules", jwt_fields)

    async def access_refusal(self, app_id: str, claims: TokenClaims) -> str | None:
        """Why a verified access token may not be used any more (its user disabled or
        deleted, its login logged out), or None when it may."""
        if not await self.user_active(app_id, claims.user_id):
            return "the user is disabled or was deleted"
        if claims.family is not None and not await self.users.login_active(claims.family):
            return "the login was logged out"
        return None

    async def refresh(self, token: str, app_id: str) -> LoginResult:
        """Rotate a refresh token: new access and refresh tokens, the old one retired."""
        claims = self.verify(token, app_id, REFRESH)
        family = claims.family
        if family is None:  # a token from before logins were named: its stored family
            record = await self.users.get_refresh(token)
            family = record.family if record is not None else None
        access = self.issue(claims.user_id, app_id, ACCESS, family)
        new_refresh = self.issue(claims.user_id, app_id, REFRESH, family)
        now = self._clock()
        # One transaction in the user store: correct with several server processes too.
        outcome = await self.users.rotate_refresh(
            app_id,
            claims.user_id,
            token,
            new_refresh,
            now + self._config.refresh_token_ttl,
            now,
            self._config.refresh_reuse_grace,
        )
        if outcome is RefreshOutcome.UNKNOWN:
            raise InvalidTokenError("the refresh token is unknown or was revoked")
        if outcome is RefreshOutcome.DISABLED:
            raise InvalidTokenError("the refresh token was revoked: the user is disabled")
        if outcome is RefreshOutcome.REVOKED:
            raise InvalidTokenError("the refresh token was revoked (logged out)")
        if outcome is RefreshOutcome.REUSED:
            log.warning("app %s: reused refresh token of user %s", app_id, claims.user_id)
            raise InvalidTokenError(
                "the refresh token was revoked: it had been replaced and was used again, so "
                "this login is revoked; log in again"
            )
        return LoginResult(claims.user_id, access, new_refresh)

    async def logout(self, token: str, app_id: str) -> None:
        """End the login of a refresh token: every refresh and access token of that login
        is refused from now on, on every server process, and its live sync connections are
        closed (ERROR 113)."""
        claims = self.verify(token, app_id, REFRESH)
        record = await self.users.get_refresh(token)
        if record is None or record.app_id != app_id or record.user_id != claims.user_id:
            return  # unknown (purged, or its user deleted): nothing is left to end
        await self.users.end_login(app_id, claims.user_id, record.family)
        if self.on_login_ended is not None:
            await self.on_login_ended(app_id, claims.user_id, record.family)

    async def is_revoked(self, token: str) -> bool:
        """True if the refresh token is unknown or revoked."""
        record = await self.users.get_refresh(token)
        return record is None or record.revoked

    # -- rate limiting --------------------------------------------------------------------

    def check_login(self, app_id: str, account: str, address: str) -> None:
        """Raise :class:`TooManyAttemptsError` if logins to ``account`` from ``address`` must
        wait: too many failed ones for that account from that address, from that address in
        all, or for that account from every address together. Successful logins are not
        counted, so a shared address is slowed only by its failures."""
        here = f"{app_id}\0{account}\0{address}"
        total = f"{app_id}\0{account}"
        for limiter, key, what in (
            (self._failed_from, address, "from this address"),
            (self._failed_here, here, "for this account"),
            (self._failed_total, total, "for this account"),
        ):
            if limiter.full(key):
                wait = limiter.retry_after(key)
                raise TooManyAttemptsError(f"too many attempts {what}; try again in {wait:.0f} s")

    def login_failed(self, app_id: str, account: str, address: str) -> None:
        """Count one failed login (see :meth:`check_login`)."""
        self._failed_from.hit(address)
        self._failed_here.hit(f"{app_id}\0{account}\0{address}")
        self._failed_total.hit(f"{app_id}\0{account}")

    def check_anonymous(self, address: str) -> None:
        """Count one anonymous sign-up from ``address``; raise over the limit."""
        if not self._anonymous.hit(address):
            wait = self._anonymous.retry_after(address)
            raise TooManyAttemptsError(
                f"too many anonymous sign-ups from this address; try again in {wait:.0f} s"
            )

    def check_rate(self, app_id: str, account: str, address: str) -> None:
        """Count a request that needs no password (registration, confirmation, reset);
        raise :class:`TooManyAttemptsError` over the address's or the account's limit."""
        account_key = f"{app_id}\0{account}"
        if not self._per_address.hit(address):
            wait = self._per_address.retry_after(address)
            raise TooManyAttemptsError(
                f"too many attempts from this address; try again in {wait:.0f} s"
            )
        if not self._per_account.hit(account_key):
            wait = self._per_account.retry_after(account_key)
            raise TooManyAttemptsError(
                f"too many attempts for this account; try again in {wait:.0f} s"
            )

    # -- providers ------------------------------------------------------------------------

    async def login_anonymous(self, app_id: str) -> LoginResult:
        """A new anonymous user."""
        user_id = await self.users.create_user(app_id, ANONYMOUS)
        return await self.new_login(user_id, app_id)

    async def login_email(self, app_id: str, email: str, password: str) -> LoginResult:
        """Log in with email and password (one error for unknown user and wrong password)."""
        user_id = await self.users.check_email_password(app_id, email, password)
        if user_id is None or not await self.user_active(app_id, user_id):
            raise AuthError(BAD_CREDENTIALS)
        return await self.new_login(user_id, app_id)

    def is_admin_key(self, key: str) -> bool:
        """True when ``key`` is one of ``[server] admin_keys`` (compared in constant time)."""
        return any(
            hmac.compare_digest(key.encode("utf-8", "surrogatepass"), k.encode())
            for k in self._config.auth.admin_keys
        )

    async def login_api_key(self, app_id: str, key: str) -> LoginResult:
        """Log in with a user's API key or a server admin key (a "server" user per key)."""
        if self.is_admin_key(key):
            user_id = await self.users.user_for_identity(
                app_id,
                "server_api_key",
                token_hash(key)[:32],
                {"name": "server"},
            )
        else:
            found = await self.users.user_for_api_key(app_id, key)
            if found is None:
                raise AuthError("invalid credentials: unknown or disabled API key")
            user_id = found
        if not await self.user_active(app_id, user_id):
            raise AuthError("invalid credentials: unknown or disabled API key")
        return await self.new_login(user_id, app_id)

    async def login_jwt(self, app_id: str, settings: AppSettings, token: str) -> LoginResult:
        """Log in with a token of the app's external identity provider."""
        conf = settings.jwt
        if conf is None:
            raise AuthError("custom JWT is not configured for this app")
        try:
            raw: dict[str, Any] = jwt.decode(
                token,
                conf.key,
                algorithms=[conf.algorithm],
                audience=conf.audience,
                issuer=conf.issuer,
                options={"require": ["exp"], "verify_aud": conf.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"the identity token is not valid: {exc}") from exc
        external = raw.get(conf.user_id_claim)
        if not isinstance(external, str | int) or isinstance(external, bool) or external == "":
            raise AuthError(f"the identity token has no {conf.user_id_claim!r} claim")
        data = {name: raw[claim] for name, claim in conf.fields.items() if claim in raw}
        user_id = await self.users.user_for_identity(app_id, JWT, str(external), data)
        if not await self.user_active(app_id, user_id):
            raise AuthError("the user is disabled")
        return await self.new_login(user_id, app_id)

    # -- user lifecycle -------------------------------------------------------------------

    async def end_user(self, app_id: str, user_id: str, *, delete: bool) -> bool:
        """Disable or delete a user: its refresh tokens are revoked and its live sync
        connections closed. False if there is no such user."""
        if delete:
            found = await self.users.delete_user(app_id, user_id)
        else:
            found = await self.users.set_disabled(app_id, user_id, True)
        if found and self.on_user_gone is not None:
            what = "deleted" if delete else "disabled"
            await self.on_user_gone(app_id, user_id, f"the user was {what}")
        return found

    # -- delivery -------------------------------------------------------------------------

    async def deliver(self, message: DeliveryMessage) -> None:
        """Get a confirmation or reset token to its user (function, command or log)."""
        auth = self._config.auth
        if auth.delivery_function is not None:
            outcome = auth.delivery_function(message)
            if inspect.isawaitable(outcome):
                await outcome
            return
        if auth.delivery_command:
            await _run_delivery_command(auth.delivery_command, message)
            return
        if self._config.development_mode:
            log.warning(
                "[development mode] %s token for %s (app %s): %s",
                message.kind,
                message.email,
                message.app_id,
                message.token,
            )
            return
        log.error(
            "no [delivery] is configured: the %s email to %s was not sent",
            message.kind,
            message.email,
        )


async def _run_delivery_command(command: tuple[str, ...], message: DeliveryMessage) -> None:
    args = [
        part.replace("{kind}", message.kind)
        .replace("{email}", message.email)
        .replace("{app}", message.app_id)
        for part in command
    ]
    env = dict(
        os.environ,
        TIDESYNC_KIND=message.kind,
        TIDESYNC_EMAIL=message.email,
        TIDESYNC_APP=message.app_id,
        TIDESYNC_TOKEN=message.token,
    )
    proc = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), DELIVERY_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.error("the delivery command timed out after %g s", DELIVERY_TIMEOUT)
        return
    if proc.returncode != 0:
        log.error(
            "the delivery command failed (exit %s): %s",
            proc.returncode,
            err.decode(errors="replace")[:500],
        )


def _claims(raw: dict[str, Any]) -> TokenClaims:
    sub, app, typ, jti = raw.get("sub"), raw.get("app"), raw.get("typ"), raw.get("jti")
    iat, exp = raw.get("iat"), raw.get("exp")
    if not all(isinstance(v, str) and v for v in (sub, app, typ, jti)):
        raise InvalidTokenError("the token lacks its sub, app, typ or jti claim")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp)):
        raise InvalidTokenError("the token lacks its iat or exp claim")
    family = raw.get("fam")
    if family is not None and not (isinstance(family, str) and family):
        raise InvalidTokenError("the token's fam claim is not a login id")
    return TokenClaims(
        str(sub),
        str(app),
        str(typ),
        float(iat),  # type: ignore[arg-type]
        float(exp),  # type: ignore[arg-type]
        str(jti),
        family,
    )


# -- HTTP API ---------------------------------------------------------------------------------


def _error(status: int, message: str, code: str, retry_after: float = 0.0) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if status == 429 else None
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def _bearer(request: Request, what: str = "refresh_token") -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidTokenError(f"missing 'Authorization: Bearer <{what}>' header")
    return token.strip()


def _authenticator(request: Request) -> Authenticator:
    auth = getattr(request.app.state, "auth", None)
    if not isinstance(auth, Authenticator):
        raise RuntimeError("the server is not started (no authenticator)")
    return auth


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _HttpError(400, "the request body must be a JSON object", "bad_request") from None
    except RecursionError:
        raise _HttpError(
            400, "the request body is nested too deeply to be a valid request", "bad_request"
        ) from None
    if not isinstance(parsed, dict):
        raise _HttpError(400, "the request body must be a JSON object", "bad_request")
    return parsed


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _HttpError(400, f"the request needs a non-empty string {name!r}", "bad_request")
    return value


def _app_for(auth: Authenticator, app_id: str, provider: str | None = None) -> AppSettings:
    settings = auth.app_settings(app_id)
    if settings is None:
        raise _HttpError(404, f"there is no app {app_id!r} on this server", "unknown_app")
    if provider is not None and not settings.allows(provider):
        raise _HttpError(
            403, f"the {provider} provider is not enabled for app {app_id!r}", "provider_disabled"
        )
    return settings


def client_address(request: Request) -> str:
    """The peer address of an HTTP request (what the rate limits count by)."""
    return request.client.host if request.client is not None else "unknown"


Handler = Callable[[Request, Authenticator, str], Awaitable[Response]]


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: the authenticator and app id in, every refusal a JSON answer out."""

    async def endpoint(request: Request) -> Response:
        auth = _authenticator(request)
        app_id = request.path_params["app_id"]
        try:
            return await handler(request, auth, app_id)
        except _HttpError as exc:
            return _error(exc.status, exc.message, exc.code, exc.retry_after)
        except TooManyAttemptsError as exc:
            return _error(429, str(exc), "too_many_attempts", 60.0)

    endpoint.__name__ = handler.__name__
    return endpoint


async def _login(
    request: Request,
    auth: Authenticator,
    app_id: str,
    account: str,
    attempt: Awaitable[LoginResult],
) -> Response:
    address = client_address(request)
    try:
        auth.check_login(app_id, account, address)
    except TooManyAttemptsError:
        if inspect.iscoroutine(attempt):
            attempt.close()
        raise
    try:
        result = await attempt
    except AuthError as exc:
        auth.login_failed(app_id, account, address)
        log.info("app %s: login refused from %s: %s", app_id, address, exc)
        raise _HttpError(401, str(exc), "invalid_credentials") from None
    return JSONResponse(result.to_json())


async def _anonymous(request: Request, auth: Authenticator, app_id: str) -> Response:
    _app_for(auth, app_id, ANONYMOUS)
    await _body(request)
    auth.check_anonymous(client_address(request))
    result = await auth.login_anonymous(app_id)
    log.info("app %s: new anonymous user %s", app_id, result.user_id)
    return JSONResponse(result.to_json())


async def _email_login(request: Request, auth: Authenticator, app_id: str) -> Response:
    _app_for(auth, app_id, EMAIL_PASSWORD)
    body = await _body(request)
    email, password = _field(body, "email"), _field(body, "password")
    account = "email:" + email.strip().lower()
    return await _login(request, auth, app_id, account, auth.login_email(app_id, email, password))


async def _api_key_login(request: Request, auth: Authenticator, app_id: str) -> Response:
    _app_for(auth, app_id, API_KEY)
    key = _field(await _body(request), "key")
    account = "key:" + token_hash(key)[:16]
    return await _login(request, auth, app_id, account, auth.login_api_key(app_id, key))


async def _jwt_login(request: Request, auth: Authenticator, app_id: str) -> Response:
    settings = _app_for(auth, app_id, JWT)
    token = _field(await _body(request), "token")
    try:
        subject = jwt.decode(token, options={"verify_signature": False}).get("sub", "")
    except jwt.PyJWTError:
        subject = ""
    account = f"jwt:{subject}"
    return await _login(request, auth, app_id, account, auth.login_jwt(app_id, settings, token))


async def _register(request: Request, auth: Authenticator, app_id: str) -> Response:
    settings = _app_for(auth, app_id, EMAIL_PASSWORD)
    body = await _body(request)
    email, password = _field(body, "email"), _field(body, "password")
    auth.check_rate(app_id, "register:" + email.strip().lower(), client_address(request))
    try:
        address = normalize_email(email)
        await auth.users.register_email(app_id, address, password, settings.auto_confirm)
    except EmailTakenError:
        # answered exactly as a new registration (no account discovery); the address's
        # owner is told by mail that someone tried
        await auth.deliver(DeliveryMessage(REGISTERED_AGAIN, app_id, address, ""))
        return JSONResponse({"confirmed": settings.auto_confirm}, status_code=201)
    except AuthError as exc:
        raise _HttpError(400, str(exc), "bad_request") from None
    if not settings.auto_confirm:
        token = await auth.users.add_pending(app_id, "confirm", address)
        await auth.deliver(DeliveryMessage("confirm", app_id, address, token))
    return JSONResponse({"confirmed": settings.auto_confirm}, status_code=201)


async def _confirm(request: Request, auth: Authenticator, app_id: str) -> Response:
    _app_for(auth, app_id, EMAIL_PASSWORD)
    token = _field(await _body(request), "token")
    auth.check_rate(app_id, "confirm", client_address(request))
    email = await auth.users.take_pending(app_id, "confirm", token)
    if email is None or not await auth.users.confirm_email(app_id, email):
        raise _HttpError(400, "the confirmation token is invalid or expired", "invalid_token")
    return Response(status_code=204)


async def _send_token(request: Request, auth: Authenticator, app_id: str, kind: str) -> Response:
    _app_for(auth, app_id, EMAIL_PASSWORD)
    email = _field(await _body(request), "email")
    auth.check_rate(app_id, f"{kind}:" + email.strip().lower(), client_address(request))
    try:
        address = normalize_email(email)
    except AuthError as exc:
        raise _HttpError(400, str(exc), "bad_request") from None
    # The answer is the same whether or not the account exists (no enumeration).
    if await auth.users.email_exists(app_id, address):
        token = await auth.users.add_pending(app_id, kind, address)
        await auth.deliver(DeliveryMessage(kind, app_id, address, token))
    return Response(status_code=202)


async def _resend(request: Request, auth: Authenticator, app_id: str) -> Response:
    return await _send_token(request, auth, app_id, "confirm")


async def _reset_send(request: Request, auth: Authenticator, app_id: str) -> Response:
    return await _send_token(request, auth, app_id, "reset")


async def _reset(request: Request, auth: Authenticator, app_id: str) -> Response:
    _app_for(auth, app_id, EMAIL_PASSWORD)
    body = await _body(request)
    token, password = _field(body, "token"), _field(body, "password")
    auth.check_rate(app_id, "reset", client_address(request))
    email = await auth.users.take_pending(app_id, "reset", token)
    if email is None:
        raise _HttpError(400, "the reset token is invalid or expired", "invalid_token")
    try:
        await auth.users.set_password(app_id, email, password)
        await auth.users.confirm_email(app_id, email)
    except AuthError as exc:
        raise _HttpError(400, str(exc), "bad_request") from None
    return Response(status_code=204)


async def _refresh(request: Request, auth: Authenticator, app_id: str) -> Response:
    try:
        result = await auth.refresh(_bearer(request), app_id)
    except AuthError as exc:
        return _error(401, f"refresh refused: {exc}", "invalid_token")
    return JSONResponse(result.to_json())


async def _logout(request: Request, auth: Authenticator, app_id: str) -> Response:
    try:
        await auth.logout(_bearer(request), app_id)
    except AuthError as exc:
        return _error(401, f"logout refused: {exc}", "invalid_token")
    return Response(status_code=204)


async def _access(request: Request, auth: Authenticator, app_id: str) -> str:
    """The user id of a valid access token in the Authorization header."""
    try:
        claims = auth.verify(_bearer(request, "access_token"), app_id, ACCESS)
    except AuthError as exc:
        raise _HttpError(401, f"access refused: {exc}", "invalid_token") from None
    refusal = await auth.access_refusal(app_id, claims)
    if refusal is not None:
        raise _HttpError(401, f"access refused: {refusal}", "invalid_token")
    return claims.user_id


async def _me(request: Request, auth: Authenticator, app_id: str) -> Response:
    user_id = await _access(request, auth, app_id)
    if request.method == "DELETE":
        await auth.end_user(app_id, user_id, delete=True)
        return Response(status_code=204)
    data = await auth.users.user_data(app_id, user_id)
    return JSONResponse({"user_id": user_id, **(data or {})})


async def _api_keys(request: Request, auth: Authenticator, app_id: str) -> Response:
    _app_for(auth, app_id, API_KEY)
    user_id = await _access(request, auth, app_id)
    if request.method == "GET":
        keys = await auth.users.list_api_keys(app_id, user_id)
        return JSONResponse({"api_keys": [k.to_json() for k in keys]})
    name = _field(await _body(request), "name")
    try:
        info, key = await auth.users.create_api_key(app_id, user_id, name)
    except AuthError as exc:
        raise _HttpError(400, str(exc), "bad_request") from None
    return JSONResponse({**info.to_json(), "key": key}, status_code=201)


async def _api_key(request: Request, auth: Authenticator, app_id: str) -> Response:
    _app_for(auth, app_id, API_KEY)
    user_id = await _access(request, auth, app_id)
    key_id = request.path_params["key_id"]
    action = request.path_params.get("action", "")
    if request.method == "DELETE":
        found = await auth.users.delete_api_key(app_id, user_id, key_id)
    elif action in ("disable", "enable"):
        found = await auth.users.set_api_key_disabled(app_id, user_id, key_id, action == "disable")
    else:
        raise _HttpError(404, f"unknown API key action {action!r}", "not_found")
    if not found:
        raise _HttpError(404, "no such API key", "not_found")
    return Response(status_code=204)


async def _admin_user(request: Request, auth: Authenticator, app_id: str) -> Response:
    try:
        key = _bearer(request, "admin key")
    except AuthError as exc:
        raise _HttpError(401, str(exc), "invalid_token") from None
    auth.check_rate(app_id, "admin", client_address(request))
    if not auth.is_admin_key(key):
        raise _HttpError(401, "admin access refused: not an admin key", "invalid_token")
    user_id = request.path_params["user_id"]
    action = request.path_params.get("action", "")
    if request.method == "DELETE":
        found = await auth.end_user(app_id, user_id, delete=True)
    elif action == "disable":
        found = await auth.end_user(app_id, user_id, delete=False)
    elif action == "enable":
        found = await auth.users.set_disabled(app_id, user_id, False)
    else:
        raise _HttpError(404, f"unknown user action {action!r}", "not_found")
    if not found:
        raise _HttpError(404, "no such user", "not_found")
    return Response(status_code=204)


def auth_routes() -> list[Route]:
    """The HTTP auth endpoints (they find the :class:`Authenticator` in ``app.state.auth``)."""
    prefix = "/api/v1/apps/{app_id}/auth"
    admin = "/api/v1/apps/{app_id}/admin/users/{user_id}"
    return [
        Route(f"{prefix}/anonymous", _endpoint(_anonymous), methods=["POST"]),
        Route(f"{prefix}/refresh", _endpoint(_refresh), methods=["POST"]),
        Route(f"{prefix}/logout", _endpoint(_logout), methods=["POST"]),
        Route(f"{prefix}/email/register", _endpoint(_register), methods=["POST"]),
        Route(f"{prefix}/email/confirm", _endpoint(_confirm), methods=["POST"]),
        Route(f"{prefix}/email/resend", _endpoint(_resend), methods=["POST"]),
        Route(f"{prefix}/email/reset/send", _endpoint(_reset_send), methods=["POST"]),
        Route(f"{prefix}/email/reset", _endpoint(_reset), methods=["POST"]),
        Route(f"{prefix}/email/login", _endpoint(_email_login), methods=["POST"]),
        Route(f"{prefix}/api_key/login", _endpoint(_api_key_login), methods=["POST"]),
        Route(f"{prefix}/jwt/login", _endpoint(_jwt_login), methods=["POST"]),
        Route(f"{prefix}/me", _endpoint(_me), methods=["GET", "DELETE"]),
        Route(f"{prefix}/api_keys", _endpoint(_api_keys), methods=["GET", "POST"]),
        Route(f"{prefix}/api_keys/{{key_id}}", _endpoint(_api_key), methods=["DELETE"]),
        Route(f"{prefix}/api_keys/{{key_id}}/{{action}}", _endpoint(_api_key), methods=["POST"]),
        Route(admin, _endpoint(_admin_user), methods=["DELETE"]),
        Route(f"{admin}/{{action}}", _endpoint(_admin_user), methods=["POST"]),
    ]
