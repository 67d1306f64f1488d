"""Who is calling the backend API, and the API's errors and request bodies.

``Authorization: Bearer <admin key>`` (one of ``[server] admin_keys``) is an admin caller:
every object, rules not applied. ``Bearer <access token>`` of a user of the app is that
user: the app's read and write rules apply exactly as on sync. Anything else is a 401.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...errors import AuthError, TooManyAttemptsError
from ..auth import ACCESS, Authenticator, client_address
from ..hub import SyncHub
from ..settings import AppSettings
from ..storage.base import StorageError

log = logging.getLogger("tidesync.server.api")

#: The user id the Data API's writes with an admin key are registered under (the change
#: feed reports them with ``"by": {"user_id": null, ...}``).
ADMIN_USER = "__admin__"
#: The deepest JSON nesting a request body may have.
MAX_JSON_DEPTH = 64


class ApiError(Exception):
    """A refusal of the backend API: answered as ``{"error": message, "code": code}``."""

    def __init__(
        self, status: int, message: str, code: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        #: More members of the answer (e.g. ``refused`` for a 403 of the write rules).
        self.extra = extra or {}

    def response(self) -> JSONResponse:
        """The JSON answer."""
        body = {"error": self.message, "code": self.code, **self.extra}
        headers = {"Retry-After": "60"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class Caller:
    """Who makes a request: an admin (``user_id`` None, no rules) or a user of the app."""

    app_id: str
    user_id: str | None

    @property
    def admin(self) -> bool:
        """True for an admin key: every object, rules not applied."""
        return self.user_id is None


def hub_of(request: Request) -> SyncHub:
    """The running server's hub (503 while it starts or after it stopped)."""
    hub = getattr(request.app.state, "hub", None)
    if not isinstance(hub, SyncHub):
        raise ApiError(503, "the server is not started", "unavailable")
    return hub


def app_settings(hub: SyncHub, app_id: str) -> AppSettings:
    """The app's settings; 404 naming the app when the server does not serve it."""
    settings = hub.config.auth.app(app_id, hub.config.development_mode)
    if settings is None:
        raise ApiError(404, f"there is no app {app_id!r} on this server", "unknown_app")
    return settings


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing 'Authorization: Bearer <admin key or access token>' header",
            "invalid_token",
        )
    return token.strip()


async def caller_of(request: Request, hub: SyncHub, app_id: str) -> Caller:
    """The caller of ``request`` for ``app_id`` (401 for a missing, wrong or expired key
    or token, or another app's token; 429 after too many failures from one address)."""
    auth: Authenticator = hub.auth
    app_settings(hub, app_id)
    token = _bearer(request)
    address = client_address(request)
    try:
        auth.check_login(app_id, "data-api", address)  # failures only
    except TooManyAttemptsError as exc:
        raise ApiError(429, str(exc), "too_many_attempts") from None
    if auth.is_admin_key(token):
        return Caller(app_id, None)
    try:
        claims = auth.verify(token, app_id, ACCESS)
    except AuthError as exc:
        auth.login_failed(app_id, "data-api", address)
        raise ApiError(401, f"access refused: {exc}", "invalid_token") from None
    refusal = await auth.access_refusal(app_id, claims)
    if refusal is not None:
        raise ApiError(401, f"access refused: {refusal}", "invalid_token")
    return Caller(app_id, claims.user_id)


def _depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar: 1; ``{"a": 1}``: 2), counted
    up to just past :data:`MAX_JSON_DEPTH`; only containers are walked (json.loads makes
    dicts and lists)."""
    if type(value) is not dict and type(value) is not list:
        return 1
    depth, level = 1, [value]
    while level:
        nxt: list[Any] = []
        children = False
        for v in level:
            items = v.values() if type(v) is dict else v
            if items:
                children = True
                nxt += [c for c in items if type(c) is dict or type(c) is list]
        if not children:
            return depth
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth
        level = nxt
    return depth


async def json_body(request: Request) -> Any:
    """The request's JSON body: 415 for another content type, 400 for malformed JSON or
    nesting deeper than :data:`MAX_JSON_DEPTH` (the body size is bounded by the server's
    ``max_request_body_bytes``: 413)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(
            415,
            f"the request body must be JSON (Content-Type: application/json), got "
            f"{ctype or 'no content type'}",
            "unsupported_media_type",
        )
    raw = await request.body()
    try:
        parsed = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", "bad_request") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "bad_request") from None
    if _depth(parsed) > MAX_JSON_DEPTH:
        raise ApiError(400, "the request body is nested too deeply", "bad_request")
    return parsed


Handler = Callable[[Request, SyncHub, Caller], Awaitable[Response]]
#: A handler of a server-wide admin route (no app in the path).
AdminHandler = Callable[[Request, SyncHub], Awaitable[Response]]

#: The rate-limit account of failed admin keys on the server-wide admin routes.
_ADMIN_ACCOUNT = "admin-api"


def require_admin(caller: Caller) -> None:
    """403 unless ``caller`` used an admin key."""
    if not caller.admin:
        raise ApiError(403, "this needs an admin key, not a user's token", "forbidden")


def check_admin_key(request: Request, hub: SyncHub) -> None:
    """401 unless the request carries one of the server's admin keys (429 after too many
    failures from one address)."""
    auth: Authenticator = hub.auth
    token = _bearer(request)
    address = client_address(request)
    try:
        auth.check_login("", _ADMIN_ACCOUNT, address)
    except TooManyAttemptsError as exc:
        raise ApiError(429, str(exc), "too_many_attempts") from None
    if not auth.is_admin_key(token):
        auth.login_failed("", _ADMIN_ACCOUNT, address)
        raise ApiError(401, "access refused: not an admin key", "invalid_token")


async def _answer(request: Request, run: Callable[[SyncHub], Awaitable[Response]]) -> Response:
    try:
        return await run(hub_of(request))
    except ApiError as exc:
        return exc.response()
    except StorageError as exc:  # the storage is down or full: try again later
        log.warning("%s %s: the storage failed: %s", request.method, request.url.path, exc)
        return ApiError(503, f"the storage failed: {exc}", "unavailable").response()
    except Exception:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, "internal error (see the server log)", "internal").response()


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: the hub and caller in, every :class:`ApiError` a JSON answer out
    (a storage failure a 503, anything unexpected a 500 logged with its traceback)."""

    async def run(request: Request) -> Response:
        async def call(hub: SyncHub) -> Response:
            caller = await caller_of(request, hub, request.path_params["app_id"])
            return await handler(request, hub, caller)

        return await _answer(request, call)

    run.__name__ = handler.__name__
    return run


def admin_endpoint(handler: AdminHandler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a server-wide admin handler as :func:`endpoint` does; only an admin key may
    call it (:func:`check_admin_key`)."""

    async def run(request: Request) -> Response:
        async def call(hub: SyncHub) -> Response:
            check_admin_key(request, hub)
            return await handler(request, hub)

        return await _answer(request, call)

    run.__name__ = handler.__name__
    return run
