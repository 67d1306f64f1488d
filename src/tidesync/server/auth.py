"""Authentication: signed tokens, refresh-token revocation and the HTTP auth API.

Clients log in over HTTP and receive a short-lived *access* token (sent in the sync
connection's HELLO) and a long-lived *refresh* token (exchanged for new access tokens).
Both are JWTs signed with HS256 by a secret generated once and kept in the data folder, so
tokens stay valid across restarts. Logging out revokes the refresh token's ``jti``; the
revocation list lives in memory and in a file next to the secret.

Claims: ``sub`` (user id), ``app`` (app id), ``typ`` ("access" or "refresh"), ``iat``,
``exp`` (seconds since the epoch, with millisecond precision) and ``jti``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import AuthError
from .config import ServerConfig

log = logging.getLogger("tidesync.server.auth")

SECRET_FILE = "secret.key"
REVOKED_FILE = "revoked_tokens"
_ALGORITHM = "HS256"
_SECRET_BYTES = 32
ACCESS = "access"
REFRESH = "refresh"


class InvalidTokenError(AuthError):
    """A token is missing, malformed, forged, revoked or of the wrong kind."""


class TokenExpiredError(AuthError):
    """A genuine token whose lifetime is over."""


class WrongAppError(AuthError):
    """A genuine token issued for another app."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified claims of a token."""

    user_id: str
    app_id: str
    kind: str
    issued_at: float
    expires_at: float
    jti: str


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
        if len(secret) < _SECRET_BYTES:
            raise AuthError(f"{path}: the signing secret is truncated; delete it to start over")
        return secret
    secret = os.urandom(_SECRET_BYTES)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


class Authenticator:
    """Issues and verifies tokens for every app of one server.

    ``clock`` returns seconds since the epoch (``time.time`` unless a test passes another).
    """

    def __init__(
        self,
        data_dir: Path,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._config = config
        self._clock = clock
        self._secret = load_or_create_secret(self._data_dir)
        self._revoked_path = self._data_dir / REVOKED_FILE
        self._revoked: set[str] = set()
        if self._revoked_path.exists():
            lines = self._revoked_path.read_text(encoding="utf-8").splitlines()
            self._revoked = {line.strip() for line in lines if line.strip()}

    def now(self) -> float:
        """The authenticator's current time (seconds since the epoch)."""
        return self._clock()

    # -- issuing --------------------------------------------------------------------------

    def issue(self, user_id: str, app_id: str, kind: str) -> str:
        """A signed token of ``kind`` ("access" or "refresh") for ``user_id`` in ``app_id``."""
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
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def new_anonymous_user(self, app_id: str) -> tuple[str, str, str]:
        """A fresh anonymous user: ``(user_id, access_token, refresh_token)``."""
        user_id = uuid.uuid4().hex
        return user_id, self.issue(user_id, app_id, ACCESS), self.issue(user_id, app_id, REFRESH)

    # -- verifying ------------------------------------------------------------------------

    def verify(self, token: str, app_id: str, kind: str) -> TokenClaims:
        """The claims of a valid ``kind`` token for ``app_id``.

        Raises :class:`InvalidTokenError` (missing, malformed, forged, wrong kind, revoked),
        :class:`WrongAppError` or :class:`TokenExpiredError`.
        """
        if not token:
            raise InvalidTokenError("no token was given")
        try:
            raw: dict[str, Any] = jwt.decode(
                token,
                self._secret,
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
        if kind == REFRESH and claims.jti in self._revoked:
            raise InvalidTokenError("the refresh token was revoked (logged out)")
        return claims

    # -- revocation -----------------------------------------------------------------------

    async def revoke(self, claims: TokenClaims) -> None:
        """Revoke a refresh token (by its ``jti``), in memory and in the revocation file."""
        if claims.jti in self._revoked:
            return
        self._revoked.add(claims.jti)
        await asyncio.to_thread(self._append_revoked, claims.jti)

    def _append_revoked(self, jti: str) -> None:
        fd = os.open(self._revoked_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (jti + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def is_revoked(self, jti: str) -> bool:
        """True if the refresh token with this ``jti`` was revoked."""
        return jti in self._revoked


def _claims(raw: dict[str, Any]) -> TokenClaims:
    sub, app, typ, jti = raw.get("sub"), raw.get("app"), raw.get("typ"), raw.get("jti")
    iat, exp = raw.get("iat"), raw.get("exp")
    if not all(isinstance(v, str) and v for v in (sub, app, typ, jti)):
        raise InvalidTokenError("the token lacks its sub, app, typ or jti claim")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp)):
        raise InvalidTokenError("the token lacks its iat or exp claim")
    return TokenClaims(str(sub), str(app), str(typ), float(iat), float(exp), str(jti))  # type: ignore[arg-type]


# -- HTTP API ---------------------------------------------------------------------------------


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidTokenError("missing 'Authorization: Bearer <refresh_token>' header")
    return token.strip()


def _authenticator(request: Request) -> Authenticator:
    auth = getattr(request.app.state, "auth", None)
    if not isinstance(auth, Authenticator):
        raise RuntimeError("the server is not started (no authenticator)")
    return auth


async def _anonymous(request: Request) -> Response:
    auth = _authenticator(request)
    app_id = request.path_params["app_id"]
    body = await request.body()
    if body.strip():
        try:
            parsed = json.loads(body)
        except ValueError:
            return _error(400, "the request body must be a JSON object", "bad_request")
        if not isinstance(parsed, dict):
            return _error(400, "the request body must be a JSON object", "bad_request")
    user_id, access, refresh = auth.new_anonymous_user(app_id)
    log.info("app %s: new anonymous user %s", app_id, user_id)
    return JSONResponse({"user_id": user_id, "access_token": access, "refresh_token": refresh})


async def _refresh(request: Request) -> Response:
    auth = _authenticator(request)
    app_id = request.path_params["app_id"]
    try:
        claims = auth.verify(_bearer(request), app_id, REFRESH)
    except AuthError as exc:
        return _error(401, f"refresh refused: {exc}", "invalid_token")
    return JSONResponse({"access_token": auth.issue(claims.user_id, app_id, ACCESS)})


async def _logout(request: Request) -> Response:
    auth = _authenticator(request)
    app_id = request.path_params["app_id"]
    try:
        claims = auth.verify(_bearer(request), app_id, REFRESH)
    except AuthError as exc:
        return _error(401, f"logout refused: {exc}", "invalid_token")
    await auth.revoke(claims)
    return Response(status_code=204)


def auth_routes() -> list[Route]:
    """The HTTP auth endpoints (they find the :class:`Authenticator` in ``app.state.auth``)."""
    prefix = "/api/v1/apps/{app_id}/auth"
    return [
        Route(f"{prefix}/anonymous", _anonymous, methods=["POST"]),
        Route(f"{prefix}/refresh", _refresh, methods=["POST"]),
        Route(f"{prefix}/logout", _logout, methods=["POST"]),
    ]
