"""Rolling an app back: an older release opens a file written by a newer one.

The newer release has a field (and a model) the older one lacks. The older release opens
the file, reads and writes it, syncs; the extra columns are kept untouched and kept up to
date by downloads, and the newer release, reopening the file, sees their values. Real
SQLite files, a real ``tidesync serve`` process, real WebSockets.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import ServerProcess

from .flex_helpers import FAST, T


def new_release() -> tuple[type[ts.Model], type[ts.Model]]:
    """Release 2: ``Note`` gains ``tag`` and ``marks``; a new model ``Label``."""

    class Note(ts.Model):
        id: str = ts.primary_key()
        title: str = ""
        tag: str | None = None
        marks: list[str]
        hits: ts.Counter

    class Label(ts.Model):
        id: str = ts.primary_key()
        name: str = ""

    return Note, Label


def old_release() -> type[ts.Model]:
    """Release 1: ``Note`` without the fields release 2 added, and no ``Label``."""

    class Note(ts.Model):
        id: str = ts.primary_key()
        title: str = ""

    return Note


def local(models: list[type[ts.Model]], path: Path) -> ts.Database:
    return ts.Database(ts.Configuration.local(models, path=path))


# -- local files -----------------------------------------------------------------------------


def test_local_round_trip_keeps_the_newer_fields(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    Note2, Label2 = new_release()
    with local([Note2, Label2], path) as db, db.write():
        db.add(Note2(id="n1", title="first", tag="red", marks=["a", "b"], hits=3))
        db.add(Label2(id="l1", name="home"))

    Note1 = old_release()
    with local([Note1], path) as db:  # the rollback: this used to raise SchemaMismatchError
        n1 = db.find(Note1, "n1")
        assert n1 is not None and n1.title == "first"
        with db.write():
            n1.title = "edited by release 1"
            db.add(Note1(id="n2", title="made by release 1"))
            db.add(Note1(id="n1", title="upserted by release 1"), update=True)
        assert [n.id for n in db.all(Note1)] == ["n1", "n2"]
        assert len(db.query(Note1, "title BEGINSWITH $0", "made")) == 1

    with local([Note2, Label2], path) as db:
        n1, n2 = db.find(Note2, "n1"), db.find(Note2, "n2")
        assert n1 is not None and n2 is not None
        assert (n1.title, n1.tag, list(n1.marks), n1.hits.value) == (
            "upserted by release 1",
            "red",
            ["a", "b"],
            3,
        )
        assert (n2.title, n2.tag, list(n2.marks), n2.hits.value) == (
            "made by release 1",
            None,
            [],
            0,
        )
        assert db.find(Label2, "l1").name == "home"  # type: ignore[union-attr]
        with db.write():  # the merge states release 1 wrote still carry every field
            n1.tag = "blue"
            n1.marks.append("c")
            n1.hits.increment(1)
            n2.tag = "new"
    with local([Note2, Label2], path) as db:
        n1 = db.find(Note2, "n1")
        assert n1 is not None and (n1.tag, list(n1.marks), n1.hits.value) == (
            "blue",
            ["a", "b", "c"],
            4,
        )
        assert db.find(Note2, "n2").tag == "new"  # type: ignore[union-attr]


def test_the_file_keeps_the_full_schema_after_the_older_release(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    Note2, Label2 = new_release()
    local([Note2, Label2], path).close()
    local([old_release()], path).close()
    conn = sqlite3.connect(path)
    try:
        stored = {
            m: json.loads(d) for m, d in conn.execute("SELECT model, definition FROM _schema")
        }
        columns = [r[1] for r in conn.execute('PRAGMA table_info("t_Note")')]
    finally:
        conn.close()
    assert set(stored) == {"Note", "Label"}
    assert [f["name"] for f in stored["Note"]["fields"]] == ["id", "title", "tag", "marks", "hits"]
    assert {"tag", "marks", "hits"} <= set(columns)


def test_a_required_field_cannot_be_left_out(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"

    class Part(ts.Model):
        id: int = ts.primary_key()
        code: str

    with local([Part], path) as db, db.write():
        db.add(Part(id=1, code="x"))
    before = path.read_bytes()

    class Part(ts.Model):  # type: ignore[no-redef]
        id: int = ts.primary_key()

    with pytest.raises(ts.SchemaMismatchError, match=r"Part: field 'code' \(str\) is in the file"):
        local([Part], path)
    assert path.read_bytes() == before


# -- synced ----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.kill()


class Device:
    """An app with its own user; opens its file with one release's models or another's."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration("notes", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None

    async def open(self, models: list[type[ts.Model]], subscribe: bool = True) -> ts.Database:
        user = self.app.current_user or await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, models, sync_error_handler=lambda s, e: self.errors.append(e)
        )
        db = self.db = await ts.Database.open(config)
        if subscribe:
            with db.subscriptions.update() as subs:
                for model in models:
                    subs.add(db.all(model), name=model.__name__, update=True)
        await db.subscriptions.wait_for_synchronization(T(20))
        return db

    async def settle(self) -> None:
        assert self.db is not None
        await self.db.sync_session.wait_for_upload(T(20))
        await self.db.sync_session.wait_for_download(T(20))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


@pytest.fixture
def devices(tmp_path: Path, server: ServerProcess) -> Iterator[Any]:
    made: list[Device] = []

    def make(name: str) -> Device:
        d = Device(tmp_path, name, server.url)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
        d.app.close()


async def test_an_older_release_syncs_beside_a_newer_one(devices: Any) -> None:
    Note2, Label2 = new_release()
    Note1 = old_release()
    new_a, old_b, new_c = devices("a"), devices("b"), devices("c")

    a = await new_a.open([Note2, Label2])
    with a.write():
        a.add(Note2(id="n1", title="from a", tag="red", marks=["m"]))
        a.add(Label2(id="l1", name="home"))
    await new_a.settle()

    b = await old_b.open([Note1])  # a fresh file of the older release
    n1 = b.find(Note1, "n1")
    assert n1 is not None and n1.title == "from a"
    with a.write():  # a change to the field release 1 lacks, downloaded by b
        a.find(Note2, "n1").tag = "blue"  # type: ignore[union-attr]
    await new_a.settle()
    await old_b.settle()
    with b.write():  # b keeps syncing the fields it has
        n1.title = "edited by b"
        b.add(Note1(id="n2", title="made by b"))
    await old_b.settle()
    assert old_b.errors == [] and b.sync_session.state is ts.SessionState.ACTIVE
    assert "Note.tag" in json.loads(b._engine.get_meta("skipped"))  # noted, not applied

    c = await new_c.open([Note2, Label2])  # release 2 on a second device
    seen = c.find(Note2, "n1")
    assert seen is not None and (seen.title, seen.tag, list(seen.marks)) == (
        "edited by b",
        "blue",
        ["m"],
    )
    n2 = c.find(Note2, "n2")
    assert n2 is not None and (n2.title, n2.tag) == ("made by b", None)
    assert c.find(Label2, "l1").name == "home"  # type: ignore[union-attr]
    await new_a.settle()
    assert a.find(Note2, "n1").title == "edited by b"  # type: ignore[union-attr]
    with a.write():  # a field release 1 never sees, on an object b has
        a.add(Note2(id="n3", title="made by a", tag="gold", marks=["g"]))
    await new_a.settle()
    await old_b.settle()
    assert new_a.errors == [] and new_c.errors == [] and old_b.errors == []

    old_b.close()  # b's file, which never had the field, moves to release 2
    b = await old_b.open([Note2, Label2], subscribe=False)  # the same subscription set
    await old_b.settle()
    got = {n.id: (n.title, n.tag, list(n.marks)) for n in b.all(Note2)}
    assert got == {
        "n1": ("edited by b", "blue", ["m"]),
        "n2": ("made by b", None, []),
        "n3": ("made by a", "gold", ["g"]),
    }
    assert b.find(Label2, "l1") is None  # b's subscriptions never asked for labels
    assert old_b.errors == []


async def test_a_rolled_back_file_keeps_downloading_the_newer_fields(devices: Any) -> None:
    Note2, Label2 = new_release()
    Note1 = old_release()
    dev_a, new_c = devices("a"), devices("c")

    a = await dev_a.open([Note2, Label2])
    with a.write():
        a.add(Note2(id="n1", title="first", tag="red"))
        a.add(Label2(id="l1", name="home"))
    await dev_a.settle()
    dev_a.close()

    a = await dev_a.open([Note1], subscribe=False)  # the rollback: release 1 on a's file
    c = await new_c.open([Note2, Label2])
    with c.write():  # release 2 elsewhere changes what release 1 does not have
        note = c.find(Note2, "n1")
        assert note is not None
        note.tag = "green"
        note.marks.append("x")
        c.find(Label2, "l1").name = "renamed"  # type: ignore[union-attr]
        c.add(Label2(id="l2", name="new"))
    await new_c.settle()
    await dev_a.settle()
    with a.write():
        a.find(Note1, "n1").title = "release 1 was here"  # type: ignore[union-attr]
        a.add(Note1(id="n2", title="made by release 1"))
    await dev_a.settle()
    assert dev_a.errors == [] and a.sync_session.state is ts.SessionState.ACTIVE
    dev_a.close()

    a = await dev_a.open([Note2, Label2], subscribe=False)  # forward again to release 2
    n1 = a.find(Note2, "n1")
    assert n1 is not None
    assert (n1.title, n1.tag, list(n1.marks)) == ("release 1 was here", "green", ["x"])
    assert {(lb.id, lb.name) for lb in a.all(Label2)} == {("l1", "renamed"), ("l2", "new")}
    assert a.find(Note2, "n2").tag is None  # type: ignore[union-attr]
    await new_c.settle()
    seen = c.find(Note2, "n1")
    assert seen is not None and (seen.title, seen.tag) == ("release 1 was here", "green")
    assert dev_a.errors == [] and new_c.errors == []


async def test_a_fresh_older_file_gets_the_newer_values_when_it_upgrades(devices: Any) -> None:
    Note2, Label2 = new_release()
    Note1 = old_release()
    new_a, early, late = devices("a"), devices("early"), devices("late")

    d = await early.open([Note1])  # bound before anything exists: gets the log's CREATEs
    a = await new_a.open([Note2, Label2])
    with a.write():
        a.add(Note2(id="n1", title="made by a", tag="red", marks=["m"], hits=2))
    await new_a.settle()
    await early.settle()
    b = await late.open([Note1])  # bound after: gets n1 in its subscription's bootstrap
    for device, db in ((early, d), (late, b)):
        assert db.find(Note1, "n1").title == "made by a"  # type: ignore[union-attr]
        assert json.loads(db._engine.get_meta("skipped")) == ["Note.hits", "Note.marks", "Note.tag"]
        assert device.errors == []
        device.close()
        db = await device.open([Note2, Label2], subscribe=False)  # the upgrade
        await device.settle()
        n1 = db.find(Note2, "n1")
        assert n1 is not None and (n1.tag, list(n1.marks), n1.hits.value) == ("red", ["m"], 2)
        assert json.loads(db._engine.get_meta("skipped")) == []
        assert device.errors == []
