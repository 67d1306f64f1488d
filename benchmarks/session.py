"""Session: how fast a session comes back after an outage, and how fast a stalled (silent)
connection is detected, against a real ``tidesync serve`` process and a stalling TCP proxy.

Scaling: the ping/pong detection with Realm-like defaults (ping every 60 s, pong timeout
120 s) would take minutes per run, so it runs with both values divided by ``SCALE`` (40);
multiply the measured figure by ``SCALE`` for the real defaults. The urgent-ping detection
(``app.reconnect()`` on a stalled connection) runs with its real default, 5 s.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import tidesync as ts
from tidesync.testing import FaultProxy, ServerProcess

from .harness import Context

GROUP = "session"
SCALE = 40
LIMIT = 60.0


class _Item(ts.Model):
    id: str = ts.primary_key()
    n: int = 0


async def _until(check: object, limit: float = LIMIT) -> float:
    start = time.perf_counter()
    while not check():  # type: ignore[operator]
        if time.perf_counter() - start > limit:
            raise RuntimeError("the benchmark's condition was not reached in time")
        await asyncio.sleep(0.005)
    return time.perf_counter() - start


async def _open(root: Path, url: str, timeouts: ts.SyncTimeoutOptions) -> ts.Database:
    app = ts.App(ts.AppConfiguration("bench", base_url=url, base_path=root, sync_timeouts=timeouts))
    user = await app.log_in(ts.Credentials.anonymous())
    db = await ts.Database.open(ts.Configuration.flexible_sync(user, [_Item]))
    return db


def _close(db: ts.Database) -> None:
    app = db.sync_session.user.app
    db.close()
    app.close()


def _outage(ctx: Context, run: int, outage: float) -> float:
    """Server down for ``outage`` s (the backoff grows meanwhile); it comes back, the app
    calls ``reconnect()``: seconds from the server accepting again to CONNECTED."""
    root = ctx.workdir / f"session-outage-{run}"
    shutil.rmtree(root, ignore_errors=True)
    server = ServerProcess(root / "server").start()

    async def go() -> float:
        db = await _open(root / "dev", server.url, ts.SyncTimeoutOptions())
        s = db.sync_session
        try:
            await _until(lambda: s.connection_state is ts.ConnectionState.CONNECTED)
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(outage)
            await asyncio.to_thread(server.start)
            start = time.perf_counter()
            s.user.app.reconnect()
            await _until(lambda: s.connection_state is ts.ConnectionState.CONNECTED)
            return time.perf_counter() - start
        finally:
            await asyncio.to_thread(_close, db)

    try:
        return asyncio.run(go())
    finally:
        server.kill()


def _stall(ctx: Context, run: int, timeouts: ts.SyncTimeoutOptions, urgent: bool) -> float:
    """Seconds from the proxy stalling the connection to the session seeing DISCONNECTED."""
    root = ctx.workdir / f"session-stall-{run}"
    shutil.rmtree(root, ignore_errors=True)
    server = ServerProcess(root / "server").start()
    proxy = FaultProxy("127.0.0.1", server.port)
    proxy.start_in_thread()

    async def go() -> float:
        db = await _open(root / "dev", proxy.url, timeouts)
        s = db.sync_session
        try:
            await _until(lambda: s.connection_state is ts.ConnectionState.CONNECTED)
            proxy.stall()
            start = time.perf_counter()
            if urgent:
                s.user.app.reconnect()
            await _until(lambda: s.connection_state is not ts.ConnectionState.CONNECTED, 600)
            return time.perf_counter() - start
        finally:
            proxy.restore()
            await asyncio.to_thread(_close, db)

    try:
        return asyncio.run(go())
    finally:
        proxy.stop_thread()
        server.kill()


def run(ctx: Context) -> None:
    """Record the session measurements."""
    outage = 10.0 if ctx.quick else 20.0
    ctx.measure(
        GROUP,
        f"back to CONNECTED after a {outage:.0f} s outage, app.reconnect() called",
        lambda i: _outage(ctx, i, outage),
        note="default backoff (1 s x2 up to 300 s); without reconnect() the client would "
        f"wait out its current backoff delay (about {outage / 2:.0f}-{outage:.0f} s here)",
    )
    scaled = ts.SyncTimeoutOptions(
        ping_keep_alive_period=60 / SCALE, pong_keep_alive_timeout=120 / SCALE
    )
    ctx.measure(
        GROUP,
        f"stall detected by ping/pong, defaults / {SCALE} (ping 1.5 s, pong 3 s)",
        lambda i: _stall(ctx, i, scaled, urgent=False),
        note=f"multiply by {SCALE} for the real defaults (ping 60 s, pong timeout 120 s)",
    )
    small = ts.SyncTimeoutOptions(ping_keep_alive_period=0.25, pong_keep_alive_timeout=0.5)
    ctx.measure(
        GROUP,
        "stall detected by ping/pong, small timeouts (ping 0.25 s, pong 0.5 s)",
        lambda i: _stall(ctx, i, small, urgent=False),
    )
    ctx.measure(
        GROUP,
        "stall detected after app.reconnect() (urgent ping, default 5 s deadline)",
        lambda i: _stall(ctx, i, ts.SyncTimeoutOptions(), urgent=True),
        note="Realm waits out the 2-minute pong timeout instead",
    )
