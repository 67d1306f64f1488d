"""Configurable limits of the sync server, the login rate limiter and the body-size guard.

Every limit has a default generous enough for real apps and small enough that one client
cannot exhaust the server: see ``docs/security.md`` for the table. The frame-size limit
stays in :class:`~tidesync.server.config.ServerConfig` (``max_frame_size``) because the
protocol layer enforces it; everything else is here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from ..core.hlc import MAX_AHEAD_MS
from ..errors import ConfigurationError

#: The range of ``max_clock_skew_ms``: at least a minute (devices measure the server's
#: time to within a round trip), at most ``MAX_AHEAD_MS``, how far ahead of their clock
#: devices adopt timestamps (docs/merge.md, "Clocks").
MIN_CLOCK_SKEW_MS = 60_000
MAX_CLOCK_SKEW_MS = MAX_AHEAD_MS

#: An ASGI application (kept loose: Starlette's own types are not needed here).
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-server limits (sizes in bytes, counts per minute for login attempts)."""

    #: Largest ``instructions`` blob of one uploaded changeset (one device transaction),
    #: whole or joined from its parts; a larger one is refused and integrated as nothing
    #: (ERROR 232, docs/server.md "Limits"). Parts of one are held in memory until the last.
    max_changeset_bytes: int = 64 * 1024 * 1024
    #: Sessions (synced database files) bound at once on one connection.
    max_sessions_per_connection: int = 64
    #: Sync connections open at once for one user of one app.
    max_connections_per_user: int = 16
    #: Characters of one subscription query string.
    max_query_length: int = 4096
    #: Failed logins per minute for one account (email, API key, JWT subject) from one
    #: client address; then that address waits, other addresses are not slowed.
    login_attempts_per_account: int = 10
    #: Failed logins per minute from one client address, whatever the accounts; also the
    #: per-address budget of registrations, confirmations and password resets.
    login_attempts_per_address: int = 60
    #: Failed logins per minute for one account from all addresses together (the ceiling
    #: on a guessing attack spread over many addresses).
    login_attempts_per_account_total: int = 100
    #: Anonymous sign-ups (new anonymous users) per minute from one client address.
    anonymous_logins_per_address: int = 30
    #: Connections (HTTP and WebSocket) open at once from one peer address; trusted proxies
    #: are exempt (``server/gate.py``).
    max_connections_per_address: int = 256
    #: Largest frame a sync WebSocket may send before its HELLO is verified.
    max_frame_bytes_before_hello: int = 64 * 1024
    #: Bytes of one HTTP request body (the auth API and everything else but the Data API).
    max_request_body_bytes: int = 64 * 1024
    #: Bytes of one Data API request body (``/api/v1/apps/{app}/data...``): a backend's
    #: bulk ``POST`` of 10,000s of objects fits; its objects still meet ``max_object_bytes``.
    max_api_body_bytes: int = 32 * 1024 * 1024
    #: Models of one app whose schema is learnt from clients (no declared schema).
    max_models_per_app: int = 1000
    #: Fields of one model whose schema is learnt from clients (no declared schema).
    max_fields_per_model: int = 1000
    #: Milliseconds an uploaded timestamp (HLC wall time) may be ahead of the server's
    #: clock; a changeset further ahead is refused with ERROR 236 (CLOCK_SKEW).
    max_clock_skew_ms: int = 3_600_000

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"limits.{name} must be a positive integer, not {value!r}")
        if not MIN_CLOCK_SKEW_MS <= self.max_clock_skew_ms <= MAX_CLOCK_SKEW_MS:
            raise ConfigurationError(
                f"limits.max_clock_skew_ms must be between {MIN_CLOCK_SKEW_MS} and "
                f"{MAX_CLOCK_SKEW_MS} (devices adopt timestamps up to that far ahead), "
                f"not {self.max_clock_skew_ms}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Limits:
        """Limits from a ``[limits]`` table; unknown keys are refused by name."""
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigurationError(f"unknown key(s) in [limits]: {', '.join(unknown)}")
        return cls(**raw)


class RateLimiter:
    """Sliding one-minute windows of attempts, per key.

    :meth:`hit` records an attempt and returns False when the key already had ``limit``
    attempts in the last ``window`` seconds (the refused attempt is not recorded, so a
    client that stops for a minute gets in again). Memory is bounded: at most
    ``max_keys`` keys are tracked, the stalest dropped first.
    """

    def __init__(
        self,
        limit: int,
        *,
        window: float = 60.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str) -> bool:
        """Record an attempt for ``key``; False if it is over the limit."""
        now = self._clock()
        hits = self._hits.pop(key, None)
        if hits is None:
            hits = deque()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        allowed = len(hits) < self.limit
        if allowed:
            hits.append(now)
        self._hits[key] = hits  # re-inserted last: dict order is least recently used first
        while len(self._hits) > self.max_keys:
            del self._hits[next(iter(self._hits))]
        return allowed

    def full(self, key: str) -> bool:
        """True if ``key`` has ``limit`` attempts in the window (without recording one)."""
        hits = self._hits.get(key)
        if not hits:
            return False
        now = self._clock()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        return len(hits) >= self.limit

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0 if it may now)."""
        hits = self._hits.get(key)
        if not hits or len(hits) < self.limit:
            return 0.0
        return max(0.0, hits[0] + self.window - self._clock())


class BodySizeLimit:
    """ASGI middleware: HTTP request bodies over ``max_bytes`` get 413 and are not read.

    A declared ``Content-Length`` over the limit is refused before the body is read; a
    chunked body is counted as it arrives and cut off as soon as it passes the limit.
    WebSocket traffic passes through untouched (frames have their own limit).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, api_max_bytes: int | None = None) -> None:
        """``api_max_bytes``: the limit of Data API paths (None: ``max_bytes``)."""
        self.app = app
        self.max_bytes = max_bytes
        self.api_max_bytes = max_bytes if api_max_bytes is None else api_max_bytes

    def limit_for(self, path: str) -> int:
        """The body limit of a request path."""
        parts = path.split("/")  # "", "api", "v1", "apps", app, "data", ...
        if len(parts) > 5 and parts[1:4] == ["api", "v1", "apps"] and parts[5] == "data":
            return self.api_max_bytes
        return self.max_bytes

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(str(scope.get("path", "")))
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _too_large(send, "invalid Content-Length header", 400)
                    return
                if declared > limit:
                    await _too_large(send, self._message(limit), 413)
                    return
        seen = 0
        refused = False

        async def counting_receive() -> Any:
            nonlocal seen, refused
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    raise _BodyTooLarge
            return message

        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(send, self._message(limit), 413)
        except Exception:
            if not refused:
                raise
            if not started:
                await _too_large(send, self._message(limit), 413)

    def _message(self, limit: int) -> str:
        return f"the request body is larger than the limit of {limit} bytes"


class _BodyTooLarge(Exception):
    """Raised inside the app's receive() when the body passes the limit."""


async def _too_large(send: Callable[[Any], Awaitable[None]], message: str, status: int) -> None:
    code = b"body_too_large" if status == 413 else b"bad_request"
    body = b'{"error": "' + message.encode() + b'", "code": "' + code + b'"}'
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
