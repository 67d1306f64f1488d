"""The console's sign-in, overview and sessions pages (live rows over Server-Sent Events)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..hub import SyncHub
from ..overview import filter_sessions, server_overview
from ..snapshot import SessionSnapshot
from .signin import PRESESSION_COOKIE, SESSION_COOKIE, ConsoleAccessError, set_cookie
from .web import (
    PREFIX,
    SECURITY_HEADERS,
    Console,
    Ctx,
    FormError,
    console_of,
    html_response,
    page,
    read_form,
    redirect,
    refused,
)

#: How often the sessions stream looks for changes (seconds).
STREAM_INTERVAL = 1.0
#: A comment line this often keeps proxies from closing a quiet stream (seconds).
STREAM_HEARTBEAT = 15.0
#: A stream ends after this long; the browser's EventSource reconnects by itself.
STREAM_MAX_SECONDS = 600.0


# -- sign-in -------------------------------------------------------------------------------


async def signin_form(request: Request) -> Response:
    """The sign-in form; with ``?token=`` (the one-time development link) signs in."""
    console = console_of(request)
    token = request.query_params.get("token")
    if token is not None:
        if not console.auth.use_token(token):
            return refused(console, "this sign-in link was used already or is wrong", 403)
        return _signed_in(request)
    pre = secrets.token_urlsafe(24)
    body = console.html(
        "signin.html",
        {"csrf": pre, "nav": "", "error": None},
    )
    response = html_response(body)
    set_cookie(response, request, PRESESSION_COOKIE, pre, PREFIX + "/signin")
    return response


async def signin(request: Request) -> Response:
    """POST the admin key (with the pre-session cookie's token) to sign in."""
    console = console_of(request)
    try:
        form = await read_form(request)
    except FormError as exc:
        return refused(console, str(exc), 400)
    try:
        console.auth.check_csrf(request.cookies.get(PRESESSION_COOKIE, ""), form.get("csrf"))
    except ConsoleAccessError as exc:
        return refused(console, str(exc), 403)
    key = form.get("key")
    if not isinstance(key, str) or not console.auth.key_ok(key):
        body = console.html(
            "signin.html",
            {"csrf": form.get("csrf"), "nav": "", "error": "that is not an admin key"},
        )
        return html_response(body, 403)
    return _signed_in(request)


def _signed_in(request: Request) -> Response:
    console = console_of(request)
    response = redirect("/")
    set_cookie(response, request, SESSION_COOKIE, console.auth.start(), PREFIX)
    response.delete_cookie(PRESESSION_COOKIE, path=PREFIX + "/signin")
    return response


@page
async def signout(ctx: Ctx) -> Response:
    """End the session (a POST with the CSRF token)."""
    ctx.console.auth.end(ctx.request)
    response = redirect("/signin")
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response


# -- overview ------------------------------------------------------------------------------


def live_apps(hub: SyncHub) -> list[str]:
    """The declared apps and those with a connection now, sorted."""
    apps = set(hub.config.auth.apps)
    apps.update(row.app_id for row in hub.session_snapshot() if row.live)
    return sorted(apps)


@page
async def overview(ctx: Ctx) -> Response:
    """Apps, connections, sessions, storage, version and uptime (:mod:`..overview`)."""
    view = server_overview(ctx.require_hub())
    return ctx.render(
        "overview.html",
        nav="overview",
        apps=[(a.app_id, [a.unbound, a.sessions]) for a in view.apps],
        connections=view.connections,
        sessions=view.sessions,
        storage=view.storage,
        mode=view.mode,
        uptime=view.uptime_text,
        started=view.started_at,
    )


# -- sessions ------------------------------------------------------------------------------


def _filtered(hub: SyncHub, user: str, app: str) -> list[SessionSnapshot]:
    return filter_sessions(hub.session_snapshot(), user, app)


def _filters(request: Request) -> tuple[str, str]:
    params = request.query_params
    return params.get("user", "").strip(), params.get("app", "").strip()


def session_rows_html(console: Console, rows: list[SessionSnapshot]) -> str:
    """The sessions table's body."""
    return console.html("_session_rows.html", {"rows": rows})


@page
async def sessions(ctx: Ctx) -> Response:
    """One row per device session, kept live by :func:`session_events`."""
    hub = ctx.require_hub()
    user, app = _filters(ctx.request)
    rows = _filtered(hub, user, app)
    query = ctx.request.url.query
    return ctx.render(
        "sessions.html",
        nav="sessions",
        rows=rows,
        user=user,
        app=app,
        apps=live_apps(hub),
        stream=f"{PREFIX}/sessions/events" + (f"?{query}" if query else ""),
    )


@page
async def session_events(ctx: Ctx) -> Response:
    """``text/event-stream``: the sessions table's body whenever it changes."""
    hub = ctx.require_hub()
    user, app = _filters(ctx.request)
    console, request = ctx.console, ctx.request

    async def events() -> AsyncIterator[str]:
        last, quiet = "", 0.0
        started = time.monotonic()
        while time.monotonic() - started < STREAM_MAX_SECONDS and not hub.stopping.is_set():
            if not console.auth.still_signed_in(request):
                return  # signed out (or expired) elsewhere: the stream ends with the session
            body = session_rows_html(console, _filtered(hub, user, app))
            if body != last:
                last, quiet = body, 0.0
                yield f"event: rows\ndata: {json.dumps({'html': body})}\n\n"
            elif quiet >= STREAM_HEARTBEAT:
                quiet = 0.0
                yield ": ping\n\n"
            try:
                await asyncio.wait_for(hub.stopping.wait(), STREAM_INTERVAL)
            except TimeoutError:
                quiet += STREAM_INTERVAL

    headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
