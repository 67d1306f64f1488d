"""Sync end to end: real ``tidesync serve`` processes, real client databases and WebSockets."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import ServerProcess

from .conftest import Person, Task
from .flex_helpers import FAST, T

ROOT = Path(__file__).parent.parent


class Item(ts.Model):
    id: str = ts.primary_key()
    text: str = ""
    n: int = 0
    hits: ts.Counter
    tags: list[str]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.kill()


class Device:
    """One app + user + synced database, as a device would have."""

    def __init__(self, root: Path, name: str, url: str, models: list[type[ts.Model]]) -> None:
        self.app = ts.App(
            ts.AppConfiguration("todo", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.models = models
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None
        self.user: ts.User | None = None

    async def open(self) -> ts.Database:
        if self.user is None:
            self.user = await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            self.user, self.models, sync_error_handler=lambda s, e: self.errors.append(e)
        )
        self.db = ts.Database(config)
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.app.close()


@pytest.fixture
async def devices(tmp_path: Path, server: ServerProcess) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str, models: list[type[ts.Model]] | None = None) -> Device:
        d = Device(tmp_path, name, server.url, models or [Item])
        await d.open()
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def snapshot(db: ts.Database) -> dict[str, tuple[Any, ...]]:
    return {i.id: (i.text, i.n, i.hits.value, list(i.tags)) for i in db.all(Item)}


async def settle(*devs: Device, limit: float = 20) -> None:
    for d in devs:
        assert d.db is not None
        await d.db.sync_session.wait_for_upload(T(limit))
    for d in devs:
        assert d.db is not None
        await d.db.sync_session.wait_for_download(T(limit))


async def server_items(server: ServerProcess) -> dict[str, tuple[Any, ...]]:
    """What the server holds (read from its storage after stopping it), as snapshot() shows."""
    from tidesync.server.storage.sqlite import SQLiteStorage

    assert server.stop() == 0
    storage = SQLiteStorage.in_folder(server.data_dir)
    await storage.open()
    try:
        objects = await storage.get_objects("todo", "Item")
    finally:
        await storage.close()
    return {pk: (v["text"], v["n"], v["hits"], list(v["tags"])) for pk, v in objects.items()}


async def test_two_users_converge(devices: Any, server: ServerProcess) -> None:
    a, b = await devices("a"), await devices("b")
    assert a.user.id != b.user.id
    with a.db.write():
        for i in range(20):
            a.db.add(Item(id=f"a{i}", text="from a", n=i))
        a.db.add(Item(id="shared", text="a"))
    with b.db.write():
        for i in range(20):
            b.db.add(Item(id=f"b{i}", text="from b", n=i))
    await settle(a, b)
    await settle(a, b)
    sa, sb = snapshot(a.db), snapshot(b.db)
    assert len(sa) == 41 and sa == sb
    # concurrent edits on the same object and fields
    ia, ib = a.db.find(Item, "shared"), b.db.find(Item, "shared")
    with a.db.write():
        ia.text = "set by a"
        ia.hits.increment(2)
        ia.tags.append("x")
    with b.db.write():
        ib.n = 7
        ib.hits.increment(3)
        ib.tags.append("y")
    await settle(a, b)
    await settle(a, b)
    assert snapshot(a.db) == snapshot(b.db)
    shared = a.db.find(Item, "shared")
    assert shared.text == "set by a" and shared.n == 7 and shared.hits.value == 5
    assert sorted(shared.tags) == ["x", "y"]
    assert not a.errors and not b.errors
    assert await server_items(server) == snapshot(a.db)


async def test_sessions_of_one_user_share_one_websocket(devices: Any, tmp_path: Path) -> None:
    a = await devices("a")
    second = ts.Database(
        ts.Configuration.flexible_sync(a.user, [Item], path=tmp_path / "a" / "second.tidesync")
    )
    try:
        with second.write():
            second.add(Item(id="via-second"))
        await second.sync_session.wait_for_upload(T(10))
        await a.db.sync_session.wait_for_download(T(10))
        assert a.db.find(Item, "via-second") is not None
        client = a.app._sync_client
        assert client is not None and len(client._connections) == 1
        conn = next(iter(client._connections.values()))
        assert len(conn.workers) == 2
    finally:
        second.close()


async def test_session_basics(devices: Any, tmp_path: Path) -> None:
    a = await devices("a")
    s = a.db.sync_session
    assert s is a.db.sync_session
    assert s.user is a.user and Path(s.path) == Path(a.db.path)
    assert Path(a.db.path).is_relative_to(tmp_path / "a")
    await s.wait_for_upload(T(10))  # nothing to upload: returns at once
    await s.wait_for_download(T(10))
    token = ts.CancellationToken()
    token.cancel()
    with pytest.raises(ts.OperationCancelledError):
        await s.wait_for_upload(token)
    with pytest.raises(ts.OperationCancelledError):
        await s.wait_for_download(token)


async def test_offline_writes_upload_when_server_returns(
    devices: Any, server: ServerProcess
) -> None:
    a, b = await devices("a"), await devices("b")
    await settle(a, b)
    assert server.stop() == 0
    with a.db.write():
        for i in range(30):
            a.db.add(Item(id=f"off{i}", n=i))
    with pytest.raises(ts.OperationCancelledError):
        await a.db.sync_session.wait_for_upload(T(0.5))  # offline: waits until cancelled
    with a.db.write():
        a.db.find(Item, "off0").text = "edited offline"
    server.start()
    await settle(a, b, limit=30)
    assert snapshot(a.db) == snapshot(b.db)
    assert len(snapshot(b.db)) == 30 and b.db.find(Item, "off0").text == "edited offline"


async def test_restart_resumes_without_duplicates(devices: Any, tmp_path: Path) -> None:
    a, b = await devices("a"), await devices("b")
    with a.db.write():
        a.db.add(Item(id="x", hits=ts.Counter(0)))
        a.db.find(Item, "x").hits.increment(5)
    await settle(a, b)
    a.db.close()
    # reopen device a: cursors persisted, nothing uploaded twice into the state
    await a.open()
    with a.db.write():
        a.db.find(Item, "x").hits.increment(1)
    await settle(a, b)
    await settle(a, b)
    assert b.db.find(Item, "x").hits.value == 6
    assert a.db.find(Item, "x").hits.value == 6


async def test_kill_9_server_loses_no_acknowledged_write(
    devices: Any, server: ServerProcess
) -> None:
    a, b = await devices("a"), await devices("b")
    acked: list[str] = []

    async def writer() -> None:
        for i in range(200):
            with a.db.write():
                a.db.add(Item(id=f"k{i}", n=i))
            try:
                await a.db.sync_session.wait_for_upload(T(0.2))
                acked.append(f"k{i}")
            except ts.OperationCancelledError:
                pass

    task = asyncio.ensure_future(writer())
    await asyncio.sleep(0.5)
    server.kill()
    await asyncio.sleep(0.3)
    server.start()
    await task
    assert acked, "no write was acknowledged before the kill"
    await settle(a, b, limit=30)
    got = snapshot(b.db)
    assert all(k in got for k in acked)
    assert len(got) == 200


async def test_kill_9_device_after_commit_uploads_on_restart(
    tmp_path: Path, server: ServerProcess, devices: Any
) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import tidesync as ts
        from tests.test_sync_e2e import Item
        async def main():
            app = ts.App(ts.AppConfiguration("todo", base_url={server.url!r},
                         base_path={str(tmp_path / "dev")!r}))
            user = app.current_user or await app.log_in(ts.Credentials.anonymous())
            db = ts.Database(ts.Configuration.flexible_sync(user, [Item]))
            if sys.argv[1] == "write":
                db.sync_session.pause()  # the commit must not get out before the kill
                with db.write():
                    db.add(Item(id="survivor", text="written before kill -9"))
                print("committed", flush=True)
                time.sleep(60)
            else:
                await db.sync_session.wait_for_upload(ts.TimeoutCancellationToken(20))
                print("uploaded", flush=True)
                db.close(); app.close()
        asyncio.run(main())
        """
    )

    def write_then_die() -> str:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, "write"], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        return line

    assert await asyncio.to_thread(write_then_die) == "committed"
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script, "upload"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "uploaded" in out.stdout, out.stderr
    b = await devices("b")
    await b.db.sync_session.wait_for_download(T(20))
    assert b.db.find(Item, "survivor").text == "written before kill -9"


async def test_links_and_every_type_sync(devices: Any) -> None:
    a, b = await devices("a", [Person, Task]), await devices("b", [Person, Task])
    with a.db.write():
        ann = a.db.add(Person(id="ann", name="Ann"))
        t = a.db.add(Task(summary="s", owner=ann, watchers=[ann], labels={"l"}, attrs={"k": 1}))
    await settle(a, b)
    got = b.db.find(Task, t.id)
    assert got is not None and got.owner.name == "Ann" and set(got.labels) == {"l"}
    assert dict(got.attrs.items()) == {"k": 1} and [w.id for w in got.watchers] == ["ann"]
    with b.db.write():
        b.db.delete(b.db.find(Person, "ann"))
    await settle(a, b)
    assert a.db.find(Task, t.id).owner is None


async def test_access_token_refresh_keeps_session(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "srv", extra_args=["--access-token-ttl", "2"]) as srv:
        dev = Device(tmp_path, "d", srv.url, [Item])
        other = Device(tmp_path, "o", srv.url, [Item])
        try:
            await dev.open()
            await other.open()
            states: list[Any] = []
            dev.db.sync_session.add_connection_state_listener(states.append)
            for i in range(4):
                with dev.db.write():
                    dev.db.add(Item(id=f"t{i}"))
                await settle(dev, other)
                await asyncio.sleep(1.2)
            assert len(other.db.all(Item)) == 4
            assert not [s for s in states if s.current is ts.ConnectionState.DISCONNECTED]
            assert not dev.errors
        finally:
            dev.close()
            other.close()


async def test_downloads_are_applied_with_the_collector_paused(
    devices: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DOWNLOAD's many short-lived objects are made and applied with Python's cyclic
    collector paused (a third of a large pull's apply otherwise); it runs again after."""
    from tidesync.store.engine import StoreEngine

    seen: list[bool] = []
    original = StoreEngine.apply

    def spy(self: StoreEngine, instructions: Any) -> None:
        if threading.current_thread().name == "tidesync-sync":
            seen.append(gc.isenabled())
        original(self, instructions)

    monkeypatch.setattr(StoreEngine, "apply", spy)
    assert gc.isenabled()
    a, b = await devices("a"), await devices("b")
    with a.db.write():
        a.db.add(Item(id="x", text="from a"))
    await settle(a, b)
    await settle(a, b)
    assert b.db.find(Item, "x").text == "from a"
    assert seen and not any(seen)
    assert gc.isenabled()
