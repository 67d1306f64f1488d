"""The console's plumbing: templates, security headers, and the signed-in page wrapper.

:func:`page` wraps a handler so it runs only for a signed-in browser: a GET without a
session is sent to the sign-in form, a POST without one (or without the session's CSRF
token in its ``csrf`` field) is a 403. Templates autoescape every value.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ... import __version__
from ...errors import TidesyncError
from ..hub import SyncHub
from .signin import ConsoleAccessError, ConsoleAuth, ConsoleSession

#: Where the console is mounted.
PREFIX = "/admin"

#: Sent with every console answer: no framing, no inline scripts, nothing cached, no referrer.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

#: The largest console form body (bytes): an edited field's JSON fits.
MAX_FORM_BYTES = 1024 * 1024


class Console:
    """The console of one server process: who may sign in, the templates."""

    def __init__(self, auth: ConsoleAuth) -> None:
        self.auth = auth
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("tidesync.server.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = _when
        self.templates.globals["prefix"] = PREFIX
        self.templates.globals["version"] = __version__

    def html(self, name: str, context: dict[str, Any]) -> str:
        """Render a template to a string."""
        return self.templates.get_template(name).render(context)


def _when(value: float | None) -> str:
    if value is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))


def console_of(request: Request) -> Console:
    """The app's console."""
    console = request.app.state.console
    assert isinstance(console, Console)
    return console


@dataclass
class Ctx:
    """What a signed-in handler gets."""

    request: Request
    console: Console
    session: ConsoleSession
    hub: SyncHub | None
    form: dict[str, str] | None

    def render(self, name: str, status: int = 200, **context: Any) -> Response:
        """A page, with the session's CSRF token for its forms."""
        context.setdefault("csrf", self.session.csrf)
        context.setdefault("nav", "")
        return html_response(self.console.html(name, context), status)

    def require_hub(self) -> SyncHub:
        """The running hub; :class:`ServerNotStarted` (answered as a 503) otherwise."""
        if self.hub is None:
            raise ServerNotStarted()
        return self.hub


class FormError(TidesyncError):
    """A console form body that cannot be read."""


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the only kind the console's forms
    send), at most :data:`MAX_FORM_BYTES`; a repeated name keeps its first value. Another
    kind of body reads as an empty form (so it has no CSRF token and is refused)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(f"the form is over {MAX_FORM_BYTES} bytes")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(f"the form cannot be read: {exc}") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


class ServerNotStarted(TidesyncError):
    """The sync hub is not running (the server starts or stops)."""


def html_response(body: str, status: int = 200) -> Response:
    """An HTML answer with the console's security headers."""
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def redirect(path: str) -> Response:
    """A 303 to a console path."""
    return RedirectResponse(PREFIX + path, status_code=303, headers=SECURITY_HEADERS)


def refused(console: Console, message: str, status: int = 403) -> Response:
    """The error page (no session needed)."""
    body = console.html("error.html", {"message": message, "csrf": "", "nav": ""})
    return html_response(body, status)


Handler = Callable[[Ctx], Awaitable[Response]]


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Run ``handler`` for a signed-in browser; POSTs must carry the CSRF token."""

    async def run(request: Request) -> Response:
        console = console_of(request)
        session = console.auth.session_of(request)
        if session is None:
            if request.method == "GET":
                return redirect("/signin")
            return refused(console, "not signed in: sign in again", 403)
        form = None
        if request.method == "POST":
            try:
                form = await read_form(request)
            except FormError as exc:
                return refused(console, str(exc), 400)
            try:
                console.auth.check_csrf(session.csrf, form.get("csrf"))
            except ConsoleAccessError as exc:
                return refused(console, str(exc), 403)
        hub = getattr(request.app.state, "hub", None)
        ctx = Ctx(request, console, session, hub if isinstance(hub, SyncHub) else None, form)
        try:
            return await handler(ctx)
        except ServerNotStarted:
            return refused(console, "the server is not started", 503)

    return run
