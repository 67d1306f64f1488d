"""``GET /api/v1/apps/{app}/changes``: the change feed as JSON pages (long-polled with
``wait``) or as Server-Sent Events (``Accept: text/event-stream``); docs/backend.md.

Both wake on the hub's commits and on the storage's notices of other processes' commits
(:meth:`~..hub.SyncHub.listen`), and end when the server starts going away
(``hub.stopping``): no request outlives the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ...errors import AuthError
from ..auth import ACCESS, TokenClaims
from ..hub import SyncHub
from .access import ApiError, Caller, endpoint
from .feed import DEFAULT_LIMIT, MAX_LIMIT, FeedPage, FeedReader, build_filter, parse_cursor

#: The longest ``wait`` (seconds) a long poll may ask for.
MAX_WAIT = 60.0
#: Seconds between SSE heartbeat comments when nothing happens.
HEARTBEAT_SECONDS = 15.0
#: Events an SSE stream reads per page.
STREAM_PAGE = 500
#: Seconds between two looks at whether a user's stream may go on (user disabled, logout).
GRANT_CHECK = 5.0


class Waker:
    """Set by every commit of one app (this process or another) from creation to close."""

    def __init__(self, hub: SyncHub, app_id: str) -> None:
        self.hub = hub
        self.event = asyncio.Event()
        self._stop: Callable[[], None] = hub.listen(app_id, self.event.set)

    async def wait(self, seconds: float) -> None:
        """Until a commit since the last :meth:`clear`, the server stops, or ``timeout``."""
        if self.event.is_set() or self.hub.stopping.is_set() or seconds <= 0:
            return
        waits = [
            asyncio.ensure_future(self.event.wait()),
            asyncio.ensure_future(self.hub.stopping.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def clear(self) -> None:
        """Forget the commits seen so far (call before reading the log)."""
        self.event.clear()

    def close(self) -> None:
        """Stop listening."""
        self._stop()


class Grant:
    """Whether a user's stream may go on: its access token unexpired, its user active, its
    login not logged out (checked at most every :data:`GRANT_CHECK` seconds). An admin
    key's stream always may."""

    def __init__(self, hub: SyncHub, caller: Caller, request: Request) -> None:
        self.hub = hub
        self.app_id = caller.app_id
        self.claims: TokenClaims | None = None
        self._checked = time.monotonic()
        if not caller.admin:
            token = request.headers.get("authorization", "").partition(" ")[2].strip()
            try:
                self.claims = hub.auth.verify(token, caller.app_id, ACCESS)
            except AuthError as exc:  # it was valid a moment ago (caller_of)
                raise ApiError(401, f"access refused: {exc}", "invalid_token") from None

    def seconds_left(self) -> float:
        """Until the token expires (infinity for an admin)."""
        if self.claims is None:
            return math.inf
        return self.claims.expires_at - time.time()

    async def refusal(self) -> str | None:
        """Why the stream must end now, or None."""
        if self.claims is None:
            return None
        if self.seconds_left() <= 0:
            return "the access token expired (open the stream again with a fresh one)"
        now = time.monotonic()
        if now - self._checked < GRANT_CHECK:
            return None
        self._checked = now
        return await self.hub.auth.access_refusal(self.app_id, self.claims)


def _number(request: Request, name: str, default: float, low: float, high: float) -> float:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, not {text[:40]!r}", "bad_request") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low:g} and {high:g}", "bad_request")
    return value


async def _reader(request: Request, hub: SyncHub, caller: Caller) -> FeedReader:
    raw_models = request.query_params.get("models")
    models = None
    if raw_models is not None:
        models = [m.strip() for m in raw_models.split(",") if m.strip()]
        if not models:
            raise ApiError(400, "models= names no model", "unknown_model")
    flt = await build_filter(hub, caller, models, request.query_params.get("query"))
    return FeedReader(hub.storage, caller.app_id, flt)


async def changes(request: Request, hub: SyncHub, caller: Caller) -> Response:
    """The change feed (JSON page or event stream)."""
    reader = await _reader(request, hub, caller)
    if "text/event-stream" in request.headers.get("accept", ""):
        last = request.headers.get("last-event-id")
        since_text = last if last else request.query_params.get("since")
        where = "Last-Event-ID" if last else "since"
        since = None if since_text is None else _since(since_text, where)
        cursor = await _first_cursor(reader, hub, since)
        grant = Grant(hub, caller, request)
        first = await reader.page(cursor, STREAM_PAGE)  # errors answer before streaming
        return StreamingResponse(
            _stream(reader, hub, first, grant),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    limit = int(_number(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))
    wait = _number(request, "wait", 0, 0, MAX_WAIT)
    text = request.query_params.get("since")
    cursor = await _first_cursor(reader, hub, None if text is None else _since(text, "since"))
    page = await _long_poll(reader, hub, cursor, limit, wait)
    return JSONResponse({"events": page.events, "next": str(page.cursor)})


def _since(text: str, where: str) -> int | str:
    return "now" if text.strip() == "now" else parse_cursor(text, where)


async def _first_cursor(reader: FeedReader, hub: SyncHub, since: int | str | None) -> int:
    if since == "now":
        return await hub.storage.latest_version(reader.app_id)
    assert not isinstance(since, str)
    return await reader.start_cursor(since)


async def _long_poll(
    reader: FeedReader, hub: SyncHub, cursor: int, limit: int, wait: float
) -> FeedPage:
    waker = Waker(hub, reader.app_id)
    deadline = time.monotonic() + wait
    try:
        while True:
            waker.clear()
            page = await reader.page(cursor, limit)
            left = deadline - time.monotonic()
            if page.changes or left <= 0 or hub.stopping.is_set():
                return page
            cursor = page.cursor
            if not page.more:
                await waker.wait(left)
    finally:
        waker.close()


def _sse_lines(page: FeedPage) -> list[str]:
    """The SSE events of a page: ``id:`` on the last event of each changeset, so a stream
    resumed with ``Last-Event-ID`` starts at the first changeset not wholly received; a
    bare ``id:`` line moves the cursor over changesets the filter hid."""
    out: list[str] = []
    versions = page.versions
    count = len(versions)
    for i, (data, version) in enumerate(zip(page.texts(), versions, strict=True)):
        last_of_changeset = i + 1 == count or versions[i + 1] != version
        out.append(f"id: {version}\ndata: {data}\n\n" if last_of_changeset else f"data: {data}\n\n")
    if not versions or versions[-1] != page.cursor:
        out.append(f"id: {page.cursor}\n\n")
    return out


async def _stream(
    reader: FeedReader, hub: SyncHub, first: FeedPage, grant: Grant
) -> AsyncIterator[str]:
    waker = Waker(hub, reader.app_id)
    try:
        yield "retry: 1000\n\n"
        page: FeedPage | None = first
        cursor = first.cursor
        while not hub.stopping.is_set():
            refusal = await grant.refusal()
            if refusal is not None:
                raise ApiError(401, f"access refused: {refusal}", "invalid_token")
            if page is None:
                waker.clear()
                page = await reader.page(cursor, STREAM_PAGE)
            sent = bool(page.changes) or page.cursor != cursor
            if sent:
                yield "".join(_sse_lines(page))  # one write per page
            cursor, more = page.cursor, page.more
            page = None
            if not more:
                await waker.wait(min(HEARTBEAT_SECONDS, max(0.0, grant.seconds_left())))
                if not waker.event.is_set() and not hub.stopping.is_set():
                    yield ": heartbeat\n\n"
    except ApiError as exc:  # e.g. trimmed while streaming: say so, then end
        body = json.dumps({"error": exc.message, "code": exc.code, **exc.extra})
        yield f"event: error\ndata: {body}\n\n"
    finally:
        waker.close()


def change_routes() -> list[BaseRoute]:
    """The change feed's route."""
    return [Route("/api/v1/apps/{app_id}/changes", endpoint(changes), methods=["GET"])]
