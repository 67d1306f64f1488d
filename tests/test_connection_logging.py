"""Connection failures in words and logged once per outage, against a real server process
that is killed and started again (docs/sync-session.md, "Logging")."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer
from tidesync.testing import ServerProcess

from .flex_helpers import FAST
from .test_security_tls import make_certs
from .test_session_state import CS, Item, device, server, wait_connected, wait_until

__all__ = ["device", "server"]  # fixtures used here

REFUSED = "connection refused by 127.0.0.1:{port} (is the server running?)"


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "tidesync.sync"
        and "sync connection to" in r.getMessage()
        and " failed: " in r.getMessage()
    ]


def retried(errors: list[tuple[Any, Any]]) -> list[ts.SyncError]:
    return [e for _, e in errors if isinstance(e, ts.SyncError) and e.action is ts.SyncAction.RETRY]


async def test_outages_are_worded_and_logged_once_at_info_with_a_handler(
    device: Any, server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tidesync")
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    changes: list[ts.ConnectionStateChange] = []
    s.add_connection_state_listener(changes.append)
    for outage in (1, 2):
        caplog.clear()
        d.errors.clear()
        server.kill()
        await wait_until(lambda: len(retried(d.errors)) >= 4, 20, "four failed attempts")
        with db.write():
            db.add(Item(id=f"offline-{outage}"))
        server.start()
        await wait_connected(s, 20)
        await s.wait_for_upload(ts.TimeoutCancellationToken(10))

        messages = [e.message for e in retried(d.errors)]
        assert REFUSED.format(port=server.port) in messages
        assert all("Error(" not in m and "None" not in m for m in messages), messages
        lines = failure_lines(caplog)
        assert len(lines) == len(messages) >= 4  # one line per failed attempt
        levels = [r.levelno for r in lines]
        assert levels == [logging.INFO] + [logging.DEBUG] * (len(lines) - 1), (outage, levels)
        assert all(REFUSED.format(port=server.port) in r.getMessage() for r in lines[1:])
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], outage
        back = [r for r in caplog.records if "is up again after" in r.getMessage()]
        assert len(back) == 1 and back[0].levelno == logging.INFO
        drops = [c for c in changes if c.current is ts.ConnectionState.DISCONNECTED]
        assert [c.reason for c in drops if c.reason] == messages  # each failure, same words
        assert drops[-1].reason == REFUSED.format(port=server.port)
        assert all(c.reason is None for c in changes if c.current is not CS.DISCONNECTED)
        changes.clear()


async def test_without_a_handler_the_first_failure_is_a_warning(
    tmp_path: Path, server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tidesync")
    app = ts.App(
        ts.AppConfiguration(
            "todo", base_url=server.url, base_path=tmp_path / "c", sync_timeouts=FAST
        )
    )
    try:
        user = await app.log_in(ts.Credentials.anonymous())
        db = await asyncio.to_thread(ts.Database, ts.Configuration.flexible_sync(user, [Item]))
        try:
            await wait_connected(db.sync_session)
            caplog.clear()
            server.kill()
            await wait_until(lambda: len(failure_lines(caplog)) >= 3, 20, "three failures")
            lines = failure_lines(caplog)
            assert lines[0].levelno == logging.WARNING
            assert [r.levelno for r in lines[1:]] == [logging.DEBUG] * (len(lines) - 1)
            assert REFUSED.format(port=server.port) in lines[-1].getMessage()
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert warnings == lines[:1]  # no second line per session ("sync error on ...")
        finally:
            await asyncio.to_thread(db.close)
    finally:
        await asyncio.to_thread(app.close)


async def test_a_login_to_a_port_with_nothing_listening_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = ts.App(
        ts.AppConfiguration("todo", base_url=f"http://127.0.0.1:{port}", base_path=tmp_path / "c")
    )
    try:
        with pytest.raises(ts.AuthError) as info:
            await app.log_in(ts.Credentials.anonymous())
        assert str(info.value) == "logging in failed: " + REFUSED.format(port=port)
    finally:
        app.close()


async def test_a_certificate_that_does_not_verify_is_named_for_login_and_sync(
    tmp_path: Path,
) -> None:
    chain, key, bundle = make_certs(tmp_path)
    config = ServerConfig(tls_cert=str(chain), tls_key=str(key))
    untrusted = "the TLS certificate of 127.0.0.1 could not be verified (unable to get local "
    async with InProcessServer(tmp_path / "data", config=config) as srv:

        def config(ca_bundle: Path | None) -> ts.AppConfiguration:
            return ts.AppConfiguration(
                "todo", srv.url, tmp_path / "c", sync_timeouts=FAST, ca_bundle=ca_bundle
            )

        trusting = ts.App(config(bundle))
        await trusting.log_in(ts.Credentials.anonymous())  # the user is kept in base_path
        trusting.close()
        app = ts.App(config(None))
        try:
            with pytest.raises(ts.AuthError) as info:
                await app.log_in(ts.Credentials.anonymous())
            assert str(info.value).startswith("logging in failed: " + untrusted)
            user = app.current_user
            assert user is not None
            errors: list[Exception] = []
            db = await asyncio.to_thread(
                ts.Database,
                ts.Configuration.flexible_sync(
                    user, [Item], sync_error_handler=lambda s, e: errors.append(e)
                ),
            )
            try:
                await wait_until(lambda: bool(errors), 15, "a reported TLS failure")
                error = errors[0]
                assert isinstance(error, ts.SyncError)
                assert error.message.startswith(untrusted), error.message
                assert "AppConfiguration(ca_bundle=...)" in error.message
            finally:
                await asyncio.to_thread(db.close)
        finally:
            await asyncio.to_thread(app.close)
