"""A flexible-sync session that reconnects with a set whose bootstrap it applied is not
bootstrapped again by the process that sent it; the log from its cursor brings it up to date
(objects changed, moved into and out of view, deleted meanwhile). Another process (or this
one after forgetting) bootstraps as before (server/flexsync.py ``on_query``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import tidesync as ts
from tidesync.testing import TestServer

from .flex_helpers import FlexDevice, eventually


class Card(ts.Model):
    id: str = ts.primary_key()
    n: int = 0
    text: str = ""


class Device(FlexDevice):
    def __init__(self, root: Path, name: str, url: str) -> None:
        super().__init__(root, name, url, "resume", [Card])

    async def open(self, query: str | None) -> ts.Database:  # type: ignore[override]
        return await super().open({"q": (Card, query)} if query is not None else {})

    def cards(self) -> dict[str, tuple[int, str]]:
        return self.read(Card, lambda c: (c.n, c.text))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestServer]:
    with TestServer(tmp_path / "server") as s:
        yield s


@pytest.fixture
async def pair(tmp_path: Path, server: TestServer) -> AsyncIterator[tuple[Device, Device]]:
    writer, reader = Device(tmp_path, "w", server.url), Device(tmp_path, "r", server.url)
    yield writer, reader
    for d in (writer, reader):
        d.shutdown()


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
        gone = db.find(Card, "c15")
        assert gone is not None
        db.delete(gone)  # deleted
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
    pair: tuple[Device, Device], server: TestServer
) -> None:
    writer, reader = pair
    wdb = await writer.open("TRUEPREDICATE")
    _seed(wdb)
    await writer.settle()
    rdb = await reader.open("n >= 10")
    rdb.sync_session.pause()
    server.server.hub.bootstraps.clear()  # as if the device reconnected to another process
    reader.pages.clear()
    _change_while_away(wdb)
    await writer.settle()
    rdb.sync_session.resume()
    await eventually(lambda: reader.cards() == _expected(writer))
    await eventually(lambda: 2 in reader.pages)  # bootstrapped again
    assert not reader.errors
