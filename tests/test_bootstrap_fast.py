"""The fast paths of a flexible-sync bootstrap: queries that match every object
(``is_always_true``, ``matches_everything``), the SQLite storage reading them without
decoding or evaluating values (``PackedStoredObject``), the bootstrap loop pausing the
collector, and the zlib level frames are compressed at."""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import tidesync as ts
from tidesync.core import query as q
from tidesync.core.changeset import Instruction, Op
from tidesync.core.packing import pack, unpack
from tidesync.protocol import messages as m
from tidesync.protocol.codec import (
    COMPRESSED_MARKER,
    COMPRESSION_LEVEL,
    decode_frame,
    encode_frame,
    encode_message,
)
from tidesync.server import flexsync
from tidesync.server.config import ServerConfig
from tidesync.server.rules import Permissions, user_fields
from tidesync.server.storage.base import (
    MatchPage,
    PackedStoredObject,
    ServerStorage,
    StoredObject,
    matches_everything,
    object_matches,
)
from tidesync.server.storage.conformance import ALL_MODELS, TASK, Writer, batch
from tidesync.server.storage.sqlite import SQLiteStorage
from tidesync.testing import TestServer

APP = "fast"


def bound(text: str) -> q.BoundQuery:
    return q.bind(q.parse(text), TASK, {TASK.name: TASK}, [])


# -- core.query.is_always_true ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("TRUEPREDICATE", True),
        ("(TRUEPREDICATE)", True),
        ("NOT FALSEPREDICATE", True),
        ("NOT NOT TRUEPREDICATE", True),
        ("TRUEPREDICATE AND TRUEPREDICATE", True),
        ("votes > 1 OR TRUEPREDICATE", True),
        ("NOT (votes > 1 AND FALSEPREDICATE)", True),
        ("FALSEPREDICATE", False),
        ("NOT TRUEPREDICATE", False),
        ("votes > 1 AND TRUEPREDICATE", False),
        ("NOT (votes > 1 OR TRUEPREDICATE)", False),
        ("FALSEPREDICATE OR FALSEPREDICATE", False),
        ("done == false OR done == true", False),  # true on every object, not by its shape
        ("title == 't'", False),
    ],
)
def test_is_always_true(text: str, expected: bool) -> None:
    b = bound(text)
    assert q.is_always_true(b) is expected
    if expected:  # then evaluate agrees on any object, even one missing every field
        for values in ({}, {"id": "x", "title": None, "done": True, "votes": 5}):
            assert q.evaluate(b, values, lambda model, pk: None)


def test_matches_everything() -> None:
    true, narrow = bound("TRUEPREDICATE"), bound("votes > 1")
    assert matches_everything(None, None)
    assert matches_everything([true], None)
    assert matches_everything([narrow, true], None)  # one query matching all is enough
    assert matches_everything(None, true)
    assert not matches_everything([], None)  # no query: no object
    assert not matches_everything([narrow], None)
    assert not matches_everything(None, narrow)  # a read rule filters
    assert not matches_everything([true], narrow)


# -- PackedStoredObject ---------------------------------------------------------------------


def test_packed_stored_object_reads_and_compares_like_a_stored_object() -> None:
    values = {"id": "x", "title": "one", "done": False, "votes": 2}
    plain = StoredObject(pack("x"), b"state", values)
    lazy = PackedStoredObject(pack("x"), b"state", pack(values))
    assert "values" not in vars(lazy)  # nothing unpacked yet
    assert lazy == plain and plain == lazy and not lazy != plain
    assert "values" in vars(lazy)  # comparing read them, once
    assert lazy.values == values and lazy.values is lazy.values
    assert isinstance(lazy, StoredObject) and lazy.pk == pack("x") and lazy.state == b"state"
    assert repr(lazy) == repr(plain).replace("StoredObject(", "PackedStoredObject(", 1)
    other = PackedStoredObject(pack("x"), b"state", pack({**values, "votes": 3}))
    assert other != plain and other != lazy
    assert lazy != "x"
    with pytest.raises(AttributeError):
        lazy.nothing  # noqa: B018
    with pytest.raises(TypeError):  # like a StoredObject holding a dict
        hash(lazy)
    with pytest.raises(AttributeError):  # still frozen
        lazy.pk = b""  # type: ignore[misc]


# -- SQLiteStorage.read_matching --------------------------------------------------------------


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    st = SQLiteStorage(tmp_path / "server.sqlite3")
    await st.open()
    await st.put_schemas(APP, ALL_MODELS)
    await st.register_client(APP, "A", "user-A")
    w = Writer("A")
    pks = [f"t{i:02d}" for i in range(20)] + ["", "é", "a\x00"]
    await st.integrate(
        [batch(APP, w.cs(*(w.create(p, title=p * 3, votes=i) for i, p in enumerate(pks))))]
    )
    await st.integrate([batch(APP, w.cs(w.erase("t03"), w.erase("t19")))])
    try:
        yield st
    finally:
        await st.close()


async def pages(
    read: Any, queries: list[q.BoundQuery] | None, rule: q.BoundQuery | None, limit: int
) -> list[MatchPage]:
    out: list[MatchPage] = []
    after: bytes | None = None
    for _ in range(100):
        page = await read(APP, "Task", queries, rule, after, limit)
        out.append(page)
        if page.done or page.cursor is None or page.cursor == after:
            return out
        after = page.cursor
    raise AssertionError("paging did not end")


def same(a: list[MatchPage], b: list[MatchPage]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.cursor, x.scanned_bytes, x.done) == (y.cursor, y.scanned_bytes, y.done)
        assert [o.pk for o in x.objects] == [o.pk for o in y.objects]
        assert [o.state for o in x.objects] == [o.state for o in y.objects]
        assert [o.values for o in x.objects] == [o.values for o in y.objects]


@pytest.mark.parametrize("limit", [1, 3, 7, 21, 22, 500])
@pytest.mark.parametrize(
    "queries", [None, ["TRUEPREDICATE"], ["votes > 100", "NOT FALSEPREDICATE"]]
)
async def test_sqlite_read_matching_everything_pages_like_the_default(
    storage: SQLiteStorage, limit: int, queries: list[str] | None
) -> None:
    subs = None if queries is None else [bound(t) for t in queries]
    fast = await pages(storage.read_matching, subs, None, limit)
    slow = await pages(lambda *a: ServerStorage.read_matching(storage, *a), subs, None, limit)
    objects = [o for p in fast for o in p.objects]
    # nothing was decoded: a bootstrap of everything only reads the states
    assert objects and all(isinstance(o, PackedStoredObject) for o in objects)
    assert not any("values" in vars(o) for o in objects)
    same(fast, slow)
    assert len(objects) == 21 and [o.pk for o in objects] == sorted(o.pk for o in objects)
    assert {unpack(o.pk) for o in objects} == {o.values["id"] for o in objects if o.values}
    assert sum(p.scanned_bytes for p in fast) == (await storage.objects_size(APP, "Task"))[1]


@pytest.mark.parametrize(
    ("queries", "rule"),
    [
        (["votes > 4"], None),
        (["TRUEPREDICATE"], "votes < 10"),
        (["votes > 4", "title == 't01t01t01'"], None),
        ([], None),
    ],
)
async def test_sqlite_read_matching_still_filters(
    storage: SQLiteStorage, queries: list[str], rule: str | None
) -> None:
    subs = [bound(t) for t in queries]
    r = bound(rule) if rule is not None else None
    fast = await pages(storage.read_matching, subs, r, 4)
    slow = await pages(lambda *a: ServerStorage.read_matching(storage, *a), subs, r, 4)
    same(fast, slow)
    assert not any(isinstance(o, PackedStoredObject) for p in fast for o in p.objects)
    got = [o.pk for p in fast for o in p.objects]
    alive = await storage.read_objects(APP, "Task", None, 100)
    expected = [o.pk for o in alive if o.values and object_matches(subs, r, o.values)]
    assert got == expected
    assert len(expected) < len(alive) and (expected or not subs)


async def test_sqlite_read_matching_an_empty_model(storage: SQLiteStorage) -> None:
    page = await storage.read_matching(APP, "NoteI", None, None, None, 10)
    assert page == MatchPage([], None, 0, True)
    page = await storage.read_matching(APP, "NoteI", None, None, b"\x01", 10)
    assert page == MatchPage([], b"\x01", 0, True)


async def test_postgres_read_matching_everything_leaves_values_packed() -> None:
    dsn = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
    if not dsn:
        pytest.skip("TIDESYNC_TEST_PG_DSN is not set")
    from tidesync.server.storage.postgres import PostgresStorage

    st = PostgresStorage(dsn, schema="ts_test_" + uuid.uuid4().hex[:12])
    await st.open()
    try:
        await st.put_schemas(APP, ALL_MODELS)
        await st.register_client(APP, "A", "user-A")
        w = Writer("A")
        await st.integrate(
            [batch(APP, w.cs(*(w.create(f"p{i}", votes=i) for i in range(9)), w.erase("p4")))]
        )
        for subs in (None, [bound("TRUEPREDICATE")]):
            fast = await pages(st.read_matching, subs, None, 3)
            slow = await pages(lambda *a: ServerStorage.read_matching(st, *a), subs, None, 3)
            objects = [o for p in fast for o in p.objects]
            assert len(objects) == 8 and all(isinstance(o, PackedStoredObject) for o in objects)
            assert not any("values" in vars(o) for o in objects)
            assert [o.pk for o in objects] == [o.pk for p in slow for o in p.objects]
            assert [o.values for o in objects] == [o.values for p in slow for o in p.objects]
        narrow = await pages(st.read_matching, [bound("votes > 5")], None, 3)
        assert not any(isinstance(o, PackedStoredObject) for p in narrow for o in p.objects)
        assert sorted(unpack(o.pk) for p in narrow for o in p.objects) == ["p6", "p7", "p8"]
    finally:
        await st.drop_schema()
        await st.close()


# -- the bootstrap loop ---------------------------------------------------------------------


class _Proto:
    def __init__(self) -> None:
        self.downloads: list[m.Download] = []

    def download(self, session: int, changesets: Any, *args: Any) -> None:
        self.downloads.append(m.Download(session, list(changesets), *args))


def _fake(storage: SQLiteStorage, sendable: int, page_bytes: int) -> tuple[Any, Any, Any]:
    """A connection that can send ``sendable`` bootstrap pages, its session and view."""
    calls = {"n": 0, "flushes": 0}

    def can_send(session: Any) -> bool:
        calls["n"] += 1
        return calls["n"] <= sendable

    async def flush() -> None:
        assert gc.isenabled()  # never awaits with the collector paused
        calls["flushes"] += 1

    hub = SimpleNamespace(storage=storage, config=SimpleNamespace(page_bytes=page_bytes))
    conn = SimpleNamespace(
        hub=hub, app_id=APP, proto=_Proto(), sendable=can_send, flush=flush, calls=calls
    )
    session = SimpleNamespace(
        number=1,
        file_ident="B",
        cursor=0,
        latest=0,
        acked=0,
        sent_acked=0,
        query_version=1,
        sent_query_version=0,
        first_sent=False,
    )
    schemas = {s.name: s for s in ALL_MODELS}
    view = flexsync.FlexView(Permissions(None, user_fields("u"), schemas), schemas, None)
    view.subs = flexsync.bind_subscriptions(1, {"Task": ["TRUEPREDICATE"]}, {}, schemas)
    view.bootstrap = 1
    return conn, session, view


async def test_bootstrap_pages_are_queued_then_flushed_with_the_collector_running(
    storage: SQLiteStorage,
) -> None:
    conn, session, view = _fake(storage, sendable=3, page_bytes=200)
    assert gc.isenabled()
    await flexsync._bootstrap(conn, session, view)  # stops: the session went away
    assert gc.isenabled()
    sent = conn.proto.downloads
    assert len(sent) == 3  # the fourth check found the session gone
    assert all(d.bootstrap == m.BOOTSTRAP_PAGE for d in sent)
    assert conn.calls["flushes"] == 0  # nothing more is flushed once the bootstrap stopped
    remaining = [d.downloadable_bytes for d in sent]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] > 0


async def test_bootstrap_pages_hold_every_object_once(storage: SQLiteStorage) -> None:
    # one storage batch (BOOTSTRAP_BATCH objects) becomes several pages, flushed together
    conn, session, view = _fake(storage, sendable=1_000, page_bytes=300)
    await flexsync._bootstrap(conn, session, view)
    assert gc.isenabled()
    sent = conn.proto.downloads
    assert len(sent) > 3 and 0 < conn.calls["flushes"] < len(sent)
    assert [d.bootstrap for d in sent] == [m.BOOTSTRAP_PAGE] * (len(sent) - 1) + [m.BOOTSTRAP_LAST]
    got = [(o.model, o.pk) for d in sent for o in d.objects]
    rows = await storage.read_objects(APP, "Task", None, 100)
    assert sorted(got, key=lambda k: pack(k[1])) == [("Task", unpack(r.pk)) for r in rows]
    states = {(o.model, o.pk): o.state for d in sent for o in d.objects}
    assert states == {("Task", unpack(r.pk)): r.state for r in rows}
    remaining = [d.downloadable_bytes for d in sent]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 0
    assert view.held == {("Task", r.pk) for r in rows}


async def test_bootstrap_sends_new_objects_as_rows_and_the_others_whole(
    tmp_path: Path,
) -> None:
    """Objects a lone CREATE made go as row blocks (the states they stand for are the
    stored ones, byte for byte); an object written since goes whole; each exactly once."""
    st = SQLiteStorage(tmp_path / "rows.sqlite3")
    await st.open()
    try:
        await st.put_schemas(APP, ALL_MODELS)
        await st.register_client(APP, "A", "user-A")
        w = Writer("A")
        creates = [
            Instruction(Op.CREATE, "NoteI", i, w.hlc(), value={"id": i, "text": f"n{i}"})
            for i in range(40)
        ]
        await st.integrate([batch(APP, w.cs(*creates))])
        later = Instruction(Op.SET, "NoteI", 7, w.hlc(), field="text", value="changed")
        await st.integrate([batch(APP, w.cs(later))])
        conn, session, view = _fake(st, sendable=1_000, page_bytes=300)
        view.subs = flexsync.bind_subscriptions(1, {"NoteI": ["TRUEPREDICATE"]}, {}, view.schemas)
        await flexsync._bootstrap(conn, session, view)
        sent = conn.proto.downloads
        assert len(sent) >= 3 and sent[-1].bootstrap == m.BOOTSTRAP_LAST
        whole = [(o.model, o.pk) for d in sent for o in d.objects]
        assert whole == [("NoteI", 7)]
        blocks = [b for d in sent for b in d.rows]
        assert {b.model for b in blocks} == {"NoteI"}
        assert all(b.fields == ["id", "text"] and b.pk == 0 for b in blocks)
        updates = [u for b in blocks for u in b.updates()]
        assert sorted(u.pk for u in updates) == [i for i in range(40) if i != 7]
        stored = await st.read_objects(APP, "NoteI", None, 100)
        by_pk = {unpack(r.pk): r.state for r in stored}
        assert {u.pk: u.state for u in updates} == {k: v for k, v in by_pk.items() if k != 7}
        assert [b.size for b in blocks] == [sum(len(by_pk[r[1]]) for r in b.rows) for b in blocks]
        remaining = [d.downloadable_bytes for d in sent]
        assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 0
        assert view.held == {("NoteI", r.pk) for r in stored}
    finally:
        await st.close()


def test_lone_parts_of_a_stored_object() -> None:
    """``lone_parts`` gives the create's packed HLC and the values of a compact state, the
    same whether the backend gave the HLC apart or not, and None for any other state."""
    from tidesync.core.merge import LONE_HEAD

    values = {"id": 1, "text": "x"}
    head, vals = LONE_HEAD + pack([5, 0, "o"]), pack(values)
    lazy = PackedStoredObject(pack(1), head + vals, vals, pack([5, 0, "o"]))
    unsplit = PackedStoredObject(pack(1), head + vals, vals)
    plain = StoredObject(pack(1), head + vals, values)
    assert lazy.lone_parts() == plain.lone_parts() == (pack([5, 0, "o"]), values)
    assert unsplit.lone_parts() == plain.lone_parts()
    full = pack([1, [5, 0, "o"], None, [5, 0, "o"], values, {}])
    assert StoredObject(pack(1), full, values).lone_parts() is None
    assert PackedStoredObject(pack(1), full, vals).lone_parts() is None
    assert StoredObject(pack(1), LONE_HEAD + b"\xc1", values).lone_parts() is None
    assert StoredObject(pack(1), LONE_HEAD + pack(1) + pack([1]), values).lone_parts() is None


# -- end to end -------------------------------------------------------------------------------


class Item(ts.Model):
    id: int = ts.primary_key()
    title: str = ""
    n: int = 0


@pytest.fixture
def small_pages(tmp_path: Path) -> Iterator[TestServer]:
    with TestServer(tmp_path / "server", config=ServerConfig(download_page_bytes=8192)) as s:
        yield s


async def open_db(tmp_path: Path, name: str, url: str) -> tuple[ts.App, ts.Database]:
    app = ts.App(ts.AppConfiguration("fast", base_url=url, base_path=tmp_path / name))
    user = await app.log_in(ts.Credentials.anonymous())
    return app, ts.Database(ts.Configuration.flexible_sync(user, [Item]))


async def test_bootstrap_of_everything_end_to_end(tmp_path: Path, small_pages: TestServer) -> None:
    apps: list[ts.App] = []
    dbs: list[ts.Database] = []
    try:
        app, a = await open_db(tmp_path, "a", small_pages.url)
        apps.append(app)
        dbs.append(a)
        with a.write():
            for i in range(4500):
                a.add(Item(id=i, title=f"item {i}", n=i % 7))
        await a.sync_session.wait_for_upload(ts.TimeoutCancellationToken(60))
        app, b = await open_db(tmp_path, "b", small_pages.url)
        apps.append(app)
        dbs.append(b)
        with b.subscriptions.update() as subs:
            subs.add(b.all(Item), name="all")
        await b.subscriptions.wait_for_synchronization(ts.TimeoutCancellationToken(60))
        assert len(b.all(Item)) == 4500
        assert {(x.id, x.title, x.n) for x in b.all(Item)} == {
            (i, f"item {i}", i % 7) for i in range(4500)
        }
        with b.subscriptions.update() as subs:  # a narrower set is still filtered
            subs.clear()
            subs.add(b.query(Item, "n == 3"), name="three")
        await b.subscriptions.wait_for_synchronization(ts.TimeoutCancellationToken(60))
        await asyncio.sleep(0)
        assert {x.id for x in b.all(Item)} == {i for i in range(4500) if i % 7 == 3}
        assert gc.isenabled()
    finally:
        for db in dbs:
            db.close()
        for app in apps:
            app.close()


# -- compression --------------------------------------------------------------------------------


def _page() -> m.Download:
    objects = [
        m.ObjectUpdate("Task", i, pack({"id": i, "title": f"task number {i}", "done": i % 3 == 0}))
        for i in range(2000)
    ]
    return m.Download(1, [], 5, 10, 1234, 0, 1, objects, m.BOOTSTRAP_PAGE)


def test_frames_are_compressed_at_the_fast_level() -> None:
    msg = _page()
    body = encode_message(msg)
    frame = encode_frame(msg, compress=True)
    assert frame[0] == COMPRESSED_MARKER
    assert frame[1:] == zlib.compress(body, COMPRESSION_LEVEL)
    assert COMPRESSION_LEVEL == 1
    assert len(frame) < len(body) // 3
    assert decode_frame(frame) == msg


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_any_zlib_level_decodes(level: int) -> None:
    # the wire format is a zlib stream whatever the level: older peers' frames still decode
    msg = _page()
    frame = bytes([COMPRESSED_MARKER]) + zlib.compress(encode_message(msg), level)
    assert decode_frame(frame) == msg
