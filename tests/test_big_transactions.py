"""Big transactions and big objects against a real ``tidesync serve`` process (issue 18.3).

A transaction of any size syncs, split into parts when it does not fit a frame, and other
devices get all of it or none of it; an object over ``max_object_bytes`` is refused in
``db.write()``; a changeset the server refuses is reported and does not hold back the
writes after it; nothing ever reaches stderr from the sync thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.server.storage import SQLiteStorage
from tidesync.testing import FaultProxy, ServerProcess

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken
MiB = 1024 * 1024
BIG_TX = 30_000


class Item(ts.Model):
    id: int = ts.primary_key()
    text: str = ""


class Blob(ts.Model):
    id: str = ts.primary_key()
    data: bytes = b""


class Errors:
    """An error handler that keeps what it is told."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.lock = threading.Lock()

    def __call__(self, session: Any, error: Exception) -> None:
        with self.lock:
            self.errors.append(error)

    def of(self, kind: type[Exception]) -> list[Any]:
        with self.lock:
            return [e for e in self.errors if isinstance(e, kind)]


class Device:
    """One app, user and synced database (no subscriptions: the whole app syncs)."""

    def __init__(self, root: Path, name: str, url: str, **config: Any) -> None:
        self.app = ts.App(
            ts.AppConfiguration("bigtx", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.errors = Errors()
        self.config = config
        self.db: ts.Database | None = None

    async def open(self) -> ts.Database:
        user = await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, [Item, Blob], sync_error_handler=self.errors, **self.config
        )
        self.db = ts.Database(config)
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.app.close()


@pytest.fixture
def no_background_tracebacks(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> Iterator[None]:
    """Fail if the sync thread's loop logged an unhandled exception or a never-retrieved
    future (asyncio's logger), or anything wrote a traceback to stderr."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    asyncio_errors = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not asyncio_errors
    assert "Traceback" not in capfd.readouterr().err


def _items(n: int, start: int = 0, *, random: bool = False) -> list[Item]:
    """``n`` items of ~250 bytes (``random``: text that does not compress much)."""
    return [
        Item(
            id=start + i, text=os.urandom(110).hex() if random else f"{start + i:06d} " + "x" * 220
        )
        for i in range(n)
    ]


def _server_log(data: Path, app: str = "bigtx") -> list[tuple[str, int, int]]:
    async def read() -> list[tuple[str, int, int]]:
        async with SQLiteStorage(data / "server.sqlite3") as storage:
            page = await storage.read_log(app, 0, 1 << 31)
            return [(e.origin, e.client_version, len(e.instructions)) for e in page.entries]

    result: list[tuple[str, int, int]] = _run_in_thread(read)
    return result


def _run_in_thread(make: Any) -> Any:
    """Run ``make()`` on a loop of its own (the test's loop is running)."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(make())))
    thread.start()
    thread.join()
    return out[0]


async def _until(condition: Any, limit: float) -> None:
    """Poll ``condition()`` every 50 ms for up to ``limit`` seconds."""
    for _ in range(int(limit / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


async def _wait_count(db: ts.Database, want: int, seen: list[int], limit: float = 60) -> None:
    """Poll ``db``'s Item count until it is ``want``, recording every count seen."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        count = len(db.all(Item))
        seen.append(count)
        if count == want:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(db.all(Item))} items, wanted {want}")


@pytest.mark.parametrize("subscribed", [False, True], ids=["whole-app", "subscribed"])
async def test_one_write_of_30000_objects_syncs_whole(
    tmp_path: Path, no_background_tracebacks: None, subscribed: bool
) -> None:
    # a 1 MiB frame limit: the ~7.5 MB changeset goes up and comes down in parts
    server = ServerProcess(tmp_path / "server", extra_args=["--max-frame-size", str(MiB)]).start()
    a, b = Device(tmp_path, "a", server.url), Device(tmp_path, "b", server.url)
    try:
        db_a, db_b = await a.open(), await b.open()
        if subscribed:  # flexible sync: both devices subscribe to every Item
            for db in (db_a, db_b):
                with db.subscriptions.update() as subs:
                    subs.add(db.all(Item))
                await db.subscriptions.wait_for_synchronization(T(30))
        inserts: list[int] = []
        token = db_b.all(Item).add_listener(lambda change: inserts.append(len(change.inserted)))
        with db_a.write():
            for item in _items(BIG_TX):
                db_a.add(item)
        await db_a.sync_session.wait_for_upload(T(120))
        seen: list[int] = []
        await _wait_count(db_b, BIG_TX, seen)
        await db_b.sync_session.wait_for_download(T(60))
        assert set(seen) <= {0, BIG_TX}  # never part of it
        await _until(lambda: sum(inserts) >= BIG_TX, 10)
        token.cancel()
        assert [n for n in inserts if n] == [BIG_TX]  # one commit brought all of it
        assert not a.errors.errors and not b.errors.errors
        # a later small write still syncs, in order
        with db_a.write():
            db_a.add(Item(id=-1, text="after"))
        await db_a.sync_session.wait_for_upload(T(30))
        await _wait_count(db_b, BIG_TX + 1, [])
    finally:
        a.close()
        b.close()
        server.stop()
    entries = _server_log(tmp_path / "server")
    big = [e for e in entries if e[2] > 7 * MiB]
    assert len(big) == 1  # one server version holds the whole transaction


async def test_an_object_over_the_limit_is_refused_in_write(
    tmp_path: Path, no_background_tracebacks: None
) -> None:
    server = ServerProcess(tmp_path / "server").start()
    a, b = Device(tmp_path, "a", server.url), Device(tmp_path, "b", server.url)
    try:
        db_a, db_b = await a.open(), await b.open()
        with db_a.write():
            db_a.add(Blob(id="small", data=b"s"))
        await db_a.sync_session.wait_for_upload(T(30))
        huge = os.urandom(20 * MiB)
        with pytest.raises(ts.ObjectTooLargeError) as info:
            with db_a.write():
                db_a.add(Item(id=1, text="kept?"))
                db_a.add(Blob(id="huge", data=huge))
        err = info.value
        assert (err.model, err.pk, err.limit) == ("Blob", "huge", 16 * MiB)
        assert err.size > 20 * MiB
        assert "Blob 'huge'" in str(err) and "max_object_bytes" in str(err)
        assert db_a.find(Blob, "huge") is None and db_a.find(Item, 1) is None  # nothing
        await db_a.sync_session.wait_for_upload(T(10))  # nothing new to upload
        # an object within the limit syncs
        ten = os.urandom(10 * MiB)
        with db_a.write():
            db_a.add(Blob(id="ten", data=ten))
        await db_a.sync_session.wait_for_upload(T(60))
        await _until(lambda: db_b.find(Blob, "ten") is not None, 60)
        got = db_b.find(Blob, "ten")
        assert got is not None and got.data == ten
        assert not a.errors.errors and not b.errors.errors
        assert db_a.sync_session.state is ts.SessionState.ACTIVE
    finally:
        a.close()
        b.close()
        server.stop()


def test_the_object_limit_is_configurable(tmp_path: Path) -> None:
    config = ts.Configuration.local([Blob], tmp_path / "x.tidesync", max_object_bytes=1000)
    with ts.Database(config) as db:
        with pytest.raises(ts.ObjectTooLargeError, match="more than the limit of 1000"):
            with db.write():
                db.add(Blob(id="a", data=b"x" * 2000))
        with db.write():
            db.add(Blob(id="b", data=b"x" * 500))
            db.add(Blob(id="c", data=b"x" * 500))  # the limit is per object
        assert db.find(Blob, "a") is None and len(db.all(Blob)) == 2
    with pytest.raises(ValueError, match="max_object_bytes"):
        ts.Configuration.local([Blob], max_object_bytes=0)


async def test_a_refused_changeset_is_reported_and_later_writes_sync(
    tmp_path: Path, no_background_tracebacks: None
) -> None:
    config = tmp_path / "server.toml"
    config.write_text("[server]\ndevelopment_mode = true\n[limits]\nmax_changeset_bytes = 100000\n")
    server = ServerProcess(tmp_path / "server", extra_args=["--config", str(config)]).start()
    a, b = Device(tmp_path, "a", server.url), Device(tmp_path, "b", server.url)
    try:
        db_a, db_b = await a.open(), await b.open()
        with db_a.write():
            for item in _items(1000):  # ~250 KB: over the server's limit
                db_a.add(item)
        await db_a.sync_session.wait_for_upload(T(30))  # settled: refused, not stuck
        with db_a.write():
            db_a.add(Item(id=5000, text="after"))
        await db_a.sync_session.wait_for_upload(T(30))
        await _wait_count(db_b, 1, [], limit=30)
        assert db_b.find(Item, 5000) is not None and db_b.find(Item, 0) is None
        [refused] = a.errors.of(ts.ChangesetRefusedError)
        assert refused.code == 232 and refused.action is ts.SyncAction.RETRY
        [(version, reason, objects)] = refused.refused
        assert version == 1
        assert "max_changeset_bytes" in reason and "100000" in reason
        assert objects == [("Item", i) for i in range(1000)]
        assert db_a.sync_session.state is ts.SessionState.ACTIVE
        # reopening does not bring the refused changeset back
        db_a.close()
        db_a = await a.open()
        with db_a.write():
            db_a.add(Item(id=5001, text="after reopening"))
        await db_a.sync_session.wait_for_upload(T(30))
        await _wait_count(db_b, 2, [], limit=30)
        assert len(a.errors.of(ts.ChangesetRefusedError)) == 1
    finally:
        a.close()
        b.close()
        server.stop()


async def test_a_disconnect_in_the_middle_of_a_split_upload(
    tmp_path: Path, no_background_tracebacks: None
) -> None:
    server = ServerProcess(tmp_path / "server", extra_args=["--max-frame-size", str(MiB)]).start()
    try:
        async with FaultProxy("127.0.0.1", server.port, seed=3) as proxy:
            a, b = Device(tmp_path, "a", proxy.url), Device(tmp_path, "b", server.url)
            try:
                db_a, db_b = await a.open(), await b.open()
                await db_a.sync_session.wait_for_download(T(30))
                proxy.throttle(1_000_000)
                start = proxy.stats.bytes_upstream
                with db_a.write():
                    for item in _items(BIG_TX, random=True):
                        db_a.add(item)
                deadline = time.monotonic() + 30
                while proxy.stats.bytes_upstream - start < MiB:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                assert len(db_b.all(Item)) == 0  # the server has parts, not the changeset
                proxy.disconnect()  # mid-way: the server drops the parts it holds
                proxy.throttle(None)
                await db_a.sync_session.wait_for_upload(T(120))
                seen: list[int] = []
                await _wait_count(db_b, BIG_TX, seen)
                assert set(seen) <= {0, BIG_TX}
                assert proxy.stats.disconnects == 1 and proxy.stats.connections >= 2
            finally:
                a.close()
                b.close()
    finally:
        server.stop()
    entries = _server_log(tmp_path / "server")
    ids = [(origin, version) for origin, version, _ in entries]
    assert len(ids) == len(set(ids))  # each transaction once
    assert len([e for e in entries if e[2] > 7 * MiB]) == 1


async def test_waits_on_a_stopped_session_give_the_true_reason(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    a = Device(tmp_path, "a", server.url)
    try:
        db_a = await a.open()
        await db_a.sync_session.wait_for_download(T(30))

        class Item(ts.Model):  # the same model name with another field type
            id: int = ts.primary_key()
            text: int = 0

        other = ts.App(
            ts.AppConfiguration(
                "bigtx", base_url=server.url, base_path=tmp_path / "c", sync_timeouts=FAST
            )
        )
        try:
            errors = Errors()
            user = await other.log_in(ts.Credentials.anonymous())
            db_c = ts.Database(
                ts.Configuration.flexible_sync(user, [Item], sync_error_handler=errors)
            )
            try:
                deadline = time.monotonic() + 30
                while db_c.sync_session.state is ts.SessionState.ACTIVE:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                with pytest.raises(ts.SessionInactiveError) as info:
                    await db_c.sync_session.wait_for_upload(T(5))
                assert "paused" not in str(info.value)
                assert "the server stopped this session" in str(info.value)
                assert errors.errors  # and the handler was told why
            finally:
                db_c.close()
        finally:
            other.close()
        db_a.sync_session.pause()  # a paused session says so
        with pytest.raises(ts.SessionInactiveError, match="the session was paused"):
            await db_a.sync_session.wait_for_download(T(5))
    finally:
        a.close()
        server.stop()
