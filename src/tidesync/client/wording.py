"""What went wrong with a connection, in words: one exception in, one sentence out.

:func:`describe_failure` is the one place that turns what ``websockets``, ``httpx``,
``ssl`` and the socket layer raise into a sentence for people, e.g. "connection refused
by 127.0.0.1:8765 (is the server running?)" instead of ``ConnectionRefusedError(111, ...)``
or "the server (or the network) closed the connection without a reason" instead of
``ConnectionClosedError(None, None, None)``. The sync error handler's ``SyncError``
messages, the ``tidesync.sync`` log lines, the connection state changes and the
``AuthError`` of a login that cannot reach the server all use it
(docs/sync-session.md, "Logging"). A pure function: it reads the exception, nothing else.
"""

from __future__ import annotations

import errno
import socket
import ssl

import httpx
import websockets
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import CLOSE_CODE_EXPLANATIONS, Close

from ..errors import TidesyncError

#: How deep :func:`describe_failure` follows ``__cause__``/``__context__`` to find the
#: operating system's error inside a library's wrapper.
_CHAIN_DEPTH = 8


def describe_failure(exc: BaseException, target: str) -> str:
    """One sentence saying what ``exc`` means for a connection to ``target`` (the server's
    ``host:port``). Never raises; an exception it does not know is named with its type."""
    if isinstance(exc, BaseExceptionGroup):
        parts = list(dict.fromkeys(describe_failure(e, target) for e in exc.exceptions))
        return "; ".join(parts) if parts else f"an unexpected error: {exc}"
    if isinstance(exc, websockets.ConnectionClosed):
        return _closed(exc.rcvd, exc.sent)
    if isinstance(exc, InvalidStatus):
        return _status(exc.response.status_code, exc.response.reason_phrase, target)
    if isinstance(exc, InvalidURI):
        return f"the sync URL is invalid: {exc}"
    if isinstance(exc, InvalidHandshake):
        return f"{target} did not answer as a tidesync sync server ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out talking to {target}"
    if isinstance(exc, httpx.HTTPError):
        inner = _os_error_inside(exc)
        if inner is not None:
            return describe_failure(inner, target)
        return f"cannot reach {target}: {exc or type(exc).__name__}"
    if isinstance(exc, OSError):
        return _os_error(exc, target)
    if isinstance(exc, TidesyncError):
        return str(exc)
    text = str(exc)
    return f"an unexpected error: {type(exc).__name__}" + (f": {text}" if text else "")


def _closed(rcvd: Close | None, sent: Close | None) -> str:
    if rcvd is not None:
        return f"the server closed the connection ({_close_words(rcvd)})"
    if sent is not None:
        return (
            f"this device closed the connection ({_close_words(sent)}) and the server did not "
            "answer"
        )
    return "the server (or the network) closed the connection without a reason"


def _close_words(close: Close) -> str:
    meaning = CLOSE_CODE_EXPLANATIONS.get(close.code)
    words = f"code {close.code}" + (f", {meaning}" if meaning else "")
    return words + (f": {close.reason}" if close.reason else "")


def _status(code: int, phrase: str, target: str) -> str:
    said = f"HTTP {code} {phrase}".rstrip()
    if code == 404:
        return f"{target} has no sync endpoint for this app ({said}: is it a tidesync server?)"
    if code in (401, 403):
        return f"the server refused the connection ({said})"
    if code >= 500:
        return f"the server failed to open the connection ({said})"
    return f"the server answered the connection with {said}, not a WebSocket"


def _os_error_inside(exc: BaseException) -> BaseException | None:
    """The operating system's error a library's exception wraps: the first one in the
    chain that says more than "it failed" (an errno, a subclass, a group of them)."""
    seen, vague = exc, None
    for _ in range(_CHAIN_DEPTH):
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        if isinstance(nxt, BaseExceptionGroup):
            return nxt
        if isinstance(nxt, OSError):
            if type(nxt) is not OSError or nxt.errno is not None:
                return nxt
            vague = vague or nxt  # e.g. anyio's "All connection attempts failed"
        seen = nxt
    return vague


def _os_error(exc: OSError, target: str) -> str:
    host = target.rpartition(":")[0] or target
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or getattr(exc, "reason", None) or str(exc)
        return (
            f"the TLS certificate of {host} could not be verified ({why}); if it is signed by "
            "a private certificate authority, give it as AppConfiguration(ca_bundle=...)"
        )
    if isinstance(exc, ssl.SSLError):
        why = getattr(exc, "reason", None) or str(exc)
        return f"the TLS handshake with {target} failed ({why})"
    if isinstance(exc, socket.gaierror):
        return f"the host name {host} could not be found (DNS: {exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {target} (is the server running?)"
    if isinstance(exc, TimeoutError):
        return f"timed out connecting to {target}"
    if isinstance(exc, ConnectionResetError):
        return f"the connection to {target} was reset"
    if isinstance(exc, (ConnectionAbortedError, BrokenPipeError)):
        return f"the connection to {target} was broken"
    if exc.errno == errno.ENETUNREACH:
        return f"the network is unreachable (connecting to {target})"
    if exc.errno == errno.EHOSTUNREACH:
        return f"there is no route to {target}"
    return f"cannot connect to {target}: {exc.strerror or exc}"
