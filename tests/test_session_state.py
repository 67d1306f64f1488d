"""Session state, pause/resume, waits and errors against a real ``tidesync serve`` process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import ServerProcess

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken
CS = ts.ConnectionState


class Item(ts.Model):
    id: str = ts.primary_key()
    text: str = ""
    n: int = 0


class Changes:
    """Records a session's connection state changes (with the time they came)."""

    def __init__(self, session: ts.Session) -> None:
        self.items: list[tuple[float, ts.ConnectionStateChange]] = []
        self._lock = threading.Lock()
        self.token = session.add_connection_state_listener(self._add)

    def _add(self, change: ts.ConnectionStateChange) -> None:
        with self._lock:
            self.items.append((time.monotonic(), change))

    def pairs(self) -> list[tuple[ts.ConnectionState, ts.ConnectionState]]:
        with self._lock:
            return [(c.previous, c.current) for _, c in self.items]

    def clear(self) -> None:
        with self._lock:
            self.items.clear()


async def wait_until(check: Any, limit: float = 15.0, what: str = "condition") -> float:
    """Poll ``check()`` until true; returns the time it took (bounded by ``limit``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError(f"{what} not reached within {limit} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def wait_connected(session: ts.Session, limit: float = 15.0) -> float:
    return await wait_until(lambda: session.connection_state is CS.CONNECTED, limit, "CONNECTED")


class Device:
    """An app, a user and synced databases, as one device has them."""

    def __init__(
        self,
        root: Path,
        name: str,
        url: str,
        timeouts: ts.SyncTimeoutOptions = FAST,
        models: list[type[ts.Model]] | None = None,
    ) -> None:
        self.root = root / name
        self.app = ts.App(
            ts.AppConfiguration("todo", base_url=url, base_path=self.root, sync_timeouts=timeouts)
        )
        self.models = models or [Item]
        self.errors: list[tuple[Any, Any]] = []
        self.user: ts.User | None = None
        self.dbs: list[ts.Database] = []

    def config(self, path: str | None = None) -> ts.Configuration:
        assert self.user is not None
        return ts.Configuration.flexible_sync(
            self.user,
            self.models,
            path=str(self.root / path) if path else None,
            sync_error_handler=lambda s, e: self.errors.append((s, e)),
        )

    async def open(self, path: str | None = None) -> ts.Database:
        if self.user is None:
            self.user = await self.app.log_in(ts.Credentials.anonymous())
        db = await asyncio.to_thread(ts.Database, self.config(path))
        self.dbs.append(db)
        return db

    def close(self) -> None:
        for db in self.dbs:
            db.close()
        self.app.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
async def device(tmp_path: Path, server: ServerProcess) -> AsyncIterator[Any]:
    made: list[Device] = []

    def make(name: str, url: str | None = None, **kw: Any) -> Device:
        d = Device(tmp_path, name, url or server.url, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        await asyncio.to_thread(d.close)


async def test_state_and_close(device: Any) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    assert s.state is ts.SessionState.ACTIVE
    await wait_connected(s)
    db.close()
    with pytest.raises(ts.TidesyncError):
        _ = s.state
    with pytest.raises(ts.TidesyncError):
        _ = s.connection_state
    with pytest.raises(ts.TidesyncError):
        await s.wait_for_upload()


async def test_pause_resume_exact_changes_and_other_session_untouched(device: Any) -> None:
    d = device("a")
    db1 = await d.open("one.tidesync")
    db2 = await d.open("two.tidesync")
    s1, s2 = db1.sync_session, db2.sync_session
    await wait_connected(s1)
    await wait_connected(s2)
    c1, c2 = Changes(s1), Changes(s2)

    s1.pause()
    assert s1.state is ts.SessionState.INACTIVE
    assert s1.connection_state is CS.DISCONNECTED
    assert c1.pairs() == [(CS.CONNECTED, CS.DISCONNECTED)]
    s1.pause()  # no-op
    assert c1.pairs() == [(CS.CONNECTED, CS.DISCONNECTED)]

    # writes while paused are kept; the other session of the same connection goes on
    with db1.write():
        db1.add(Item(id="p1", text="written while paused"))
    with db2.write():
        db2.add(Item(id="p2"))
    await s2.wait_for_upload(T(10))
    assert s2.state is ts.SessionState.ACTIVE and s2.connection_state is CS.CONNECTED
    assert c2.pairs() == []

    c1.clear()
    s1.resume()
    assert s1.state is ts.SessionState.ACTIVE
    await wait_connected(s1)
    s1.resume()  # no-op
    await s1.wait_for_upload(T(10))  # what was written meanwhile goes up
    await asyncio.sleep(0.2)
    assert c1.pairs() == [(CS.DISCONNECTED, CS.CONNECTING), (CS.CONNECTING, CS.CONNECTED)]
    assert c2.pairs() == []
    assert not d.errors

    # the other device sees both
    e = device("e")
    dbe = await e.open()
    await dbe.sync_session.wait_for_download(T(10))
    assert {i.id for i in dbe.all(Item)} == {"p1", "p2"}


async def test_resume_after_linger_reconnects_at_once(device: Any) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    s.pause()
    conn = d.app._sync_client._connections[d.user.id]
    assert conn.ws is not None  # lingers (connection_linger_time=1)
    await wait_until(lambda: conn.ws is None, 10, "linger expiry")
    c = Changes(s)
    took = time.monotonic()
    s.resume()
    await wait_connected(s)
    took = time.monotonic() - took
    assert c.pairs() == [(CS.DISCONNECTED, CS.CONNECTING), (CS.CONNECTING, CS.CONNECTED)]
    assert took < 5


async def test_waits_fail_while_paused(device: Any, server: ServerProcess) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    server.kill()  # offline: waits wait
    await wait_until(lambda: s.connection_state is not CS.CONNECTED, 10, "offline")
    with db.write():
        db.add(Item(id="x"))
    up = asyncio.ensure_future(s.wait_for_upload())
    down = asyncio.ensure_future(s.wait_for_download())
    await asyncio.sleep(0.3)
    assert not up.done() and not down.done()
    s.pause()  # pending waits fail
    for fut in (up, down):
        with pytest.raises(ts.SessionInactiveError):
            await asyncio.wait_for(fut, 5)
    started = time.monotonic()
    with pytest.raises(ts.SessionInactiveError):  # while paused: at once
        await s.wait_for_upload()
    with pytest.raises(ts.SessionInactiveError):
        await s.wait_for_download(T(30))
    assert time.monotonic() - started < 2
    # offline and active: a deadline cancels
    s.resume()
    with pytest.raises(ts.OperationCancelledError):
        await s.wait_for_upload(T(0.3))
    server.start()
    await s.wait_for_upload(T(20))


async def test_fatal_error_stops_session_and_is_reported(device: Any) -> None:
    a = device("a")
    dba = await a.open()
    with dba.write():
        dba.add(Item(id="x"))
    await dba.sync_session.wait_for_upload(T(10))

    # a model of the same name whose field has another type: the server refuses the schema
    b = device("b", models=[_item_with_int_text()])
    dbb = await b.open()
    s = dbb.sync_session
    await wait_until(lambda: bool(b.errors), 10, "an error report")
    session, error = b.errors[0]
    assert session is s
    assert isinstance(error, ts.SyncError)
    assert error.code == 225 and error.action is ts.SyncAction.STOP and error.message
    await wait_until(lambda: s.state is ts.SessionState.INACTIVE, 5, "INACTIVE")
    assert s.connection_state is CS.DISCONNECTED
    with pytest.raises(ts.SessionInactiveError):
        await s.wait_for_download()
    # the first device is not affected
    assert dba.sync_session.state is ts.SessionState.ACTIVE
    assert not a.errors


def _item_with_int_text() -> type[ts.Model]:
    namespace: dict[str, Any] = {}
    exec(
        "import tidesync as ts\n"
        "class Item(ts.Model):\n"
        "    id: str = ts.primary_key()\n"
        "    text: int = 0\n",
        namespace,
    )
    return namespace["Item"]  # type: ignore[no-any-return]


async def test_transient_errors_reported_and_retried(device: Any, server: ServerProcess) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    server.stop()  # graceful: the server says GOING_AWAY (115), retry
    await wait_until(lambda: bool(d.errors), 10, "an error report")
    codes = {e.code for _, e in d.errors}
    assert 115 in codes
    assert all(e.action is ts.SyncAction.RETRY for _, e in d.errors)
    assert all(sess is s for sess, _ in d.errors)
    assert s.state is ts.SessionState.ACTIVE
    server.start()
    await wait_connected(s, 20)
    with db.write():
        db.add(Item(id="after"))
    await s.wait_for_upload(T(10))


async def test_pause_then_resume_at_once_rebinds_after_unbound(tmp_path: Path) -> None:
    """Found by the soak: resume() before the server confirmed the pause's UNBIND must not
    try to bind the same file twice on the connection."""
    with ServerProcess(tmp_path / "srv") as srv:
        app = ts.App(ts.AppConfiguration("todo", base_url=srv.url, base_path=tmp_path / "a"))
        other = ts.App(ts.AppConfiguration("todo", base_url=srv.url, base_path=tmp_path / "b"))
        try:
            user = await app.log_in(ts.Credentials.anonymous())
            db = ts.Database(ts.Configuration.flexible_sync(user, [Item]))
            keep = ts.Database(
                ts.Configuration.flexible_sync(user, [Item], path=tmp_path / "a" / "keep.db")
            )  # keeps the connection open across the pause
            s = db.sync_session
            await s.wait_for_download(ts.TimeoutCancellationToken(10))
            for i in range(20):
                s.pause()
                s.resume()  # no waiting in between
                with db.write():
                    db.add(Item(id=f"r{i}"))
            await s.wait_for_upload(ts.TimeoutCancellationToken(20))
            assert s.connection_state is ts.ConnectionState.CONNECTED
            ouser = await other.log_in(ts.Credentials.anonymous())
            odb = ts.Database(ts.Configuration.flexible_sync(ouser, [Item]))
            await odb.sync_session.wait_for_download(ts.TimeoutCancellationToken(20))
            assert len(odb.all(Item)) == 20
            odb.close()
            keep.close()
            db.close()
        finally:
            app.close()
            other.close()


async def test_a_session_resumed_as_the_linger_expires_keeps_the_connection(
    device: Any,
) -> None:
    # the linger timer fired and its drop is queued when the session comes back: the
    # drop must neither cut the connection the session now uses nor report an error
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    client = d.app._sync_client
    conn = client._connections[d.user.id]
    worker = s._worker
    s.pause()
    ws = conn.ws
    assert ws is not None and conn._linger is not None

    def expire_then_resume() -> None:
        conn._linger.cancel()
        conn._linger_expired()  # spawns the drop; it runs after this callback
        worker.activate()

    client.call(expire_then_resume)
    with db.write():
        db.add(Item(id="after-resume"))
    await s.wait_for_upload(T(10))
    assert conn.ws is ws  # the same connection
    assert d.errors == []
