"""The local database on real SQLite files: opening, writes, reads, errors, schema changes."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

import tidesync as ts

from .conftest import MODELS, Person, Task


def test_add_find_and_read_every_type(db: ts.Database, utc_now: dt.datetime) -> None:
    u = uuid.uuid4()
    oid = ts.ObjectId()
    with db.write():
        ann = db.add(Person(id="ann", name="Ann", age=40))
        t = db.add(
            Task(
                summary="buy milk",
                done=True,
                priority=3,
                score=1.5,
                blob=b"\x01\x02",
                due=utc_now,
                price=Decimal("12.34"),
                ref=u,
                other=oid,
                note=None,
                tags=["a", "b"],
                labels={"x", "y"},
                attrs={"k": 1},
                owner=ann,
                watchers=[ann],
                votes=ts.Counter(2),
            )
        )
    assert t.is_managed
    found = db.find(Task, t.id)
    assert found is not None
    assert found.summary == "buy milk" and found.done is True and found.priority == 3
    assert found.score == 1.5 and found.blob == b"\x01\x02" and found.due == utc_now
    assert found.price == Decimal("12.34") and found.ref == u and found.other == oid
    assert found.note is None
    assert list(found.tags) == ["a", "b"] and set(found.labels) == {"x", "y"}
    assert dict(found.attrs.items()) == {"k": 1}
    assert found.owner is not None and found.owner.name == "Ann"
    assert [w.id for w in found.watchers] == ["ann"]
    assert int(found.votes) == 2
    assert db.find(Task, ts.ObjectId()) is None


def test_write_outside_block_raises(db: ts.Database) -> None:
    with pytest.raises(ts.WriteOutsideTransactionError):
        db.add(Task(summary="x"))
    with db.write():
        t = db.add(Task(summary="x"))
    with pytest.raises(ts.WriteOutsideTransactionError):
        t.summary = "y"
    with pytest.raises(ts.WriteOutsideTransactionError):
        t.tags.append("z")
    with pytest.raises(ts.WriteOutsideTransactionError):
        t.votes.increment()
    with pytest.raises(ts.WriteOutsideTransactionError):
        db.delete(t)
    assert t.summary == "x"


def test_nested_write_raises(db: ts.Database) -> None:
    with db.write(), pytest.raises(ts.NestedWriteError):
        with db.write():
            pass


def test_exception_rolls_back_everything(db: ts.Database) -> None:
    with db.write():
        t = db.add(Task(summary="keep"))
    with pytest.raises(RuntimeError, match="boom"), db.write():
        db.add(Task(summary="gone"))
        t.summary = "changed"
        t.votes.increment(5)
        raise RuntimeError("boom")
    assert [x.summary for x in db.all(Task)] == ["keep"]
    assert t.summary == "keep" and t.votes.value == 0
    assert db._engine.pending_bytes(0)[0] == 1


def test_duplicate_primary_key_and_update(db: ts.Database) -> None:
    with db.write():
        db.add(Person(id="p1", name="A"))
    with pytest.raises(ts.DuplicatePrimaryKeyError, match="p1"), db.write():
        db.add(Person(id="p1", name="B"))
    assert db.find(Person, "p1").name == "A"  # type: ignore[union-attr]
    with db.write():
        db.add(Person(id="p1", name="B", age=5), update=True)
    p = db.find(Person, "p1")
    assert p is not None and (p.name, p.age) == ("B", 5)
    assert len(db.all(Person)) == 1


def test_assignment_and_collections_on_managed_objects(db: ts.Database) -> None:
    with db.write():
        t = db.add(Task(summary="a", tags=["x"]))
    with db.write():
        t.summary = "b"
        t.tags.append("y")
        t.tags.insert(0, "w")
        t.tags[1] = "X"
        del t.tags[2]
        t.labels.add("l1")
        t.labels.add("l2")
        t.labels.discard("l1")
        t.attrs["a"] = 1
        t.attrs["b"] = 2
        del t.attrs["a"]
        t.votes.increment(4)
        t.votes.decrement(1)
    assert t.summary == "b"
    assert list(t.tags) == ["w", "X"]
    assert set(t.labels) == {"l2"}
    assert dict(t.attrs.items()) == {"b": 2}
    assert t.votes.value == 3
    with db.write():
        t.tags = ["only"]
        t.tags.move(0, 0)
    assert t.tags == ["only"]


def test_wrong_value_type_is_refused(db: ts.Database) -> None:
    with pytest.raises(ts.ValueTypeError, match="priority"), db.write():
        db.add(Task(summary="x", priority="high"))  # type: ignore[arg-type]
    with db.write():
        t = db.add(Task(summary="x"))
    with pytest.raises(ts.ValueTypeError, match="done"), db.write():
        t.done = "yes"
    with pytest.raises(ts.ValueTypeError, match="primary key"), db.write():
        t.id = ts.ObjectId()
    assert len(db.all(Task)) == 1 and t.done is False


def test_delete_and_delete_all(db: ts.Database) -> None:
    with db.write():
        a = db.add(Task(summary="a"))
        db.add(Task(summary="b"))
        owner = db.add(Person(id="o", name="O"))
        a.owner = owner
        a.watchers.append(owner)
    with db.write():
        db.delete(owner)
    assert a.owner is None  # a link to a deleted object reads as null
    assert list(a.watchers) == []
    with db.write():
        db.delete(a)
    assert not a.is_valid
    with pytest.raises(ts.ObjectDeletedError):
        _ = a.summary
    with pytest.raises(ts.ObjectDeletedError), db.write():
        db.delete(a)
    with db.write():
        assert db.delete_all(Task) == 1
    assert len(db.all(Task)) == 0


def test_readd_after_delete(db: ts.Database) -> None:
    with db.write():
        db.add(Person(id="p", name="first"))
    with db.write():
        db.delete(db.find(Person, "p"))  # type: ignore[arg-type]
    with db.write():
        db.add(Person(id="p", name="second"))
    assert db.find(Person, "p").name == "second"  # type: ignore[union-attr]


def test_queries_and_live_results(db: ts.Database) -> None:
    with db.write():
        for i in range(10):
            db.add(Task(summary=f"buy {i}" if i % 2 else f"sell {i}", priority=i, done=i > 6))
    res = db.query(Task, "summary BEGINSWITH[c] $0 AND done == false", "BUY")
    assert [t.priority for t in res] == [1, 3, 5]
    narrowed = res.query("priority > $0", 2)
    assert [t.priority for t in narrowed] == [3, 5]
    with db.write():
        db.add(Task(summary="buy more", priority=11))
    assert len(res) == 4 and res[3].summary == "buy more"
    assert [t.priority for t in db.query(Task, "TRUEPREDICATE SORT(priority DESC) LIMIT(2)")] == [
        11,
        9,
    ]


def test_len_counts_without_fetching_and_agrees_with_iteration(db: ts.Database) -> None:
    with db.write():
        for i in range(30):
            db.add(Task(summary=f"s{i % 4}", priority=i % 7, done=i % 3 == 0))
    queries = [
        "TRUEPREDICATE",
        "done == true",
        "priority > 3 AND done == false",
        "TRUEPREDICATE SORT(priority DESC) LIMIT(5)",
        "TRUEPREDICATE DISTINCT(summary)",
        "priority < 5 DISTINCT(priority) LIMIT(3)",
        "summary == 'none'",
    ]
    for text in queries:
        fresh = db.query(Task, text)
        counted = len(fresh)  # COUNT(*) (nothing loaded yet)
        assert counted == len(list(db.query(Task, text))), text
        assert len(fresh) == counted  # stable
    res = db.query(Task, "done == true")
    before = len(res)
    with db.write():
        db.add(Task(summary="late", done=True))
    assert len(res) == before + 1  # live: counted again at the new version


def test_query_errors_point_at_position(db: ts.Database) -> None:
    with pytest.raises(ts.QueryError) as info:
        db.query(Task, "summary == 'x' AND nosuch == 1")
    assert info.value.position == 19
    with pytest.raises(ts.QueryError):
        db.query(Task, "summary == ")


def test_context_manager_and_closed_errors(db_path: Path) -> None:
    config = ts.Configuration.local(MODELS, path=db_path)
    with ts.Database(config) as db:
        with db.write():
            t = db.add(Task(summary="x"))
    with pytest.raises(ts.DatabaseClosedError):
        db.all(Task)
    with pytest.raises(ts.DatabaseClosedError), db.write():
        pass
    with pytest.raises(ts.DatabaseClosedError):
        _ = t.summary
    db.close()  # idempotent
    with ts.Database(config) as db2:
        assert [x.summary for x in db2.all(Task)] == ["x"]


async def test_async_open(db_path: Path) -> None:
    db = await ts.Database.open(ts.Configuration.local(MODELS, path=db_path))
    try:
        with db.write():
            db.add(Person(id="a", name="A"))
        assert len(db.all(Person)) == 1
        with pytest.raises(ts.NotSyncedError):
            _ = db.sync_session
    finally:
        db.close()


def test_two_databases_on_one_file_see_each_other(db_path: Path) -> None:
    config = ts.Configuration.local(MODELS, path=db_path)
    with ts.Database(config) as a, ts.Database(config) as b:
        res = b.all(Person)
        assert len(res) == 0
        with a.write():
            a.add(Person(id="1", name="one"))
        assert len(res) == 1
        done = threading.Event()

        def writer() -> None:
            with ts.Database(config) as c, c.write():
                c.add(Person(id="2", name="two"))
            done.set()

        th = threading.Thread(target=writer)
        th.start()
        th.join()
        assert done.is_set()
        assert {p.id for p in a.all(Person)} == {"1", "2"}
        p = a.find(Person, "1")
        with b.write():
            b.find(Person, "1").name = "uno"  # type: ignore[union-attr]
        assert p is not None and p.name == "uno"


def test_schema_add_optional_field(db_path: Path) -> None:
    class Item(ts.Model):
        id: int = ts.primary_key()
        name: str

    with ts.Database(ts.Configuration.local([Item], path=db_path)) as db, db.write():
        db.add(Item(id=1, name="a"))

    class Item(ts.Model):  # type: ignore[no-redef]
        id: int = ts.primary_key()
        name: str
        color: str | None = None
        sizes: list[int]
        hits: ts.Counter

    with ts.Database(ts.Configuration.local([Item], path=db_path)) as db:
        it = db.find(Item, 1)
        assert it is not None and it.color is None and list(it.sizes) == [] and it.hits == 0
        with db.write():
            it.color = "red"
        assert db.find(Item, 1).color == "red"  # type: ignore[union-attr]


@pytest.mark.parametrize("change", ["type", "pk", "required"])
def test_incompatible_schema_change_names_class_and_field(db_path: Path, change: str) -> None:
    class Gadget(ts.Model):
        id: int = ts.primary_key()
        name: str
        code: str

    with ts.Database(ts.Configuration.local([Gadget], path=db_path)) as db, db.write():
        db.add(Gadget(id=1, name="a", code="c"))
    before = db_path.read_bytes()

    if change == "type":

        class Gadget(ts.Model):  # type: ignore[no-redef]
            id: int = ts.primary_key()
            name: int
            code: str

        match = "Gadget: field 'name' changed type from str to int"
    elif change == "pk":

        class Gadget(ts.Model):  # type: ignore[no-redef]
            id: int
            name: str
            code: str = ts.primary_key()

        match = "Gadget: primary key changed"
    else:

        class Gadget(ts.Model):  # type: ignore[no-redef]
            id: int = ts.primary_key()
            name: str
            code: str
            weight: float

        match = "Gadget: new field 'weight'"
    with pytest.raises(ts.SchemaMismatchError, match=match):
        ts.Database(ts.Configuration.local([Gadget], path=db_path))
    assert db_path.read_bytes() == before


def test_changelog_records_each_transaction(db: ts.Database) -> None:
    from tidesync.core.changeset import Op
    from tidesync.core.packing import unpack_instructions

    with db.write():
        t = db.add(Task(summary="a"))
    with db.write():
        t.summary = "b"
        t.votes.increment(2)
    with db.write():
        pass  # nothing changed: nothing recorded
    with db.write():
        _ = t.summary  # reads only
    entries = db._engine.read_changelog(0, 1 << 20)
    assert [v for v, _ in entries] == [1, 2]
    first = unpack_instructions(entries[0][1], db._engine.origin)
    second = unpack_instructions(entries[1][1], db._engine.origin)
    assert [i.op for i in first] == [Op.CREATE]
    assert [i.op for i in second] == [Op.SET, Op.ADD]
    hlcs = [i.hlc for i in first + second]
    assert hlcs == sorted(hlcs) and len(set(hlcs)) == 3
    assert all(h.origin == db._engine.origin for h in hlcs)
    assert db._engine.read_changelog(1, 1 << 20)[0][0] == 2


def test_changelog_and_data_commit_atomically(db_path: Path) -> None:
    with ts.Database(ts.Configuration.local(MODELS, path=db_path)) as db, db.write():
        db.add(Person(id="x", name="X"))
    conn = sqlite3.connect(db_path)
    assert conn.execute('SELECT COUNT(*) FROM "t_Person"').fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM _changelog").fetchone()[0] == 1
    conn.close()


async def test_open_from_running_loop_does_not_block(db_path: Path) -> None:
    config = ts.Configuration.local(MODELS, path=db_path)
    dbs = await asyncio.gather(*(ts.Database.open(config) for _ in range(3)))
    for d in dbs:
        d.close()


def test_int_outside_64_bits_is_refused(db: ts.Database) -> None:
    with pytest.raises(ts.ValueTypeError, match="64-bit"), db.write():
        db.add(Task(summary="x", priority=2**70))
    with db.write():
        t = db.add(Task(summary="y"))
    with pytest.raises(ts.ValueTypeError), db.write():
        t.priority = -(2**64)
    assert len(db.all(Task)) == 1


def test_query_by_link_and_link_path(db: ts.Database) -> None:
    with db.write():
        ann = db.add(Person(id="ann", name="Ann", age=40))
        bob = db.add(Person(id="bob", name="Bob", age=20))
        db.add(Task(summary="a", owner=ann, watchers=[bob]))
        db.add(Task(summary="b", owner=bob, watchers=[ann, bob]))
    assert [t.summary for t in db.query(Task, "owner == $0", ann)] == ["a"]
    assert [t.summary for t in db.query(Task, "owner.name == $0", "Bob")] == ["b"]
    assert [t.summary for t in db.query(Task, "ANY watchers.age > 30")] == ["b"]
    assert [t.summary for t in db.query(Task, "watchers.@count == 2")] == ["b"]
