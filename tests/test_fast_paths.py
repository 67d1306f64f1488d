"""The speed fast paths (issue 8) give exactly what the general paths give.

New objects skip the merge on the server (``merge.created_state``) and on the client
(``StoreEngine.apply`` writes the row alone); ``pack`` reuses packers; download
transactions commit with ``synchronous = NORMAL`` and leave the connection at ``FULL``.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest

from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.merge import (
    LONE_HEAD,
    ObjectState,
    created_rows,
    created_state,
    stored_state,
)
from tidesync.core.packing import instruction_from_list, pack, unpack
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.server.storage import SQLiteStorage, UploadBatch
from tidesync.store.engine import StoreEngine

ITEM = ModelSchema(
    "Item",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("name", Kind.STR),
        FieldSchema("price", Kind.FLOAT),
        FieldSchema("at", Kind.DATETIME, optional=True),
        FieldSchema("note", Kind.STR, optional=True),
    ),
    "id",
)
BAG = ModelSchema(
    "Bag",
    (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("votes", Kind.COUNTER)),
    "id",
)


def _create(pk: int, wall: int, origin: str = "o1", **values: Any) -> Instruction:
    value = {"id": pk, "name": f"n{pk}", "price": 2, "at": None, "note": None, **values}
    return Instruction(Op.CREATE, "Item", pk, HLC(wall, 0, origin), value=value)


def _set(pk: int, wall: int, field: str, value: Any, origin: str = "o1") -> Instruction:
    return Instruction(Op.SET, "Item", pk, HLC(wall, 0, origin), field=field, value=value)


def test_created_state_matches_the_merge() -> None:
    naive = dt.datetime(2024, 5, 1, 12, 0)
    for ins in (_create(1, 10), _create(2, 11, at=naive, note="x", price=1.5)):
        st = ObjectState.empty()
        st.apply(ins, ITEM)
        got = created_state(ins, ITEM)
        assert got is not None
        # the compact lone-create form, read back as the very state the merge made
        assert got[0][:2] == LONE_HEAD
        assert ObjectState.from_bytes(got[0]).to_bytes() == st.to_bytes()
        assert got[1] == st.render(ITEM)
        assert list(got[1]) == list(st.render(ITEM) or {})
        # what the server stores: the head (format and HLC) beside the packed values
        head, vals = created_rows(ins, ITEM) or (b"", b"")
        assert vals == pack(st.render(ITEM))
        assert stored_state(head, vals) == got[0]
        assert ObjectState.from_bytes(stored_state(head, vals)).to_bytes() == st.to_bytes()
    assert (
        created_rows(Instruction(Op.CREATE, "Bag", 1, HLC(1, 0, "o"), value={"id": 1}), BAG) is None
    )
    assert (
        created_state(Instruction(Op.CREATE, "Bag", 1, HLC(1, 0, "o"), value={"id": 1}), BAG)
        is None
    )
    with pytest.raises(ValueError):
        created_state(Instruction(Op.CREATE, "Item", 1, HLC(1, 0, "o"), value=[1]), ITEM)


def test_instruction_ops_parse_and_bad_ones_are_refused() -> None:
    ins = instruction_from_list([2, "Item", 1, 5, 0, "name", "x", None], "o")
    assert ins.op is Op.SET
    for bad in (0, 99, "2", [2], None):
        with pytest.raises(ValueError, match="unknown instruction op"):
            instruction_from_list([bad, "Item", 1, 5, 0, "name", "x", None], "o")


def test_pack_is_safe_from_many_threads() -> None:
    values = [
        {"i": i, "s": "x" * (i % 50), "d": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}
        for i in range(200)
    ]
    expected = [unpack(pack(v)) for v in values]
    errors: list[str] = []

    def worker() -> None:
        for _ in range(20):
            for v, e in zip(values, expected):
                if unpack(pack(v)) != e:
                    errors.append(repr(v))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with pytest.raises(TypeError):
        pack(object())
    assert unpack(pack([1, "a"])) == [1, "a"]  # a failed pack leaves no residue behind


def _row(engine: StoreEngine, pk: int) -> tuple[Any, ...] | None:
    return engine.conn.execute(  # type: ignore[no-any-return]
        'SELECT "id", "name", "price", "note", "_state" IS NULL FROM "t_Item" WHERE "id" = ?',
        (pk,),
    ).fetchone()


def _reference(instructions: list[Instruction]) -> dict[int, dict[str, Any]]:
    states: dict[int, ObjectState] = {}
    for ins in instructions:
        states.setdefault(ins.pk, ObjectState.empty()).apply(ins, ITEM)
    out = {}
    for pk, st in states.items():
        values = st.render(ITEM)
        if values is not None:
            out[pk] = values
    return out


def test_downloaded_creates_take_the_fast_path_and_merge_like_the_general_one(
    tmp_path: Path,
) -> None:
    engine = StoreEngine(tmp_path / "c.sqlite3", {"Item": ITEM})
    try:
        engine.begin()
        engine.create(_create(1, 5, origin="me"))  # a local object
        engine.commit([])
        downloaded = [
            _create(1, 7, name="theirs"),  # the same key, created elsewhere later: merges
            _create(2, 8),
            _create(3, 9),
            _set(3, 10, "name", "renamed"),  # touches an object created in this batch
            _create(4, 11),
            _create(4, 3, name="older"),  # an older second create of the same key
            Instruction(Op.ERASE, "Item", 2, HLC(12, 0, "o1")),
            _create(6, 13),  # nothing else touches it: the row alone, state implied
        ]
        engine.begin(durable=False)
        engine.apply(downloaded)
        # every written object is marked for the notifiers (rows batched or merged)
        assert engine._touched == {"Item": {1, 2, 3, 4, 6}}
        engine.commit([])
        expected = _reference([_create(1, 5, origin="me"), *downloaded])
        assert _row(engine, 6) == (6, "n6", 2.0, None, 1)
        for pk in (1, 2, 3, 4, 6):
            row = _row(engine, pk)
            if pk not in expected:
                assert row is None
                continue
            assert row is not None
            assert row[:4] == (pk, expected[pk]["name"], expected[pk]["price"], None)
        assert _row(engine, 1)[1] == "theirs"  # type: ignore[index]
        # later instructions on a fast-path object load its implied state correctly
        engine.begin()
        engine.apply([_set(4, 20, "note", "later"), _create(5, 21)])
        engine.commit([])
        assert _row(engine, 4) == (4, "n4", 2.0, "later", 0)
        # (the model now has an erased object, so new keys take the general path)
        assert _row(engine, 5) == (5, "n5", 2.0, None, 0)
        # an erased object is re-created by the merge, not by the fast path
        engine.begin()
        engine.apply([_create(2, 6)])  # older than its erase: stays erased
        engine.commit([])
        assert _row(engine, 2) is None
    finally:
        engine.close()


def test_download_transactions_are_relaxed_and_local_ones_stay_full(tmp_path: Path) -> None:
    """A durable=False transaction runs at synchronous = NORMAL; the connection stays so
    until the next durable transaction, which begins at FULL (by begin() or transaction(),
    after a commit or a rollback)."""
    engine = StoreEngine(tmp_path / "c.sqlite3", {"Item": ITEM})
    try:

        def sync() -> int:
            return int(engine.conn.execute("PRAGMA synchronous").fetchone()[0])

        assert sync() == 2  # FULL
        engine.begin(durable=False)
        assert sync() == 1  # NORMAL
        engine.apply([_create(1, 5)])
        engine.commit([])
        engine.begin(durable=False)  # the next download: no change needed
        assert sync() == 1
        engine.rollback()
        engine.begin()
        assert sync() == 2
        engine.apply([_create(2, 6)])
        assert engine.commit([]) is None  # (applied, not local: nothing for the log)
        with engine.transaction(durable=False):
            assert sync() == 1
        with engine.transaction():
            assert sync() == 2
        engine.begin(durable=False)
        engine.commit([])
        with pytest.raises(RuntimeError), engine.transaction():
            assert sync() == 2
            raise RuntimeError("rolled back")
        assert not engine.conn.in_transaction
    finally:
        engine.close()


def test_a_commit_writes_its_meta_in_one_statement_and_counts_as_before(
    tmp_path: Path,
) -> None:
    """commit() numbers commits and local changesets from the values begin() read, writes
    them, the clock and ``meta`` together, and a rollback leaves them as they were."""
    engine = StoreEngine(tmp_path / "m.sqlite3", {"Item": ITEM})
    try:
        engine.origin = "dev"
        statements: list[str] = []
        engine.conn.set_trace_callback(statements.append)
        engine.begin()
        assert engine.commit([_create(1, 5)], meta={"download_cursor": 7}) == 1
        writes = [s for s in statements if s.startswith("INSERT INTO _meta")]
        assert len(writes) == 1 and "'download_cursor', 7" in writes[0]
        engine.conn.set_trace_callback(None)
        assert engine.get_meta("last_version") == 1 and engine.get_meta("commit_seq") == 1
        assert engine.get_meta("download_cursor") == 7
        engine.begin()
        engine.rollback()
        engine.begin()
        assert engine.commit([_create(2, 6)]) == 2
        engine.conn.execute("BEGIN IMMEDIATE")  # not by begin(): commit reads them itself
        assert engine.commit([]) is None
        assert engine.get_meta("commit_seq") == 3 and engine.get_meta("last_version") == 2
        assert [v for v, _ in engine.read_changelog(0, 1 << 20)] == [1, 2]
    finally:
        engine.close()


async def test_server_fast_path_stores_what_the_merge_would(tmp_path: Path) -> None:
    async with SQLiteStorage(tmp_path / "s.sqlite3") as storage:
        await storage.put_schemas("app", [ITEM])
        await storage.register_client("app", "o1", "u")
        first = Changeset("o1", 1, (_create(1, 5), _create(2, 6), _create(3, 7)))
        second = Changeset("o1", 2, (_set(2, 8, "name", "b"), _create(4, 9)))
        bad = Changeset("o1", 3, (_create(5, 10), _set(5, 11, "price", "not a float")))
        # one group commit: the second batch changes an object the first created
        r1, r2 = await storage.integrate(
            [UploadBatch("app", "o1", [first]), UploadBatch("app", "o1", [second])]
        )
        assert r1.ok and r2.ok
        (r3,) = await storage.integrate([UploadBatch("app", "o1", [bad])])
        assert not r3.ok  # refused whole: its new object is not stored either
        objects = await storage.get_objects("app", "Item")
        expected = _reference([*first.instructions, *second.instructions])
        assert objects == expected
        stored = await storage.get_states("app", [("Item", pack(pk)) for pk in (1, 2, 3, 4, 5)])
        assert ("Item", pack(5)) not in stored
        for pk in (1, 2, 3, 4):
            st = ObjectState.empty()
            for ins in (*first.instructions, *second.instructions):
                if ins.pk == pk:
                    st.apply(ins, ITEM)
            got = ObjectState.from_bytes(stored[("Item", pack(pk))].state)
            assert got.to_bytes() == st.to_bytes()


def test_instruction_parse_fast_path_agrees_with_the_checked_one() -> None:
    """The fast path of ``instruction_from_list`` accepts and builds exactly what the
    checked parser does (plain tuples of the right types), and leaves the rest to it."""
    from tidesync.core.packing import _instruction_from_list

    good: list[Any] = [
        [1, "Item", 1, 5, 0, None, {"id": 1}, None],
        [2, "Item", "k", 5, 3, "note", "x", None],
        [3, "Item", 1, 0, 0, "n", 4, None],
        [4, "Item", 1, 7, 1, None, None, None],
        [10, "Item", 1, 7, 1, "d", 2.5, "key"],
        [11, "Item", 1, 7, 1, "d", None, "key"],
        [5, "Item", 1, 7, 1, "l", 1, [3, 0, "o"]],
        [8, "Item", 1, 7, 1, "s", 1, None],
        [True, "Item", 1, 5, 0, None, {"id": 1}, None],
        [1, "Item", 1, True, 0, None, {"id": 1}, None],
    ]
    bad: list[Any] = [
        [1, "Item", 1, 5, 0, None, [1], None],
        [1, "", 1, 5, 0, None, {}, None],
        [1, "Item", 1, -1, 0, None, {}, None],
        [2, "Item", 1, 5, 0, 3, 1, None],
        [99, "Item", 1, 5, 0, None, {}, None],
        [8, "Item", 1, 5, 0, "s", [1], None],
        [1, "Item", 1, 5, 0, None, {}],
        "not a list",
    ]
    for item in good:
        fast = instruction_from_list(item, "o")
        assert fast == _instruction_from_list(item, "o")
        assert type(fast) is Instruction and type(fast.hlc) is HLC
    for item in bad:
        with pytest.raises(ValueError):
            instruction_from_list(item, "o")
        with pytest.raises(ValueError):
            _instruction_from_list(item, "o")


def test_touching_many_keys_at_once_records_what_one_at_a_time_does(tmp_path: Path) -> None:
    """The notifiers' record of a transaction's written keys (exact up to
    TOUCHED_MAX_KEYS per model, then None: "re-run the queries") is the same whether the
    keys come one by one or in bulk, mixed."""
    from tidesync.store.engine import TOUCHED_MAX_KEYS

    engine = StoreEngine(tmp_path / "t.sqlite3", {"Item": ITEM})
    try:
        engine._touch("Item", 1)
        engine._touch_many("Item", [1, 2, 3])
        engine._touch_many("Other", [])
        assert engine._touched == {"Item": {1, 2, 3}, "Other": set()}
        engine._touch_many("Item", list(range(4, TOUCHED_MAX_KEYS + 1)))
        assert engine._touched["Item"] == set(range(1, TOUCHED_MAX_KEYS + 1))
        engine._touch_many("Item", [5])  # already there: still exact
        assert engine._touched["Item"] is not None
        engine._touch_many("Item", [TOUCHED_MAX_KEYS + 1])
        assert engine._touched["Item"] is None
        engine._touch_many("Item", [1])
        engine._touch("Item", 2)
        assert engine._touched["Item"] is None
    finally:
        engine.close()
