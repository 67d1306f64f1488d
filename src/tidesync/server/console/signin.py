"""Who may use the web console: admin keys, the one-time development link, sessions, CSRF.

A console session is a random id in an HttpOnly, ``SameSite=Strict`` cookie (``Secure``
over https), kept in this process's memory with its CSRF token and expiry. Every POST
carries the CSRF token in a form field (``csrf``), compared in constant time; the sign-in
form, which has no session yet, uses a pre-session cookie and the same field (double
submit). In development mode the console makes one sign-in token at start; the link that
carries it works once and then redirects to a URL without it (``docs/console.md``).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from ...errors import TidesyncError

#: The session cookie's name.
SESSION_COOKIE = "tidesync_console"
#: The sign-in form's pre-session cookie (CSRF for the form itself).
PRESESSION_COOKIE = "tidesync_console_pre"
#: How long a console session lasts without use (seconds).
SESSION_IDLE = 8 * 3600.0
#: At most this many console sessions at once (the oldest is dropped).
MAX_SESSIONS = 1000


class ConsoleAccessError(TidesyncError):
    """A console request without a valid session or CSRF token."""


@dataclass(slots=True)
class ConsoleSession:
    """One signed-in browser."""

    csrf: str
    expires_at: float


class ConsoleAuth:
    """Admin keys, the development sign-in token and the signed-in sessions of one process."""

    def __init__(
        self,
        admin_keys: tuple[str, ...],
        *,
        one_time_link: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = tuple(k.encode() for k in admin_keys)
        self._clock = clock
        self._sessions: dict[str, ConsoleSession] = {}
        #: The development sign-in token (None once used, or without development mode).
        self.one_time_token: str | None = secrets.token_urlsafe(32) if one_time_link else None

    @property
    def enabled(self) -> bool:
        """False when nobody could sign in (production mode without an admin key)."""
        return bool(self._keys) or self.one_time_token is not None

    def key_ok(self, key: str) -> bool:
        """Is ``key`` one of the admin keys (constant time per key)?"""
        given = key.strip().encode()
        found = False
        for k in self._keys:
            found |= hmac.compare_digest(given, k)
        return bool(given) and found

    def use_token(self, token: str) -> bool:
        """Consume the one-time token; True only the first time the right one is given."""
        expected = self.one_time_token
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return False
        self.one_time_token = None
        return True

    def start(self) -> str:
        """A new session; answers its id (the cookie's value)."""
        now = self._clock()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = ConsoleSession(secrets.token_urlsafe(32), now + SESSION_IDLE)
        return sid

    def session_of(self, request: Request) -> ConsoleSession | None:
        """The request's live session (its expiry pushed on), or None."""
        sid = request.cookies.get(SESSION_COOKIE, "")
        session = self._sessions.get(sid) if sid else None
        now = self._clock()
        if session is None or session.expires_at <= now:
            return None
        session.expires_at = now + SESSION_IDLE
        return session

    def still_signed_in(self, request: Request) -> bool:
        """Is the request's session still live (without pushing its expiry on)?"""
        session = self._sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        return session is not None and session.expires_at > self._clock()

    def end(self, request: Request) -> None:
        """Sign the request's session out."""
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)

    @staticmethod
    def check_csrf(expected: str, given: object) -> None:
        """Raise :class:`ConsoleAccessError` unless ``given`` is the expected token."""
        if not isinstance(given, str) or not given:
            raise ConsoleAccessError("the form has no CSRF token; reload the page")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ConsoleAccessError("the form's CSRF token is wrong; reload the page")


def set_cookie(response: Response, request: Request, name: str, value: str, path: str) -> None:
    """Set a console cookie: HttpOnly, SameSite=Strict, Secure over https."""
    response.set_cookie(
        name,
        value,
        path=path,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
