"""Flexible sync's whole objects: the fast path of ``FlexApplier.apply`` leaves the file
exactly as the merge path does, and the pending-instruction cache follows the change log.

The fast path writes a new object whose state is a lone create as its row alone (``"_state"``
NULL, the create's HLC in ``"_hlc"``), like a local create; the reference here is the same
applier with the fast path switched off, on a byte-for-byte copy of the same file.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import shutil
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tidesync.client.subscriptions as subs_mod
from tidesync.client.subscriptions import FlexApplier
from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.merge import (
    LONE_HEAD,
    ObjectState,
    created_at,
    created_rows,
    created_state,
    simple_state,
    stored_state,
)
from tidesync.core.packing import pack, unpack, unpack_instructions
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.objectid import ObjectId
from tidesync.protocol.messages import (
    BOOTSTRAP_LAST,
    BOOTSTRAP_NONE,
    BOOTSTRAP_PAGE,
    ObjectRows,
    ObjectUpdate,
)
from tidesync.store import sqlvalues as sv
from tidesync.store.engine import StoreEngine, now_ms

OWNER = ModelSchema(
    "Owner",
    (FieldSchema("id", Kind.STR, primary_key=True), FieldSchema("name", Kind.STR, optional=True)),
    "id",
)
ITEM = ModelSchema(
    "Item",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("name", Kind.STR),
        FieldSchema("qty", Kind.INT, indexed=True),
        FieldSchema("price", Kind.FLOAT),
        FieldSchema("done", Kind.BOOL),
        FieldSchema("at", Kind.DATETIME, optional=True),
        FieldSchema("amount", Kind.DECIMAL, optional=True),
        FieldSchema("ref", Kind.UUID, optional=True),
        FieldSchema("oid", Kind.OBJECTID, optional=True),
        FieldSchema("blob", Kind.BYTES, optional=True),
        FieldSchema("owner", Kind.LINK, optional=True, target="Owner"),
    ),
    "id",
)
BAG = ModelSchema(
    "Bag",
    (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("votes", Kind.COUNTER)),
    "id",
)
TAGGED = ModelSchema(
    "Tagged",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("tags", Kind.STR, collection=Collection.LIST),
    ),
    "id",
)
GONE = ModelSchema(
    "Gone",
    (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("name", Kind.STR)),
    "id",
)
SCHEMAS = {s.name: s for s in (OWNER, ITEM, BAG, TAGGED, GONE)}

#: Remote HLCs an hour ahead of the local clock, so observing them moves it.
T0 = now_ms() + 3_600_000


#: A remote HLC older than every local one.
OLD = HLC(1_000, 0, "srv")


def _hlc(n: int, origin: str = "srv") -> HLC:
    return HLC(T0 + n, n % 3, origin)


def _item_values(pk: int, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": pk,
        "name": f"item {pk}",
        "qty": pk % 7,
        "price": pk * 0.25,
        "done": pk % 2 == 0,
        "at": None,
        "amount": None,
        "ref": None,
        "oid": None,
        "blob": None,
        "owner": None,
    }
    if pk % 3 == 0:
        values.update(
            at=dt.datetime(2024, 1, 2, 3, 4, 5, 6789, tzinfo=dt.UTC),
            amount=Decimal("12.50"),
            ref=uuid.UUID(int=pk),
            oid=ObjectId(bytes(range(12))),
            blob=bytes([pk % 256]) * 3,
            owner="a",
        )
    values.update(changes)
    return values


def _values(model: str, pk: Any, n: int = 0) -> dict[str, Any]:
    if model == "Item":
        return _item_values(pk)
    if model == "Owner":
        return {"id": pk, "name": f"owner {pk}"}
    if model == "Bag":
        return {"id": pk, "votes": n}
    if model == "Tagged":
        return {"id": pk, "tags": [f"t{n}", "x"]}
    return {"id": pk, "name": f"gone {pk} {n}"}


def _create(model: str, pk: Any, n: int, **changes: Any) -> Instruction:
    values = {**_values(model, pk, n), **changes}
    return Instruction(Op.CREATE, model, pk, _hlc(n), value=values)


def _state(*instructions: Instruction) -> bytes:
    st_ = ObjectState.empty()
    for ins in instructions:
        st_.apply(ins, SCHEMAS[ins.model])
    return st_.to_bytes()


def _simple(model: str, pk: Any, n: int, **changes: Any) -> ObjectUpdate:
    return ObjectUpdate(model, pk, _state(_create(model, pk, n, **changes)))


def _raw(model: str, pk: Any, created: HLC, base: dict[str, Any], last: HLC | None = None) -> bytes:
    """A hand-made state (what a server with other ideas could send)."""
    return pack([1, created, None, last or created, base, {}])


# --- the file: set-up, copies, and what is compared ----------------------------------------


def _local_create(engine: StoreEngine, model: str, values: dict[str, Any]) -> None:
    """A committed local create (it goes to the change log)."""
    engine.begin()
    pk = values[SCHEMAS[model].primary_key]
    ins = Instruction(Op.CREATE, model, pk, engine.tick(), value=values)
    engine.apply([ins])
    engine.commit([ins])


def _prepare(path: Path) -> None:
    """Local objects: acknowledged ones (version 1) and pending ones (versions 2, 3)."""
    engine = StoreEngine(path, SCHEMAS)
    try:

        def local(op: Op, model: str, pk: Any, **kw: Any) -> Instruction:
            return Instruction(op, model, pk, engine.tick(), **kw)

        engine.begin()
        first = [
            local(Op.CREATE, "Owner", "a", value={"id": "a", "name": "A"}),
            local(Op.CREATE, "Item", 100, value=_item_values(100)),
            local(Op.CREATE, "Item", 101, value=_item_values(101)),
            local(Op.CREATE, "Bag", 1, value={"id": 1, "votes": 3}),
            local(Op.CREATE, "Tagged", 1, value={"id": 1, "tags": ["a"]}),
            local(Op.CREATE, "Gone", 1, value={"id": 1, "name": "one"}),
            local(Op.CREATE, "Gone", 2, value={"id": 2, "name": "two"}),
        ]
        first.append(local(Op.ERASE, "Gone", 1))  # "Gone" has an erased object
        engine.apply(first)
        engine.commit(first)
        engine.begin()
        second = [
            local(Op.SET, "Item", 101, field="name", value="mine"),
            local(Op.CREATE, "Item", 104, value=_item_values(104, name="pending")),
            local(Op.ADD, "Bag", 1, field="votes", value=2),
        ]
        engine.apply(second)
        engine.commit(second)
        engine.begin()
        third = [local(Op.SET, "Item", 104, field="qty", value=42)]
        engine.apply(third)
        engine.commit(third)
    finally:
        engine.close()


def _pair(tmp_path: Path, prepare: bool = True) -> tuple[Path, Path]:
    fast, slow = tmp_path / "fast.sqlite3", tmp_path / "slow.sqlite3"
    if prepare:
        _prepare(fast)
    else:
        StoreEngine(fast, SCHEMAS).close()
    shutil.copyfile(fast, slow)  # same origin, clock and objects
    return fast, slow


def _applier(engine: StoreEngine, fast: bool, monkeypatch: pytest.MonkeyPatch) -> FlexApplier:
    flex = FlexApplier(engine)
    if not fast:
        monkeypatch.setattr(flex, "_fast_rows", lambda objects, pending: {})
    return flex


def _as_rows(
    objects: list[ObjectUpdate], reorder: bool = False
) -> tuple[list[ObjectRows], list[ObjectUpdate]]:
    """``objects`` as a DOWNLOAD with rows would carry them: the longest prefix of objects
    whose state has a lone create's shape (any values, checked or not) as row blocks (one
    per model, in order), the rest as they are. ``reorder`` gives the blocks' fields in
    another order than the columns (so no row can be written as it is)."""
    blocks: dict[str, ObjectRows] = {}
    for n, obj in enumerate(objects):
        schema = SCHEMAS.get(obj.model)
        raw = unpack(obj.state) if obj.state is not None and schema is not None else None
        names = [f.name for f in schema.fields] if schema is not None else []
        if (
            type(raw) is not list
            or len(raw) != 6
            or raw[2] is not None
            or raw[5] != {}
            or raw[1] != raw[3]
            or set(raw[4]) != set(names)
        ):
            return list(blocks.values()), objects[n:]
        if reorder:
            names = names[::-1]
        block = blocks.get(obj.model)
        if block is None:
            block = blocks[obj.model] = ObjectRows(
                obj.model, names, names.index(schema.primary_key), 0, []
            )
        block.rows.append([pack(raw[1]), *(raw[4][name] for name in names)])
    return list(blocks.values()), []


def _run(
    path: Path,
    pages: list[tuple[list[ObjectUpdate], int]],
    fast: bool,
    monkeypatch: pytest.MonkeyPatch,
    acked: int = 1,
    before: list[Instruction] | None = None,
    rows: bool = False,
) -> dict[str, Any]:
    """Apply ``pages`` (objects, bootstrap flag), one download transaction each; return
    everything the two paths must agree on. With ``rows`` the objects that can travel as
    rows do (:func:`_as_rows`)."""
    engine = StoreEngine(path, SCHEMAS)
    try:
        flex = _applier(engine, fast, monkeypatch)
        received: list[Any] = []
        keys: set[tuple[str, Any]] = set()
        for n, (objects, bootstrap) in enumerate(pages):
            engine.begin(durable=False)
            if n == 0 and before:
                engine.apply(before)  # the same DOWNLOAD's changesets come first
            if rows:
                blocks, rest = _as_rows(objects)
                flex.apply(rest, bootstrap, 1 if bootstrap else 0, acked, blocks)
            else:
                flex.apply(objects, bootstrap, 1 if bootstrap else 0, acked)
            received.append(None if flex.received is None else sorted(map(repr, flex.received)))
            engine.commit(())
            keys.update((o.model, o.pk) for o in objects if o.model in SCHEMAS)
        return _snapshot(engine, keys) | {"received": received}
    finally:
        engine.close()


def _snapshot(engine: StoreEngine, keys: set[tuple[str, Any]]) -> dict[str, Any]:
    conn = engine.conn
    out: dict[str, Any] = {}
    for model, schema in SCHEMAS.items():
        cols = ", ".join(sv.quote(f.name) for f in schema.fields)
        pk = sv.quote(schema.primary_key)
        rows = conn.execute(f"SELECT {cols} FROM {sv.table_name(model)} ORDER BY {pk}")
        out[model] = [tuple(map(repr, r)) for r in rows]  # repr: -0.0 is not 0.0
        for (raw,) in conn.execute(f"SELECT {pk} FROM {sv.table_name(model)}"):
            keys.add((model, sv.from_column(schema.pk_field, raw, SCHEMAS)))
    out["_dead"] = sorted(conn.execute("SELECT model, pk, state FROM _dead"))
    states = {}
    for model, pk in sorted(keys, key=repr):
        state, where = engine.load_state(model, pk)
        states[(model, pk)] = (None if state is None else state.to_bytes(), where)
    out["states"] = states
    out["clock"] = engine.get_meta("hlc")
    out["changelog"] = conn.execute("SELECT version, data FROM _changelog").fetchall()
    return out


def _implied(path: Path) -> set[tuple[str, Any]]:
    """The objects whose state is implied by their row (written by the fast path)."""
    engine = StoreEngine(path, SCHEMAS)
    try:
        out = set()
        for model, schema in SCHEMAS.items():
            pk = sv.quote(schema.primary_key)
            for (raw,) in engine.conn.execute(
                f'SELECT {pk} FROM {sv.table_name(model)} WHERE "_state" IS NULL'
            ):
                out.add((model, sv.from_column(schema.pk_field, raw, SCHEMAS)))
        return out
    finally:
        engine.close()


# --- the pure helper -----------------------------------------------------------------------


def test_simple_state_recognises_lone_creates_only() -> None:
    ins = _create("Item", 3, 5)
    data = _state(ins)
    got = simple_state(data, ITEM)
    assert got is not None
    assert got[0] == ins.hlc and type(got[0]) is HLC
    assert got[1] == _item_values(3)
    cs = created_state(ins, ITEM)
    assert cs is not None and ObjectState.from_bytes(cs[0]).to_bytes() == data
    assert simple_state(cs[0], ITEM) == got  # the compact lone-create form
    later = _hlc(9)
    not_simple = [
        _state(ins, Instruction(Op.SET, "Item", 3, later, field="name", value="x")),  # out
        _state(Instruction(Op.ERASE, "Item", 3, _hlc(1)), ins),  # an older erase
        _state(ins, Instruction(Op.ERASE, "Item", 3, later)),  # erased
        _raw("Item", 3, ins.hlc, _item_values(3), last=later),  # last != created
        _raw("Item", 3, ins.hlc, _item_values(3, price=2)),  # int in a float field
        _raw("Item", 3, ins.hlc, {k: v for k, v in _item_values(3).items() if k != "blob"}),
        _raw("Item", 3, ins.hlc, {**_item_values(3), "extra": 1}),  # a field it lacks
        _raw("Item", 3, ins.hlc, {k: v for k, v in _item_values(3).items() if k != "qty"}),
        pack([1, None, None, None, {}, {}]),  # never created
        pack([2, ins.hlc, None, ins.hlc, _item_values(3), {}]),  # another format
        pack([1, [1, 2], None, [1, 2], _item_values(3), {}]),  # malformed HLC
        pack([1, [-1, 0, "x"], None, [-1, 0, "x"], _item_values(3), {}]),
        pack([1, ins.hlc, None, ins.hlc, _item_values(3)]),  # 5 items
        pack({"not": "a list"}),
        b"\xc1",  # not msgpack
        # the compact lone-create form ([2, created, values]) with the same defects
        pack([2, ins.hlc, _item_values(3, price=2)]),
        pack([2, ins.hlc, {k: v for k, v in _item_values(3).items() if k != "blob"}]),
        pack([2, ins.hlc, {**_item_values(3), "extra": 1}]),
        pack([2, [-1, 0, "x"], _item_values(3)]),
        pack([2, None, _item_values(3)]),
        pack([3, ins.hlc, _item_values(3)]),  # another format
    ]
    for data in not_simple:
        assert simple_state(data, ITEM) is None, data
    # a model with a counter or collection field never has simple states
    assert simple_state(_state(_create("Bag", 1, 1)), BAG) is None
    assert simple_state(_state(_create("Tagged", 1, 1)), TAGGED) is None
    assert simple_state(_state(_create("Gone", 1, 1)), GONE) is not None


_SCALAR = ModelSchema(
    "S",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("a", Kind.STR, optional=True),
        FieldSchema("f", Kind.FLOAT, optional=True),
        FieldSchema("d", Kind.DATETIME, optional=True),
    ),
    "id",
)
_hlcs = st.builds(HLC, st.integers(0, 6), st.integers(0, 2), st.sampled_from(["p", "q"]))
_values_st = st.fixed_dictionaries(
    {},
    optional={
        "id": st.just(1),
        "a": st.none() | st.text(max_size=3),
        "f": st.none() | st.integers(-2, 2) | st.floats(allow_nan=False),
        "d": st.none()
        | st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1)).map(
            lambda d: d.replace(tzinfo=dt.UTC)
        ),
    },
)
_ops = st.one_of(
    st.builds(lambda h, v: Instruction(Op.CREATE, "S", 1, h, value=v), _hlcs, _values_st),
    st.builds(lambda h: Instruction(Op.ERASE, "S", 1, h), _hlcs),
    st.builds(
        lambda h, f, v: Instruction(Op.SET, "S", 1, h, field=f, value=v),
        _hlcs,
        st.sampled_from(["a", "f"]),
        st.none() | st.integers(-2, 2),
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ops, min_size=1, max_size=5))
def test_simple_state_is_exactly_the_state_of_its_lone_create(ops: list[Instruction]) -> None:
    state = ObjectState.empty()
    for ins in ops:
        state.apply(ins, _SCALAR)
    data = state.to_bytes()
    got = simple_state(data, _SCALAR)
    if len(ops) == 1 and ops[0].op is Op.CREATE:
        assert got is not None  # a lone create is always recognised
    if got is None:
        return
    created, values = got
    lone = ObjectState.empty()
    lone.apply(Instruction(Op.CREATE, "S", 1, created, value=values), _SCALAR)
    assert lone.to_bytes() == data
    assert ObjectState.from_bytes(data).to_bytes() == data
    assert lone.last_hlc == state.last_hlc
    assert lone.render(_SCALAR) == state.render(_SCALAR)


@settings(max_examples=300, deadline=None)
@given(_hlcs, _values_st)
def test_the_lone_create_form_reads_as_the_merge_state_of_that_create(
    hlc: HLC, values: dict[str, Any]
) -> None:
    """A lone CREATE's compact state (what the server stores and sends for new objects)
    decodes to exactly the state the merge makes, and every reader of states gives for
    it what it gives for the full form."""
    ins = Instruction(Op.CREATE, "S", 1, hlc, value=values)
    state = ObjectState.empty()
    state.apply(ins, _SCALAR)
    full = state.to_bytes()
    made = created_state(ins, _SCALAR)
    assert made is not None
    lone = made[0]
    assert lone[:2] == LONE_HEAD and lone != full
    assert ObjectState.from_bytes(lone).to_bytes() == full
    assert ObjectState.from_bytes(lone).render(_SCALAR) == state.render(_SCALAR) == made[1]
    assert simple_state(lone, _SCALAR) == simple_state(full, _SCALAR) is not None
    assert created_at(lone) == created_at(full) == hlc
    head, vals = created_rows(ins, _SCALAR) or (b"", b"")
    assert stored_state(head, vals) == lone


@pytest.mark.parametrize(
    "raw",
    [
        [2, None, {"id": 1}],  # no create HLC
        [2, [1, 0, "p"], [1, 2]],  # values not a map
        [2, [1, 0, "p"]],  # too short
        [2, [1, 0, "p"], {"id": 1}, None],  # too long
        [2, "x", {"id": 1}],  # HLC not an array
        [2, [1, 0, "p"], {1: 1}],  # a field name that is not a string
    ],
)
def test_a_malformed_lone_create_state_is_refused(raw: list[Any]) -> None:
    data = pack(raw)
    with pytest.raises(ValueError):
        ObjectState.from_bytes(data)
    assert simple_state(data, _SCALAR) is None
    assert created_at(data) is None or raw[1] == [1, 0, "p"]


# --- the fast path against the merge path --------------------------------------------------


def _mixed_page() -> list[ObjectUpdate]:
    c = _create
    nan_price = _raw("Item", 48, _hlc(48), _item_values(48, price=float("nan")))
    return [
        *(_simple("Item", pk, pk) for pk in range(1, 31)),  # absent, simple
        _simple("Owner", "b", 31),  # a str primary key
        _simple("Item", 100, 32),  # present locally
        _simple("Item", 101, 33),  # present, with pending local instructions
        ObjectUpdate("Item", 104, None),  # evicted (its local writes are pending) ...
        _simple("Item", 104, 34),  # ... and sent back: absent, but pending
        _simple("Item", 40, 35),  # new, then evicted in the same page
        ObjectUpdate("Item", 40, None),
        ObjectUpdate("Item", 41, None),  # evicted (absent), then sent
        _simple("Item", 41, 36),
        _simple("Item", 42, 37),  # twice in one page: the second is older
        _simple("Item", 42, 2, name="older"),
        _simple("Item", 43, 38),  # simple, then changed
        ObjectUpdate(
            "Item",
            43,
            _state(
                c("Item", 43, 38), Instruction(Op.SET, "Item", 43, _hlc(39), field="qty", value=9)
            ),
        ),
        ObjectUpdate(
            "Item",
            44,
            _state(
                c("Item", 44, 40), Instruction(Op.SET, "Item", 44, _hlc(41), field="qty", value=9)
            ),
        ),
        _simple("Item", 44, 42),  # changed, then simple
        ObjectUpdate(
            "Item", 45, _state(c("Item", 45, 43), Instruction(Op.ERASE, "Item", 45, _hlc(44)))
        ),  # erased: goes to _dead (the model has an erased object from now on)
        _simple("Item", 46, 45),  # new after that
        ObjectUpdate(
            "Item",
            47,
            _state(
                Instruction(Op.ERASE, "Item", 47, _hlc(1)),
                c("Item", 47, 46),
            ),  # alive, with an older erase
        ),
        ObjectUpdate("Item", 48, nan_price),  # NaN: NULL in its column
        _simple("Item", 49, 47, price=-0.0),  # -0.0: 0.0 in its column
        ObjectUpdate("Item", 50, _raw("Item", 50, _hlc(48), _item_values(50, price=2))),
        ObjectUpdate("Item", 51, _raw("Item", 51, _hlc(49), _item_values(51, qty=True))),
        ObjectUpdate("Item", 52, _raw("Item", 52, _hlc(50), _item_values(999))),  # pk differs
        ObjectUpdate("Item", 53, _raw("Item", 53, _hlc(51), _item_values(53), last=_hlc(60))),
        ObjectUpdate("Item", 54, _raw("Item", 54, _hlc(52), {**_item_values(54), "x": 1})),
        ObjectUpdate("Item", 55, _raw("Item", 55, _hlc(53), _item_values(55, name=b"bytes"))),
        ObjectUpdate("Item", 56, _raw("Item", 56, _hlc(54), _item_values(56, done="yes"))),
        _simple("Item", 57, 55, name=None, price=None),  # None in required fields
        ObjectUpdate("Item", 60, _state(c("Item", 60, 56))),  # changed earlier in the tx
        ObjectUpdate("Nope", 1, b"whatever"),  # a model this device does not declare
        _simple("Bag", 1, 57),  # a counter field (present, pending)
        _simple("Bag", 2, 58),  # a counter field (absent)
        _simple("Tagged", 2, 59),  # a list field
        _simple("Gone", 3, 61),  # a model with an erased object
        _simple("Gone", 1, 62),  # the erased object itself
    ]


def _before() -> list[Instruction]:
    return [
        _create("Item", 60, 20),
        Instruction(Op.SET, "Item", 60, _hlc(21), field="name", value="changeset"),
    ]


@pytest.mark.parametrize("rows", [False, True], ids=["objects", "rows"])
@pytest.mark.parametrize("bootstrap", [BOOTSTRAP_NONE, BOOTSTRAP_PAGE, BOOTSTRAP_LAST])
def test_a_mixed_page_leaves_the_file_as_the_merge_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bootstrap: int, rows: bool
) -> None:
    fast_path, slow_path = _pair(tmp_path)
    page = [(_mixed_page(), bootstrap)]
    if rows:
        blocks, rest = _as_rows(_mixed_page())
        assert sum(len(b.rows) for b in blocks) > 30 and rest  # most travel as rows
    fast = _run(fast_path, page, True, monkeypatch, before=_before(), rows=rows)
    slow = _run(slow_path, page, False, monkeypatch, before=_before())
    assert fast == slow
    implied = _implied(fast_path) - _implied(slow_path)
    expected = {("Item", pk) for pk in (*range(1, 31), 46, 57)} | {("Owner", "b")}
    assert implied == expected  # the fast path wrote these (and only these) rows alone
    greatest = _hlc(62)
    assert json.loads(fast["clock"]) == [greatest.wall, greatest.counter]  # observed


@pytest.mark.parametrize("rows", [False, True], ids=["objects", "rows"])
def test_a_bootstrap_in_pages_leaves_the_file_as_the_merge_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: bool
) -> None:
    fast_path, slow_path = _pair(tmp_path)
    pages = [
        # > 500 keys; Item 104 (pending local writes) is evicted ...
        (
            [*(_simple("Item", pk, pk) for pk in range(1, 600)), ObjectUpdate("Item", 104, None)],
            BOOTSTRAP_PAGE,
        ),
        # ... and comes back in the next page, created before the local writes: absent,
        # but those pending writes must be merged into it
        (
            [
                ObjectUpdate("Item", 104, _state(_create("Item", 104, 5)._replace(hlc=OLD))),
                *(_simple("Item", pk, pk + 1) for pk in range(590, 700)),
            ],
            BOOTSTRAP_PAGE,
        ),
        ([*_mixed_page()[30:33], *_mixed_page()[35:55], _simple("Item", 1, 700)], BOOTSTRAP_LAST),
    ]
    fast = _run(fast_path, pages, True, monkeypatch, rows=rows)
    slow = _run(slow_path, pages, False, monkeypatch)
    assert fast == slow
    assert len(_implied(fast_path)) > 600
    assert ("Item", 104) not in _implied(fast_path)
    state = fast["states"][("Item", 104)][0]
    assert ObjectState.from_bytes(state).render(ITEM)["qty"] == 42  # the pending SET


@pytest.mark.parametrize("rows", [False, True], ids=["objects", "rows"])
@pytest.mark.parametrize("seed", range(24))
def test_random_pages_leave_the_file_as_the_merge_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, rows: bool
) -> None:
    rng = random.Random(seed)
    pool = _mixed_page()

    def update(pk: int) -> ObjectUpdate:
        r = rng.random()
        n = rng.randrange(1, 80)
        if r < 0.5:
            return _simple("Item", pk, n)
        if r < 0.6:
            return ObjectUpdate("Item", pk, None)
        if r < 0.7:
            base = _create("Item", pk, n)
            setter = Instruction(Op.SET, "Item", pk, _hlc(n + 1), field="qty", value=n)
            return ObjectUpdate("Item", pk, _state(base, setter))
        if r < 0.75:
            base = _create("Item", pk, n)
            return ObjectUpdate(
                "Item", pk, _state(base, Instruction(Op.ERASE, "Item", pk, _hlc(n + 1)))
            )
        other = rng.choice(pool)
        return ObjectUpdate(other.model, other.pk, other.state)

    keys = [*range(1, 12), 100, 101, 104]
    pages = []
    for n in range(3):
        flag = rng.choice([BOOTSTRAP_NONE, BOOTSTRAP_PAGE])
        if n == 2:
            flag = rng.choice([BOOTSTRAP_NONE, BOOTSTRAP_LAST])
        pages.append(([update(rng.choice(keys)) for _ in range(rng.randrange(1, 25))], flag))
    fast_path, slow_path = _pair(tmp_path, prepare=seed % 3 != 0)
    acked = rng.choice([0, 1, 2, 3])
    fast = _run(fast_path, pages, True, monkeypatch, acked=acked, rows=rows)
    slow = _run(slow_path, pages, False, monkeypatch, acked=acked)
    assert fast == slow


def test_rows_that_do_not_match_the_columns_are_applied_as_the_objects_they_stand_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block whose fields are not the file's columns in order (another schema version)
    or a row with a malformed HLC: those rows are applied as the object updates they
    stand for, and the file ends as the merge leaves it."""
    fast_path, slow_path = _pair(tmp_path)
    objects = [_simple("Item", pk, pk) for pk in range(1, 40)]
    blocks, rest = _as_rows(objects, reorder=True)
    assert not rest and blocks[0].fields[0] != "id"
    engine = StoreEngine(fast_path, SCHEMAS)
    try:
        flex = FlexApplier(engine)
        engine.begin(durable=False)
        flex.apply([], BOOTSTRAP_PAGE, 1, 1, blocks)
        engine.commit(())
        fast = _snapshot(engine, {("Item", pk) for pk in range(1, 40)})
    finally:
        engine.close()
    slow = _run(slow_path, [(objects, BOOTSTRAP_PAGE)], False, monkeypatch)
    del slow["received"]
    assert fast == slow
    # a malformed HLC: the row's state is malformed, which the merge path refuses
    (block,) = _as_rows([_simple("Item", 1, 1)])[0]
    block.rows[0][0] = b"\xc1"
    engine = StoreEngine(tmp_path / "bad.sqlite3", SCHEMAS)
    try:
        flex = FlexApplier(engine)
        engine.begin(durable=False)
        with pytest.raises(ValueError):
            flex.apply([], BOOTSTRAP_PAGE, 1, 1, [block])
        engine.rollback()
    finally:
        engine.close()


# --- the pending-instruction cache ---------------------------------------------------------


def _fresh_pending(engine: StoreEngine, acked: int) -> dict[tuple[str, Any], list[Instruction]]:
    """The unacknowledged instructions by object, read from scratch."""
    out: dict[tuple[str, Any], list[Instruction]] = {}
    rows = engine.conn.execute(
        "SELECT data FROM _changelog WHERE version > ? ORDER BY version", (acked,)
    )
    for (data,) in rows:
        for ins in unpack_instructions(data, engine.origin):
            out.setdefault((ins.model, ins.pk), []).append(ins)
    return out


def test_pending_is_read_once_and_follows_the_change_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.sqlite3"
    _prepare(path)
    engine = StoreEngine(path, SCHEMAS)
    other = StoreEngine(path, SCHEMAS)  # the application's connection
    unpacked: list[bytes] = []
    real = subs_mod.unpack_instructions

    def counting(data: bytes, origin: str) -> tuple[Instruction, ...]:
        unpacked.append(data)
        return real(data, origin)

    try:
        flex = FlexApplier(engine)
        first = flex._pending(1)
        assert set(first) == {("Item", 101), ("Item", 104), ("Bag", 1)}
        assert [i.field for i in first[("Item", 104)]] == [None, "qty"]
        monkeypatch.setattr(subs_mod, "unpack_instructions", counting)
        assert flex._pending(1) == first
        assert unpacked == []  # nothing new: nothing read again

        # new local writes: only they are read
        for n in range(3):
            other.begin()
            ins = Instruction(Op.SET, "Item", 100, other.tick(), field="qty", value=n)
            other.apply([ins])
            other.commit([ins])
        got = flex._pending(1)
        assert len(unpacked) == 3
        assert got == _fresh_pending(engine, 1)
        assert [i.value for i in got[("Item", 100)]] == [0, 1, 2]

        # acknowledgements drop instructions from the front, without reading anything
        unpacked.clear()
        for acked in (2, 4, 5, 6, 6):
            assert flex._pending(acked) == _fresh_pending(engine, acked)
        assert len(unpacked) == 0
        assert flex._pending(6) == {}

        # the acknowledged version going back (a new binding): read again, correctly
        assert flex._pending(3) == _fresh_pending(engine, 3)
        assert flex._pending(0) == _fresh_pending(engine, 0)

        # the change log rewritten under the cache (a client reset renumbers it)
        assert flex._pending(0) == _fresh_pending(engine, 0)  # cached: versions 1 to 6
        conn = other.conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM _changelog WHERE version <= 3")
        conn.execute("UPDATE _changelog SET version = -(version - 3) WHERE version > 3")
        conn.execute("UPDATE _changelog SET version = -version WHERE version < 0")
        conn.execute("COMMIT")
        assert flex._pending(0) == _fresh_pending(engine, 0)
        assert set(flex._pending(0)) == {("Item", 100)}
        assert len(flex._pending(0)[("Item", 100)]) == 3
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM _changelog WHERE version = 2")  # a gap in the middle
        conn.execute("COMMIT")
        assert [i.value for i in flex._pending(0)[("Item", 100)]] == [0, 2]
        assert flex._pending(0) == _fresh_pending(engine, 0)
        flex.reset()
        assert flex._pending(1) == _fresh_pending(engine, 1)
    finally:
        other.close()
        engine.close()


def test_many_pages_with_many_pending_writes_read_the_log_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.sqlite3"
    engine = StoreEngine(path, SCHEMAS)
    try:
        for n in range(50):
            _local_create(engine, "Owner", {"id": f"o{n}", "name": None})
        unpacked: list[bytes] = []
        real = subs_mod.unpack_instructions

        def counting(data: bytes, origin: str) -> tuple[Instruction, ...]:
            unpacked.append(data)
            return real(data, origin)

        monkeypatch.setattr(subs_mod, "unpack_instructions", counting)
        flex = FlexApplier(engine)
        for page in range(20):
            engine.begin(durable=False)
            flag = BOOTSTRAP_LAST if page == 19 else BOOTSTRAP_PAGE
            flex.apply([_simple("Item", page * 10 + k, k) for k in range(10)], flag, 1, 0)
            engine.commit(())
        assert len(unpacked) == 50
        count = engine.conn.execute('SELECT COUNT(*) FROM "t_Owner"').fetchone()[0]
        assert count == 50  # pending: not evicted by the bootstrap's end
        assert engine.conn.execute('SELECT COUNT(*) FROM "t_Item"').fetchone()[0] == 200
    finally:
        engine.close()


KEYED = {
    s.name: s
    for s in (
        ModelSchema(
            "ByUuid",
            (FieldSchema("id", Kind.UUID, primary_key=True), FieldSchema("n", Kind.INT)),
            "id",
        ),
        ModelSchema(
            "ByOid",
            (FieldSchema("id", Kind.OBJECTID, primary_key=True), FieldSchema("n", Kind.INT)),
            "id",
        ),
        ModelSchema(
            "ByStr",
            (FieldSchema("id", Kind.STR, primary_key=True), FieldSchema("n", Kind.INT)),
            "id",
        ),
    )
}


def _keyed_state(model: str, pk: Any, n: int, slow: bool) -> ObjectUpdate:
    st_ = ObjectState.empty()
    st_.apply(Instruction(Op.CREATE, model, pk, _hlc(n), value={"id": pk, "n": n}), KEYED[model])
    if slow:  # a later SET: not a lone create, so the merge path applies it
        st_.apply(Instruction(Op.SET, model, pk, _hlc(n + 1), field="n", value=n + 1), KEYED[model])
    return ObjectUpdate(model, pk, st_.to_bytes())


@pytest.mark.parametrize("slow", [False, True])
def test_the_last_page_evicts_only_what_it_did_not_bring(tmp_path: Path, slow: bool) -> None:
    """Keys of every column type: what the bootstrap brought (fast or merged) and what is
    pending stay; what the file held before and the bootstrap left out goes."""
    keys = {
        "ByUuid": [uuid.UUID(int=i) for i in range(1, 5)],
        "ByOid": [ObjectId(bytes([i]) * 12) for i in range(1, 5)],
        "ByStr": ["k1", "k2", "k3", "k4"],
    }
    engine = StoreEngine(tmp_path / "keyed.db", KEYED)
    try:
        applier = FlexApplier(engine)
        engine.begin()  # two objects of each model held from an earlier set
        for model, pks in keys.items():
            for n, pk in enumerate(pks[:2]):
                engine.create(Instruction(Op.CREATE, model, pk, _hlc(n), value={"id": pk, "n": n}))
        engine.commit([])  # no change log entry: as downloaded
        engine.begin()  # a local write not yet uploaded: pending, never evicted
        local = [
            Instruction(Op.CREATE, m, pks[3], engine.tick(), value={"id": pks[3], "n": 9})
            for m, pks in keys.items()
        ]
        for ins in local:
            engine.create(ins)
        assert engine.commit(local) is not None
        engine.begin(durable=False)
        page = [_keyed_state(m, pks[i], i, slow) for m, pks in keys.items() for i in (1, 2)]
        applier.apply(page, BOOTSTRAP_LAST, 0, 0)
        engine.commit((), exact=True)
        for model, pks in keys.items():
            table, col = sv.table_name(model), sv.quote("id")
            raws = {r[0] for r in engine.conn.execute(f"SELECT {col} FROM {table}")}
            held = {sv.from_column(KEYED[model].pk_field, raw, KEYED) for raw in raws}
            assert held == {pks[1], pks[2], pks[3]}, model  # pks[0] evicted
    finally:
        engine.close()
