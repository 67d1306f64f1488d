"""Reconnect, backoff and timeouts, with real server restarts and a stalling TCP proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import FaultProxy, ServerProcess

from .test_session_state import CS, Changes, Item, T, device, server, wait_connected, wait_until

__all__ = ["device", "server"]  # fixtures used here


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", server.port)
    p.start_in_thread()
    try:
        yield p
    finally:
        p.stop_thread()


def opts(**kw: Any) -> ts.SyncTimeoutOptions:
    base: dict[str, Any] = dict(
        connect_timeout=5,
        reconnect_initial_delay=0.1,
        reconnect_max_delay=0.5,
        ping_keep_alive_period=2,
        pong_keep_alive_timeout=4,
        connection_linger_time=1,
    )
    base.update(kw)
    return ts.SyncTimeoutOptions(**base)


def attempt_gaps(changes: Changes) -> list[float]:
    """Seconds between each DISCONNECTED and the next CONNECTING."""
    gaps, down = [], None
    for at, c in list(changes.items):
        if c.current is CS.DISCONNECTED:
            down = at
        elif c.current is CS.CONNECTING and down is not None:
            gaps.append(at - down)
            down = None
    return gaps


async def test_restart_reconnects_with_growing_backoff_then_resets(
    device: Any, server: ServerProcess
) -> None:
    d = device("a", timeouts=opts(reconnect_initial_delay=0.2, reconnect_max_delay=0.8))
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    c = Changes(s)
    server.kill()
    with db.write():
        db.add(Item(id="offline"))
    await wait_until(lambda: len(attempt_gaps(c)) >= 5, 20, "five attempts")
    gaps = attempt_gaps(c)[:5]
    nominal = [0.2, 0.4, 0.8, 0.8, 0.8]  # x2 up to the maximum, each minus 0-25 %
    for gap, delay in zip(gaps, nominal):
        assert 0.75 * delay * 0.9 <= gap <= delay + 1.5, (gaps, nominal)
    assert gaps[2] > gaps[0]
    assert all(e.action is ts.SyncAction.RETRY for _, e in d.errors)  # reported, retried
    server.start()
    await wait_connected(s, 20)
    await s.wait_for_upload(T(10))  # the pending upload resumed
    pairs = c.pairs()
    assert pairs[0] == (CS.CONNECTED, CS.DISCONNECTED) and pairs[-1] == (
        CS.CONNECTING,
        CS.CONNECTED,
    )
    # the connection worked: the next outage starts again from the initial delay
    await asyncio.sleep(1.5)
    c.clear()
    server.kill()
    await wait_until(lambda: len(attempt_gaps(c)) >= 1, 10, "first attempt")
    assert attempt_gaps(c)[0] <= 0.2 + 1.0
    server.start()
    await wait_connected(s, 20)


async def test_server_prescribed_delay(device: Any, server: ServerProcess) -> None:
    d = device("a", timeouts=opts(reconnect_initial_delay=0.05, reconnect_max_delay=5))
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    c = Changes(s)
    server.stop()  # GOING_AWAY with a 1 s retry delay
    await wait_until(lambda: len(attempt_gaps(c)) >= 1, 10, "an attempt")
    assert 115 in {e.code for _, e in d.errors}
    assert attempt_gaps(c)[0] >= 0.9  # not the 0.05 s backoff
    server.start()
    await wait_connected(s, 20)


async def test_app_reconnect_after_long_outage(device: Any, server: ServerProcess) -> None:
    d = device("a", timeouts=opts(reconnect_initial_delay=60, reconnect_max_delay=60))
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    server.kill()
    await wait_until(lambda: s.connection_state is CS.DISCONNECTED, 10, "DISCONNECTED")
    await asyncio.sleep(0.3)  # now in a 45-60 s backoff wait
    server.start()
    started = time.monotonic()
    d.app.reconnect()
    await wait_connected(s, 10)
    assert time.monotonic() - started < 10


async def test_stall_detected_by_pong_timeout(device: Any, proxy: FaultProxy) -> None:
    d = device(
        "a", url=proxy.url, timeouts=opts(ping_keep_alive_period=0.5, pong_keep_alive_timeout=1.5)
    )
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    c = Changes(s)
    proxy.stall()
    took = await wait_until(lambda: (CS.CONNECTED, CS.DISCONNECTED) in c.pairs(), 10, "detection")
    assert took >= 1.0  # not before the pong timeout
    assert any("ping" in e.message for _, e in d.errors)
    proxy.restore()
    await wait_connected(s, 15)


async def test_app_reconnect_probes_a_stalled_connection(device: Any, proxy: FaultProxy) -> None:
    d = device(
        "a",
        url=proxy.url,
        timeouts=opts(
            ping_keep_alive_period=60,
            pong_keep_alive_timeout=120,
            reconnect_urgent_ping_timeout=1,
            connect_timeout=2,
        ),
    )
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    # a healthy connection answers the urgent ping: nothing happens
    c = Changes(s)
    d.app.reconnect()
    await asyncio.sleep(1.5)
    assert c.pairs() == []
    proxy.stall()
    await asyncio.sleep(0.2)
    started = time.monotonic()
    d.app.reconnect()
    await wait_until(lambda: (CS.CONNECTED, CS.DISCONNECTED) in c.pairs(), 8, "detection")
    assert time.monotonic() - started < 5  # far below the 120 s pong timeout
    proxy.restore()
    await wait_connected(s, 15)
    with db.write():
        db.add(Item(id="after-stall"))
    await s.wait_for_upload(T(10))


async def test_connect_timeout(device: Any, proxy: FaultProxy) -> None:
    proxy.stall()  # TCP accepts, the WebSocket handshake never answers
    d = device("a", url=proxy.url, timeouts=opts(connect_timeout=1, reconnect_initial_delay=5))
    d.user = await _login_direct(d, proxy)
    db = await asyncio.to_thread(ts.Database, d.config())
    d.dbs.append(db)
    c = Changes(db.sync_session)
    started = time.monotonic()
    await wait_until(lambda: (CS.CONNECTING, CS.DISCONNECTED) in c.pairs(), 10, "timeout")
    took = time.monotonic() - started
    assert 0.5 <= took <= 6
    proxy.restore()
    d.app.reconnect()
    await wait_connected(db.sync_session, 15)


async def _login_direct(d: Any, proxy: FaultProxy) -> ts.User:
    proxy.restore()
    try:
        return await d.app.log_in(ts.Credentials.anonymous())  # type: ignore[no-any-return]
    finally:
        proxy.stall()


async def test_linger_and_fast_reconnect_limit(device: Any, proxy: FaultProxy) -> None:
    d = device(
        "a", url=proxy.url, timeouts=opts(connection_linger_time=1.5, fast_reconnect_limit=1)
    )
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    conn = d.app._sync_client._connections[d.user.id]
    worker = s._worker
    # linger: the socket stays open after its last session leaves, then closes
    s.pause()
    ws = conn.ws
    await asyncio.sleep(0.5)
    assert conn.ws is ws is not None and proxy.open_connections == 1
    await wait_until(lambda: conn.ws is None, 10, "linger expiry")
    took = await wait_until(lambda: proxy.open_connections == 0, 5, "socket closed")
    assert took < 5
    s.resume()
    await wait_connected(s)
    # a quick reconnect (within fast_reconnect_limit) uploads at once
    held = worker.held_upload_count
    proxy.disconnect()
    await wait_until(lambda: s.connection_state is not CS.CONNECTED, 10, "drop")
    await wait_connected(s, 10)
    assert worker.held_upload_count == held
    # a slow one first catches up with the download, then uploads
    proxy.cut()
    with db.write():
        db.add(Item(id="late"))
    await asyncio.sleep(1.5)
    proxy.restore()
    d.app.reconnect()
    await wait_connected(s, 10)
    await s.wait_for_upload(T(10))
    assert worker.held_upload_count == held + 1
    assert not worker.hold_uploads
