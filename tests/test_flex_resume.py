"""A flexible-sync session that reconnects with a set whose bootstrap it applied is not
bootstrapped again by the process that sent it; the log from its cursor brings it up to date
(objects changed, moved into and out of view, deleted meanwhile). Another process (or this
one after forgetting) bootstraps as before (server/flexsync.py ``on_query``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.protocol.messages import BOOTSTRAP_NONE
from tidesync.server import flexsync
from tidesync.testing import TestServer

FAST = ts.SyncTimeoutOptions(
    connect_timeout=5,
    reconnect_initial_delay=0.1,
    reconnect_max_delay=0.5,
    ping_keep_alive_period=2,
    pong_keep_alive_timeout=4,
    connection_linger_time=1,
)
T = ts.TimeoutCancellationToken


class Card(ts.Model):
    id: str = ts.primary_key()
    n: int = 0
    text: str = ""


class Device:
    def __init__(self, root: Path, name: str, url: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration("resume", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None
        self.pages: list[int] = []  # bootstrap flags of the DOWNLOADs received

    async def open(self, query: str | None) -> ts.Database:
        user = self.app.current_user or await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, [Card], sync_error_handler=lambda s, e: self.errors.append(e)
        )
        db = self.db = ts.Database(config)
        worker = db.sync_session._worker
        original = worker.on_download

        def record(ev: Any) -> None:
            if ev.bootstrap != BOOTSTRAP_NONE:
                self.pages.append(ev.bootstrap)
            original(ev)

        worker.on_download = record
        if query is not None:
            with db.subscriptions.update() as subs:
                subs.add(db.query(Card, query), name="q", update=True)
        await db.subscriptions.wait_for_synchronization(T(20))
        return db

    async def settle(self) -> None:
        assert self.db is not None
        await self.db.sync_session.wait_for_upload(T(20))
        await self.db.sync_session.wait_for_download(T(20))

    def cards(self) -> dict[str, tuple[int, str]]:
        assert self.db is not None
        for _ in range(50):  # the sync thread may drop an object while it is being read
            try:
                return {c.id: (c.n, c.text) for c in self.db.all(Card)}
            except ts.ObjectDeletedError:
                continue
        raise AssertionError("the objects kept changing while being read")


async def eventually(check: Callable[[], bool], limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestServer]:
    with TestServer(tmp_path / "server") as s:
        yield s


@pytest.fixture
async def pair(tmp_path: Path, server: TestServer) -> AsyncIterator[tuple[Device, Device]]:
    writer, reader = Device(tmp_path, "w", server.url), Device(tmp_path, "r", server.url)
    yield writer, reader
    for d in (writer, reader):
        if d.db is not None:
            d.db.close()
        d.app.close()


def _seed(db: ts.Database) -> None:
    with db.write():
        for i in range(20):
            db.add(Card(id=f"c{i}", n=i, text="seed"))


def _change_while_away(db: ts.Database) -> None:
    """Every kind of change a view can see: edit, move out, move in, delete, create."""
    with db.write():
        db.add(Card(id="c12", n=12, text="edited"), update=True)  # stays in view
        db.add(Card(id="c11", n=1, text="left"), update=True)  # leaves the view
        db.add(Card(id="c3", n=30, text="joined"), update=True)  # enters the view
        db.delete(db.find(Card, "c15"))  # deleted
        db.add(Card(id="new-in", n=99, text="new"))
        db.add(Card(id="new-out", n=0, text="new"))


def _expected(writer: Device) -> dict[str, tuple[int, str]]:
    return {k: v for k, v in writer.cards().items() if v[0] >= 10}


async def test_resume_skips_the_bootstrap_and_catches_up(pair: tuple[Device, Device]) -> None:
    writer, reader = pair
    wdb = await writer.open("TRUEPREDICATE")
    _seed(wdb)
    await writer.settle()
    rdb = await reader.open("n >= 10")
    assert reader.pages and reader.pages[-1] == 2  # the first bootstrap, ending with LAST
    assert reader.cards() == _expected(writer)
    rdb.sync_session.pause()
    reader.pages.clear()
    _change_while_away(wdb)
    await writer.settle()
    rdb.sync_session.resume()
    await eventually(lambda: reader.cards() == _expected(writer))
    await reader.settle()
    assert reader.cards() == _expected(writer)
    assert reader.pages == []  # no bootstrap page: the log caught the device up
    # and it keeps following the view afterwards
    with wdb.write():
        wdb.add(Card(id="c12", n=5, text="gone"), update=True)
        wdb.add(Card(id="c1", n=50, text="back"), update=True)
    await writer.settle()
    await eventually(lambda: reader.cards() == _expected(writer))
    assert reader.pages == [] and not reader.errors and not writer.errors


async def test_reopening_the_database_skips_the_bootstrap(pair: tuple[Device, Device]) -> None:
    writer, reader = pair
    wdb = await writer.open("TRUEPREDICATE")
    _seed(wdb)
    await writer.settle()
    await reader.open("n >= 10")
    assert reader.db is not None
    reader.db.close()
    reader.pages.clear()
    _change_while_away(wdb)
    await writer.settle()
    await reader.open(None)  # the same set, from the file
    await eventually(lambda: reader.cards() == _expected(writer))
    await reader.settle()
    assert reader.cards() == _expected(writer)
    assert reader.pages == []
    assert not reader.errors


async def test_a_process_that_did_not_send_it_bootstraps_again(
    pair: tuple[Device, Device],
) -> None:
    writer, reader = pair
    wdb = await writer.open("TRUEPREDICATE")
    _seed(wdb)
    await writer.settle()
    rdb = await reader.open("n >= 10")
    rdb.sync_session.pause()
    flexsync._BOOTSTRAPS.clear()  # as if the device reconnected to another server process
    reader.pages.clear()
    _change_while_away(wdb)
    await writer.settle()
    rdb.sync_session.resume()
    await eventually(lambda: reader.cards() == _expected(writer))
    await eventually(lambda: 2 in reader.pages)  # bootstrapped again
    assert not reader.errors
