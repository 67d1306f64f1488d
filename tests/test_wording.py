"""``describe_failure``: each kind of connection failure becomes a sentence (pure tests)."""

from __future__ import annotations

import errno
import socket
import ssl

import httpx
import pytest
import websockets
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage, InvalidStatus, InvalidURI
from websockets.frames import Close
from websockets.http11 import Response

import tidesync as ts
from tidesync.client.wording import describe_failure

T = "127.0.0.1:8765"


def _cert_error() -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    err.verify_message = "self-signed certificate"
    return err


def _httpx_wrapping(inner: OSError) -> httpx.ConnectError:
    try:
        try:
            raise inner
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "sentence"),
    [
        (
            websockets.ConnectionClosedError(None, None, None),
            "the server (or the network) closed the connection without a reason",
        ),
        (
            websockets.ConnectionClosedError(Close(1011, "boom"), None, None),
            "the server closed the connection (code 1011, internal error: boom)",
        ),
        (
            websockets.ConnectionClosedOK(Close(1001, ""), Close(1001, ""), True),
            "the server closed the connection (code 1001, going away)",
        ),
        (
            websockets.ConnectionClosedError(None, Close(1000, ""), None),
            "this device closed the connection (code 1000, OK) and the server did not answer",
        ),
        (
            websockets.ConnectionClosedError(Close(4321, "custom"), None, None),
            "the server closed the connection (code 4321: custom)",
        ),
        (
            ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 8765)"),
            "connection refused by 127.0.0.1:8765 (is the server running?)",
        ),
        (TimeoutError(), "timed out connecting to 127.0.0.1:8765"),
        (
            socket.gaierror(-2, "Name or service not known"),
            "the host name 127.0.0.1 could not be found (DNS: Name or service not known)",
        ),
        (ConnectionResetError(104, "reset"), "the connection to 127.0.0.1:8765 was reset"),
        (BrokenPipeError(32, "pipe"), "the connection to 127.0.0.1:8765 was broken"),
        (
            OSError(errno.ENETUNREACH, "Network is unreachable"),
            "the network is unreachable (connecting to 127.0.0.1:8765)",
        ),
        (
            OSError(errno.EHOSTUNREACH, "No route to host"),
            "there is no route to 127.0.0.1:8765",
        ),
        (
            OSError(errno.EACCES, "Permission denied"),
            "cannot connect to 127.0.0.1:8765: Permission denied",
        ),
        (
            InvalidStatus(Response(404, "Not Found", Headers())),
            "127.0.0.1:8765 has no sync endpoint for this app (HTTP 404 Not Found: is it a "
            "tidesync server?)",
        ),
        (
            InvalidStatus(Response(403, "Forbidden", Headers())),
            "the server refused the connection (HTTP 403 Forbidden)",
        ),
        (
            InvalidStatus(Response(503, "Service Unavailable", Headers())),
            "the server failed to open the connection (HTTP 503 Service Unavailable)",
        ),
        (
            InvalidStatus(Response(200, "OK", Headers())),
            "the server answered the connection with HTTP 200 OK, not a WebSocket",
        ),
        (
            InvalidMessage("did not receive a valid HTTP response"),
            "127.0.0.1:8765 did not answer as a tidesync sync server (did not receive a valid "
            "HTTP response)",
        ),
        (InvalidURI("x", "bad"), "the sync URL is invalid: x isn't a valid URI: bad"),
        (httpx.ConnectTimeout("timed out"), "timed out talking to 127.0.0.1:8765"),
        (
            _httpx_wrapping(ConnectionRefusedError(111, "Connection refused")),
            "connection refused by 127.0.0.1:8765 (is the server running?)",
        ),
        (
            _httpx_wrapping(socket.gaierror(-2, "Name or service not known")),
            "the host name 127.0.0.1 could not be found (DNS: Name or service not known)",
        ),
        (httpx.ReadError("eof"), "cannot reach 127.0.0.1:8765: eof"),
        (ts.AuthError("refreshing the access token failed"), "refreshing the access token failed"),
        (ValueError("odd"), "an unexpected error: ValueError: odd"),
        (RuntimeError(), "an unexpected error: RuntimeError"),
        (
            ExceptionGroup("g", [ConnectionRefusedError(111, "x"), ConnectionRefusedError(1, "y")]),
            "connection refused by 127.0.0.1:8765 (is the server running?)",
        ),
        (
            ExceptionGroup("g", [TimeoutError(), ConnectionResetError()]),
            "timed out connecting to 127.0.0.1:8765; the connection to 127.0.0.1:8765 was reset",
        ),
    ],
)
def test_each_kind_becomes_a_sentence(exc: BaseException, sentence: str) -> None:
    assert describe_failure(exc, T) == sentence


def test_tls_verification_names_the_host_the_reason_and_the_remedy() -> None:
    words = describe_failure(_cert_error(), "sync.example.com:443")
    assert words.startswith(
        "the TLS certificate of sync.example.com could not be verified (self-signed certificate)"
    )
    assert "AppConfiguration(ca_bundle=...)" in words


def test_other_tls_failures() -> None:
    err = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert describe_failure(err, T).startswith("the TLS handshake with 127.0.0.1:8765 failed (")


def test_no_sentence_shows_a_repr() -> None:
    words = describe_failure(websockets.ConnectionClosedError(None, None, None), T)
    assert "ConnectionClosedError" not in words and "None" not in words


def test_the_specific_error_under_a_vague_one_is_found() -> None:
    try:
        try:
            try:
                raise ConnectionRefusedError(111, "Connect call failed")
            except OSError as exc:
                raise OSError("All connection attempts failed") from exc
        except OSError as exc:
            raise httpx.ConnectError("All connection attempts failed") from exc
    except httpx.ConnectError as outer:
        assert describe_failure(outer, T) == REFUSED_T


def test_a_vague_error_alone_is_still_worded() -> None:
    vague = _httpx_wrapping(OSError("All connection attempts failed"))
    assert describe_failure(vague, T) == (
        "cannot connect to 127.0.0.1:8765: All connection attempts failed"
    )


REFUSED_T = "connection refused by 127.0.0.1:8765 (is the server running?)"
