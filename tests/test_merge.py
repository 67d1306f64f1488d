"""The merge laws of docs/merge.md: example tests per rule, then property tests."""

from __future__ import annotations

import datetime as dt
import os
import random
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC, ZERO, HybridClock
from tidesync.core.merge import ObjectState, Replica
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema

USER = ModelSchema(
    "User", (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("name", Kind.STR)), "id"
)
ITEM = ModelSchema(
    "Item",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("title", Kind.STR),
        FieldSchema("note", Kind.STR, optional=True),
        FieldSchema("score", Kind.FLOAT, optional=True),
        FieldSchema("when", Kind.DATETIME, optional=True),
        FieldSchema("flag", Kind.BOOL),
        FieldSchema("hits", Kind.COUNTER),
        FieldSchema("tags", Kind.STR, Collection.LIST),
        FieldSchema("labels", Kind.INT, Collection.SET),
        FieldSchema("attrs", Kind.INT, Collection.DICT),
        FieldSchema("owner", Kind.LINK, optional=True, target="User"),
        FieldSchema("friends", Kind.LINK, Collection.LIST, target="User"),
    ),
    "id",
)
SCHEMAS = {"User": USER, "Item": ITEM}


def H(wall: int, counter: int = 0, origin: str = "a") -> HLC:
    return HLC(wall, counter, origin)


def ins(
    op: Op, hlc: HLC, field: str | None = None, value: Any = None, key: Any = None, pk: Any = "x"
) -> Instruction:
    return Instruction(op, "Item", pk, hlc, field, value, key)


def create(hlc: HLC, pk: str = "x", **values: Any) -> Instruction:
    base: dict[str, Any] = {"id": pk, "title": "t", "flag": False}
    base.update(values)
    return Instruction(Op.CREATE, "Item", pk, hlc, None, base)


def state(*instructions: Instruction) -> ObjectState:
    s = ObjectState.empty()
    for i in instructions:
        s.apply(i, ITEM)
    return s


def render(*instructions: Instruction) -> dict[str, Any] | None:
    """Render, after checking every order gives the same state (and the same bytes)."""
    results = set()
    rng = random.Random(7)
    seq = list(instructions)
    for _ in range(12 if len(seq) > 2 else 2):
        s = state(*seq)
        results.add(s.to_bytes())
        rng.shuffle(seq)
        seq = seq[::-1] if rng.random() < 0.3 else seq
    assert len(results) == 1, "the state depends on the order"
    return state(*instructions).render(ITEM)


# ---------------------------------------------------------------- objects and scalars


def test_render_defaults_every_field() -> None:
    out = render(Instruction(Op.CREATE, "Item", "x", H(1), None, {"id": "x", "title": "t"}))
    assert out == {
        "id": "x",
        "title": "t",
        "note": None,
        "score": None,
        "when": None,
        "flag": None,
        "hits": 0,
        "tags": [],
        "labels": set(),
        "attrs": {},
        "owner": None,
        "friends": [],
    }


def test_scalar_last_writer_wins() -> None:
    out = render(
        create(H(1)), ins(Op.SET, H(3, 0, "b"), "title", "b"), ins(Op.SET, H(3), "title", "a")
    )
    assert out is not None and out["title"] == "b"


def test_set_arriving_before_its_create_still_applies() -> None:
    s = state(ins(Op.SET, H(5), "note", "later"))
    assert not s.alive and s.render(ITEM) is None
    assert s.apply(create(H(2), note="first"), ITEM) is True
    out = s.render(ITEM)
    assert out is not None and out["note"] == "later"


def test_float_and_datetime_values_are_normalised() -> None:
    naive = dt.datetime(2024, 1, 2, 3, 4, 5)
    out = render(create(H(1), score=2, when=naive))
    assert out is not None
    assert type(out["score"]) is float and out["score"] == 2.0
    assert out["when"] == naive.replace(tzinfo=dt.UTC) and out["when"].tzinfo is dt.UTC


def test_erase_wins_over_concurrent_and_later_updates() -> None:
    seq = (
        create(H(1), title="one"),
        ins(Op.ERASE, H(5)),
        ins(Op.SET, H(4, 0, "b"), "title", "concurrent"),
        ins(Op.SET, H(9, 0, "b"), "title", "after"),
        ins(Op.ADD, H(9, 1, "b"), "hits", 3),
    )
    assert render(*seq) is None
    assert not state(*seq).alive


def test_later_create_recreates_with_its_own_values() -> None:
    seq = (
        create(H(1), title="one", note="old note", tags=["a"], labels={1}),
        ins(Op.SET, H(2), "score", 1.5),
        ins(Op.ERASE, H(5)),
        ins(Op.SET, H(6, 0, "b"), "note", "between erase and create"),
        create(H(7, 0, "c"), title="two"),
        ins(Op.SET, H(8, 0, "b"), "score", 9.0),
    )
    out = render(*seq)
    assert out is not None
    assert (out["title"], out["note"], out["score"], out["tags"], out["labels"]) == (
        "two",
        None,
        9.0,
        [],
        set(),
    )


def test_erase_keeps_collection_ops_newer_than_it() -> None:
    seq = (
        ins(Op.ERASE, H(1)),
        create(H(2), labels={7}, hits=100),
        ins(Op.SET, H(3, 0, "b"), "labels", {1}),
        ins(Op.SET_ADD, H(3, 1, "b"), "labels", 2),
        ins(Op.SET, H(3, 2, "b"), "hits", 5),
        ins(Op.ADD, H(3, 3, "b"), "hits", 1),
    )
    out = render(*seq)
    assert out is not None and out["labels"] == {1, 2} and out["hits"] == 6


def test_create_older_than_the_erase_does_not_revive() -> None:
    assert render(create(H(1)), ins(Op.ERASE, H(5)), create(H(3, 0, "b"))) is None


def test_erase_older_than_the_create_is_void() -> None:
    out = render(ins(Op.ERASE, H(1, 0, "b")), create(H(2)), ins(Op.SET, H(3), "note", "n"))
    assert out is not None and out["note"] == "n"


def test_apply_reports_visible_changes_only() -> None:
    s = ObjectState.empty()
    assert s.apply(ins(Op.SET, H(3), "title", "x"), ITEM) is False  # not alive: invisible
    assert s.apply(create(H(1)), ITEM) is True
    assert s.apply(create(H(1)), ITEM) is False  # duplicate
    assert s.apply(ins(Op.SET, H(2), "title", "older"), ITEM) is False
    assert s.apply(ins(Op.SET, H(4), "title", "newer"), ITEM) is True
    assert s.apply(ins(Op.SET, H(4), "title", "newer"), ITEM) is False
    assert s.apply(ins(Op.ERASE, H(6)), ITEM) is True
    assert s.apply(ins(Op.SET, H(7), "title", "zombie"), ITEM) is False
    assert s.last_hlc == H(7)


def test_unknown_field_and_wrong_op_raise() -> None:
    s = state(create(H(1)))
    with pytest.raises(ValueError, match="no field"):
        s.apply(ins(Op.SET, H(2), "nope", 1), ITEM)
    with pytest.raises(ValueError, match="ADD"):
        s.apply(ins(Op.ADD, H(3), "title", 1), ITEM)
    with pytest.raises(ValueError, match="HLC"):
        s.apply(ins(Op.LIST_ERASE, H(4), "tags", key="bad"), ITEM)


# ---------------------------------------------------------------- counters


def test_counter_is_latest_set_plus_later_adds() -> None:
    big = 2**63 - 1  # the sum goes past 64 bits and wraps around (docs/merge.md)
    seq = (
        create(H(1), hits=10),
        ins(Op.ADD, H(2), "hits", 5),  # before the set: void
        ins(Op.SET, H(3, 0, "b"), "hits", 100),
        ins(Op.ADD, H(4), "hits", big),
        ins(Op.ADD, H(4, 1), "hits", big),
        ins(Op.ADD, H(4, 0, "c"), "hits", -1),
        ins(Op.ADD, H(5, 1, "b"), "hits", 2),
    )
    out = render(*seq)
    assert out is not None and out["hits"] == 100 + 2 * big - 1 + 2 - 2**64 == 99


INT64 = st.integers(-(2**63), 2**63 - 1)
EDGE = st.sampled_from([2**63 - 1, -(2**63), 2**62, -(2**62), 2**63 - 2, 1, -1, 0]) | INT64


@settings(max_examples=300, deadline=None)
@given(EDGE, st.lists(EDGE, max_size=8), st.lists(EDGE, max_size=4), st.randoms())
def test_counter_sums_wrap_at_64_bits_in_any_order_with_duplicates(
    base: int, before: list[int], after: list[int], rnd: random.Random
) -> None:
    """Latest set plus every later add, wrapped into int64: the same whatever the order or
    duplication of delivery, through to_bytes, and always a valid counter value again."""
    seq = [create(H(1), hits=0)]
    seq += [ins(Op.ADD, H(2, i, "abc"[i % 3]), "hits", a) for i, a in enumerate(before)]
    seq.append(ins(Op.SET, H(3), "hits", base))
    seq += [ins(Op.ADD, H(4, i, "abc"[i % 3]), "hits", a) for i, a in enumerate(after)]
    expected = wrapped(base + sum(after))
    reference = state(*seq)
    shuffled = seq + [rnd.choice(seq) for _ in range(len(seq) // 2)]
    rnd.shuffle(shuffled)
    got = state(*shuffled)
    assert got.to_bytes() == reference.to_bytes()
    out = got.render(ITEM)
    assert out is not None and out["hits"] == expected
    assert ObjectState.from_bytes(got.to_bytes()).render(ITEM) == out
    # the rendered sum is a value every replica can store and send again
    rep = Replica(SCHEMAS)
    cs = Changeset("z", 1, (create(H(9, 0, "z"), hits=out["hits"]),))
    assert rep.apply_changeset(cs)
    assert rep.snapshot()["Item"]["x"]["hits"] == expected


def test_counter_adds_without_a_set_add_to_the_create_value() -> None:
    out = render(
        create(H(1), hits=1), ins(Op.ADD, H(2), "hits", 2), ins(Op.ADD, H(2, 0, "b"), "hits", 3)
    )
    assert out is not None and out["hits"] == 6


# ---------------------------------------------------------------- lists


def test_list_inserts_at_the_same_anchor_newest_first() -> None:
    seq = (
        create(H(1)),
        ins(Op.LIST_INSERT, H(2), "tags", "a"),
        ins(Op.LIST_INSERT, H(3, 0, "b"), "tags", "b"),
        ins(Op.LIST_INSERT, H(4), "tags", "a1", key=H(2)),
        ins(Op.LIST_INSERT, H(5), "tags", "a2", key=H(2)),
    )
    out = render(*seq)
    assert out is not None and out["tags"] == ["b", "a", "a2", "a1"]
    assert state(*seq).list_ids("tags") == [H(3, 0, "b"), H(2), H(5), H(4)]


def test_list_element_waits_for_its_anchor() -> None:
    s = state(create(H(1)), ins(Op.LIST_INSERT, H(3), "tags", "child", key=H(2)))
    assert s.render(ITEM)["tags"] == []  # type: ignore[index]
    s.apply(ins(Op.LIST_INSERT, H(2), "tags", "parent"), ITEM)
    assert s.render(ITEM)["tags"] == ["parent", "child"]  # type: ignore[index]


def test_list_erase_leaves_a_tombstone_even_before_the_insert() -> None:
    seq = (
        create(H(1)),
        ins(Op.LIST_INSERT, H(2), "tags", "a"),
        ins(Op.LIST_ERASE, H(4, 0, "b"), "tags", key=H(3)),
        ins(Op.LIST_INSERT, H(3), "tags", "b", key=H(2)),
        ins(Op.LIST_INSERT, H(5), "tags", "c", key=H(3)),  # anchored to a tombstone
    )
    out = render(*seq)
    assert out is not None and out["tags"] == ["a", "c"]


def test_list_set_is_last_writer_wins_per_element() -> None:
    seq = (
        create(H(1)),
        ins(Op.LIST_INSERT, H(2), "tags", "a"),
        ins(Op.LIST_SET, H(4), "tags", "late", key=H(2)),
        ins(Op.LIST_SET, H(3, 0, "b"), "tags", "early", key=H(2)),
    )
    out = render(*seq)
    assert out is not None and out["tags"] == ["late"]


def test_whole_list_set_replaces_older_elements() -> None:
    s = state(create(H(1), tags=["a", "b"]), ins(Op.LIST_INSERT, H(2), "tags", "c"))
    ids = s.list_ids("tags")
    assert ids[1:] == [HLC(1, 0, "a#0"), HLC(1, 0, "a#1")]
    seq = (
        create(H(1), tags=["a", "b"]),
        ins(Op.LIST_INSERT, H(2), "tags", "c"),
        ins(Op.SET, H(5, 0, "b"), "tags", ["x", "y"]),
        ins(Op.LIST_SET, H(4), "tags", "void", key=HLC(1, 0, "a#0")),  # older than the SET
        ins(Op.LIST_INSERT, H(6), "tags", "after x", key=HLC(5, 0, "b#0")),
        ins(Op.LIST_INSERT, H(7, 0, "c"), "tags", "orphan", key=HLC(1, 0, "a#1")),
        ins(Op.LIST_SET, H(8), "tags", "Y", key=HLC(5, 0, "b#1")),
    )
    out = render(*seq)
    assert out is not None and out["tags"] == ["x", "after x", "Y", "orphan"]


def test_element_ops_on_cleared_elements_are_void() -> None:
    seq = (
        create(H(1), tags=["a"]),
        ins(Op.SET, H(3), "tags", ["b"]),
        ins(Op.LIST_ERASE, H(4, 0, "b"), "tags", key=HLC(1, 0, "a#0")),
    )
    out = render(*seq)
    assert out is not None and out["tags"] == ["b"]
    assert len(state(*seq).to_bytes()) == len(state(*seq[:2]).to_bytes())


def test_long_chain_renders_without_recursion() -> None:
    s = state(create(H(1)))
    prev = None
    for i in range(3000):
        s.apply(ins(Op.LIST_INSERT, H(2 + i), "tags", str(i), key=prev), ITEM)
        prev = H(2 + i)
    out = s.render(ITEM)
    assert out is not None and out["tags"] == [str(i) for i in range(3000)]


# ---------------------------------------------------------------- sets and dicts


def test_set_last_add_or_remove_wins_per_element() -> None:
    seq = (
        create(H(1), labels={1, 2}),
        ins(Op.SET_REMOVE, H(3), "labels", 1),
        ins(Op.SET_ADD, H(2, 0, "b"), "labels", 1),  # older than the remove
        ins(Op.SET_ADD, H(4, 0, "b"), "labels", 3),
        ins(Op.SET_REMOVE, H(4, 1), "labels", 3),
        ins(Op.SET_ADD, H(5), "labels", 4),
    )
    out = render(*seq)
    assert out is not None and out["labels"] == {2, 4}


def test_whole_set_write_voids_older_element_ops() -> None:
    seq = (
        create(H(1), labels={1}),
        ins(Op.SET_ADD, H(2), "labels", 2),
        ins(Op.SET, H(4, 0, "b"), "labels", {7, 8}),
        ins(Op.SET_REMOVE, H(3), "labels", 7),  # older than the whole write
        ins(Op.SET_REMOVE, H(5), "labels", 8),
    )
    out = render(*seq)
    assert out is not None and out["labels"] == {7}


SPELLED = ModelSchema(
    "Spelled",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("ds", Kind.DECIMAL, Collection.SET),
        FieldSchema("fs", Kind.FLOAT, Collection.SET),
    ),
    "id",
)
DECS = [Decimal("1"), Decimal("1.0"), Decimal("1.00"), Decimal("-0"), Decimal("0"), Decimal("2")]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(DECS), st.booleans()), max_size=8),
    st.lists(st.tuples(st.sampled_from([0.0, -0.0, 1.0, 1, 2.5]), st.booleans()), max_size=8),
    st.sets(st.sampled_from(DECS)),
    st.randoms(),
)
def test_set_elements_equal_but_spelled_differently_converge(
    decs: list[tuple[Decimal, bool]],
    floats: list[tuple[float, bool]],
    base: set[Decimal],
    rnd: random.Random,
) -> None:
    """Equal set elements with other spellings (``Decimal("1")``/``"1.0"``, ``0.0``/``-0.0``)
    end as the same bytes on every replica, whatever the order and duplication."""
    seq = [Instruction(Op.CREATE, "Spelled", "x", H(1), None, {"id": "x", "ds": base})]
    for i, (d, add) in enumerate(decs):
        op = Op.SET_ADD if add else Op.SET_REMOVE
        seq.append(Instruction(op, "Spelled", "x", H(2 + i // 3, 0, "abc"[i % 3]), "ds", d))
    for i, (f, add) in enumerate(floats):
        op = Op.SET_ADD if add else Op.SET_REMOVE
        seq.append(Instruction(op, "Spelled", "x", H(2 + i // 3, 1, "abc"[i % 3]), "fs", f))

    def fold(items: list[Instruction]) -> ObjectState:
        s = ObjectState.empty()
        for i in items:
            s.apply(i, SPELLED)
        return s

    reference = fold(seq)
    shuffled = seq + [rnd.choice(seq) for _ in range(len(seq) // 2)]
    rnd.shuffle(shuffled)
    got = fold(shuffled)
    assert got.to_bytes() == reference.to_bytes()
    out, want = got.render(SPELLED), reference.render(SPELLED)
    assert out is not None and want is not None
    assert sorted(map(repr, out["ds"])) == sorted(map(repr, want["ds"]))
    assert all(repr(f) != "-0.0" for f in out["fs"])  # one zero element, 0.0


def test_dict_per_key_last_writer_wins_and_whole_write_replaces() -> None:
    seq = (
        create(H(1), attrs={"a": 1, "b": 2}),
        ins(Op.DICT_SET, H(2), "attrs", 5, key="a"),
        ins(Op.DICT_ERASE, H(3, 0, "b"), "attrs", key="a"),
        ins(Op.DICT_SET, H(2, 5, "c"), "attrs", 9, key="c"),
        ins(Op.DICT_SET, H(4), "attrs", 3, key="d"),
    )
    out = render(*seq)
    assert out is not None and out["attrs"] == {"b": 2, "c": 9, "d": 3}
    out = render(*seq, ins(Op.SET, H(3, 5), "attrs", {"z": 0}))
    assert out is not None and out["attrs"] == {"z": 0, "d": 3}


# ---------------------------------------------------------------- bytes


def test_to_bytes_round_trips_every_kind_of_state() -> None:
    seq = [
        create(H(1), tags=["a"], labels={1, 2}, attrs={"k": 1}, hits=3, score=1.0),
        ins(Op.SET, H(2), "note", "n"),
        ins(Op.ADD, H(3), "hits", 4),
        ins(Op.LIST_INSERT, H(4), "tags", "b", key=HLC(1, 0, "a#0")),
        ins(Op.LIST_ERASE, H(5), "tags", key=H(9, 0, "z")),
        ins(Op.SET_REMOVE, H(6), "labels", 1),
        ins(Op.DICT_ERASE, H(7), "attrs", key="k"),
        ins(Op.SET, H(8), "labels", {5}),
    ]
    s = state(*seq)
    copy = ObjectState.from_bytes(s.to_bytes())
    assert copy.render(ITEM) == s.render(ITEM)
    assert copy.to_bytes() == s.to_bytes() and copy.last_hlc == s.last_hlc
    assert copy.list_ids("tags") == s.list_ids("tags")
    more = ins(Op.LIST_INSERT, H(9, 0, "z"), "tags", "gone", key=None)
    s.apply(more, ITEM)
    copy.apply(more, ITEM)
    assert copy.to_bytes() == s.to_bytes()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        b"\x96\x02\xc0\xc0\xc0\x80\x80",
        b"\x96\x01\xc0\xc0\xc0\x81\xa1a\x01\x80",
    ],
)
def test_from_bytes_rejects_malformed_data(data: bytes) -> None:
    with pytest.raises(ValueError):
        ObjectState.from_bytes(data)


def test_empty_state() -> None:
    s = ObjectState.empty()
    assert not s.alive and s.render(ITEM) is None and s.last_hlc == ZERO
    assert s.list_ids("tags") == []
    assert ObjectState.from_bytes(s.to_bytes()).to_bytes() == s.to_bytes()


# ---------------------------------------------------------------- replica


def test_replica_applies_each_changeset_once() -> None:
    r = Replica(SCHEMAS)
    cs1 = Changeset("a", 1, (create(H(1)),))
    cs3 = Changeset("a", 3, (ins(Op.ADD, H(5), "hits", 1),))
    assert r.apply_changeset(cs1) and not r.apply_changeset(cs1)
    assert r.apply_changeset(cs3) and not r.apply_changeset(cs3)
    assert r.has_applied("a", 3) and not r.has_applied("a", 2) and not r.has_applied("b", 1)
    assert r.apply_changeset(Changeset("a", 2, (ins(Op.ADD, H(3), "hits", 10),)))
    assert r.has_applied("a", 2) and not r.has_applied("a", 4)
    assert r.snapshot()["Item"]["x"]["hits"] == 11
    assert r.snapshot()["User"] == {}


def test_replica_refuses_an_invalid_changeset_before_applying_anything() -> None:
    r = Replica(SCHEMAS)
    bad = Changeset("a", 1, (create(H(1)), ins(Op.SET, H(2), "title", 5)))
    with pytest.raises(ValueError):
        r.apply_changeset(bad)
    assert r.objects == {} and not r.has_applied("a", 1)


# ---------------------------------------------------------------- property tests

PKS = ("p", "q")


class Sim:
    """Replicas that edit from their local view and sync through a server log."""

    def __init__(self, n: int, skews: list[int]) -> None:
        self.replicas = [Replica(SCHEMAS) for _ in range(n)]
        self.clocks = [HybridClock(f"r{i}") for i in range(n)]
        self.skews = skews
        self.versions = [0] * n
        self.cursor = [0] * n
        self.log: list[Changeset] = []
        self.now = 1000

    def tick(self, r: int) -> HLC:
        return self.clocks[r].tick(self.now + self.skews[r])

    def sync(self, r: int, upto: int | None = None) -> None:
        end = len(self.log) if upto is None else min(len(self.log), upto)
        for cs in self.log[self.cursor[r] : end]:
            if cs.origin != f"r{r}":
                self.replicas[r].apply_changeset(cs)
                for i in cs.instructions:
                    self.clocks[r].observe(i.hlc, self.now)
        self.cursor[r] = max(self.cursor[r], end)

    def commit(self, r: int, instructions: list[Instruction]) -> None:
        self.versions[r] += 1
        cs = Changeset(f"r{r}", self.versions[r], tuple(instructions))
        assert self.replicas[r].apply_changeset(cs)
        self.log.append(cs)

    def step(self, r: int, action: int, a: int, b: int) -> None:
        self.now += a % 3
        pk = PKS[b % 2]
        obj = self.replicas[r].objects.get(("Item", pk))
        ids = obj.list_ids("tags") if obj is not None else []
        out: list[Instruction] = []

        def add(op: Op, field: str | None = None, value: Any = None, key: Any = None) -> None:
            out.append(Instruction(op, "Item", pk, self.tick(r), field, value, key))

        if action == 0:
            values: dict[str, Any] = {"id": pk, "title": f"t{a % 3}", "flag": a % 2 == 0}
            if a % 4:
                values.update(hits=a % 5, tags=[f"c{a % 3}", "d"], labels={a % 4, 9})
                values.update(attrs={"k": a % 3}, owner=a % 2, friends=[1, 2][: a % 3])
            add(Op.CREATE, value=values)
            if b % 3 == 0:
                add(Op.SET, "note", f"n{a}")
        elif action == 1:
            add(Op.ERASE)
        elif action == 2:
            name, value = [
                ("title", f"s{a % 4}"),
                ("note", None if a % 3 == 0 else f"n{a % 4}"),
                ("score", [None, 0.5, 2.0][a % 3]),
                ("flag", a % 2 == 1),
                ("owner", None if a % 3 == 0 else a % 3),
            ][b % 5]
            add(Op.SET, name, value)
        elif action == 3:
            add(Op.ADD, "hits", a % 7 - 2 + BIG_ADDS[b % 7])
        elif action == 4:
            add(Op.SET, "hits", a % 6 if b % 4 else BIG_SETS[a % 2])
        elif action == 5:
            pos = a % (len(ids) + 1)
            add(Op.LIST_INSERT, "tags", f"e{a % 5}", None if pos == 0 else ids[pos - 1])
        elif action == 6 and ids:
            add(Op.LIST_ERASE, "tags", key=ids[a % len(ids)])
        elif action == 7 and ids:
            add(Op.LIST_SET, "tags", f"v{a % 3}", ids[a % len(ids)])
        elif action == 8:
            add(Op.SET, "tags", [f"w{i}" for i in range(a % 3)])
        elif action == 9:
            add(Op.SET_ADD if b % 3 else Op.SET_REMOVE, "labels", a % 4)
        elif action == 10:
            add(Op.SET, "labels", {a % 4, (a + b) % 5})
        elif action == 11:
            if b % 3:
                add(Op.DICT_SET, "attrs", a % 5, f"k{a % 3}")
            else:
                add(Op.DICT_ERASE, "attrs", key=f"k{a % 3}")
        elif action == 12:
            add(Op.SET, "attrs", {f"k{a % 3}": b % 4})
        elif action == 13:
            self.sync(r, self.cursor[r] + a % 4 + 1)
        elif action == 14:
            fids = obj.list_ids("friends") if obj is not None else []
            pos = a % (len(fids) + 1)
            add(Op.LIST_INSERT, "friends", a % 3, None if pos == 0 else fids[pos - 1])
        if out:
            self.commit(r, out)


#: Counter amounts and values at the 64-bit bounds, so sums wrap (a % 7 - 2 is added).
BIG_ADDS = (0, 0, 0, 2**62, 2**63 - 5, -(2**63) + 2, -(2**62))
BIG_SETS = (2**63 - 1, -(2**63))


def wrapped(total: int) -> int:
    """The oracle of counter sums: two's complement wrap-around into int64."""
    return (total + 2**63) % 2**64 - 2**63


steps_strategy = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.integers(0, 14),
        st.integers(0, 40),
        st.integers(0, 40),
    ),
    min_size=1,
    max_size=40,
)


def run_sim(n: int, skews: list[int], steps: list[tuple[int, int, int, int]]) -> Sim:
    sim = Sim(n, skews)
    for r, action, a, b in steps:
        sim.step(r % n, action, a, b)
    return sim


def fingerprint(rep: Replica) -> tuple[Any, dict[tuple[str, Any], bytes]]:
    return rep.snapshot(), {k: s.to_bytes() for k, s in rep.objects.items()}


def apply_all(changesets: list[Changeset]) -> Replica:
    rep = Replica(SCHEMAS)
    for cs in changesets:
        rep.apply_changeset(cs)
    return rep


# TIDESYNC_MERGE_EXAMPLES raises the example count for a soak run.
SIM = settings(
    max_examples=int(os.environ.get("TIDESYNC_MERGE_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SIM
@given(
    st.integers(2, 4),
    st.lists(st.integers(0, 3), min_size=4, max_size=4),
    steps_strategy,
    st.randoms(),
)
def test_any_order_with_duplicates_converges(
    n: int, skews: list[int], steps: list[tuple[int, int, int, int]], rnd: random.Random
) -> None:
    sim = run_sim(n, skews, steps)
    reference = fingerprint(apply_all(sim.log))
    shuffled = (
        list(sim.log) + [rnd.choice(sim.log) for _ in range(len(sim.log) // 2)] if sim.log else []
    )
    rnd.shuffle(shuffled)
    assert fingerprint(apply_all(shuffled)) == reference
    # Every replica applied its own changesets first, then the others in server order.
    for r in range(n):
        sim.sync(r)
        assert fingerprint(sim.replicas[r]) == reference


@SIM
@given(st.integers(2, 4), st.lists(st.integers(0, 3), min_size=4, max_size=4), steps_strategy)
def test_own_first_equals_server_order(
    n: int, skews: list[int], steps: list[tuple[int, int, int, int]]
) -> None:
    sim = run_sim(n, skews, steps)
    reference = fingerprint(apply_all(sim.log))
    for r in range(n):
        own = [cs for cs in sim.log if cs.origin == f"r{r}"]
        assert fingerprint(apply_all(own + sim.log)) == reference


def _latest(items: list[Instruction]) -> Instruction | None:
    return max(items, key=lambda i: i.hlc) if items else None


@SIM
@given(st.integers(2, 4), st.lists(st.integers(0, 3), min_size=4, max_size=4), steps_strategy)
def test_rules_match_a_brute_force_oracle(
    n: int, skews: list[int], steps: list[tuple[int, int, int, int]]
) -> None:
    sim = run_sim(n, skews, steps)
    snap = apply_all(sim.log).snapshot()["Item"]
    every = [i for cs in sim.log for i in cs.instructions]
    for pk in PKS:
        mine = [i for i in every if i.pk == pk]
        creates = [i for i in mine if i.op is Op.CREATE]
        erases = [i for i in mine if i.op is Op.ERASE]
        alive = bool(creates) and (not erases or _latest(creates).hlc > _latest(erases).hlc)  # type: ignore[union-attr]
        assert (pk in snap) == alive
        if not alive:
            continue
        got = snap[pk]

        def whole(field: str, default: Any, mine: list[Instruction] = mine) -> tuple[HLC, Any]:
            """The latest whole write of a field: a CREATE or a SET."""
            w = _latest(
                [i for i in mine if i.op is Op.CREATE or (i.op is Op.SET and i.field == field)]
            )
            assert w is not None
            return w.hlc, (w.value.get(field, default) if w.op is Op.CREATE else w.value)

        for field in ("title", "note", "score", "flag", "owner"):
            assert got[field] == whole(field, None)[1]
        base_hlc, base = whole("hits", 0)
        adds = [i.value for i in mine if i.op is Op.ADD and i.hlc > base_hlc]
        assert got["hits"] == wrapped(base + sum(adds))
        base_hlc, items = whole("labels", set())
        labels = {e: (base_hlc, True) for e in items}
        for i in sorted(
            (i for i in mine if i.op in (Op.SET_ADD, Op.SET_REMOVE)), key=lambda i: i.hlc
        ):
            if i.hlc > base_hlc:
                labels[i.value] = (i.hlc, i.op is Op.SET_ADD)
        assert got["labels"] == {e for e, (_, present) in labels.items() if present}
        base_hlc, items = whole("attrs", {})
        attrs: dict[str, Any] = dict(items)
        for i in sorted(
            (i for i in mine if i.op in (Op.DICT_SET, Op.DICT_ERASE)), key=lambda i: i.hlc
        ):
            if i.hlc > base_hlc:
                attrs.pop(i.key, None)
                if i.op is Op.DICT_SET:
                    attrs[i.key] = i.value
        assert got["attrs"] == attrs
        # Every visible list value was written by the latest whole write or a later op.
        base_hlc, items = whole("tags", [])
        later = {
            i.value for i in mine if i.field == "tags" and i.hlc > base_hlc and i.op is not Op.SET
        }
        assert set(got["tags"]) <= set(items) | later


@SIM
@given(
    st.integers(2, 4),
    st.lists(st.integers(0, 3), min_size=4, max_size=4),
    steps_strategy,
    st.integers(0, 1000),
)
def test_bytes_round_trip_then_merge_identically(
    n: int, skews: list[int], steps: list[tuple[int, int, int, int]], cut: int
) -> None:
    sim = run_sim(n, skews, steps)
    every = [i for cs in sim.log for i in cs.instructions]
    cut = cut % (len(every) + 1)
    rng = random.Random(cut)
    rng.shuffle(every)
    originals: dict[tuple[str, Any], ObjectState] = {}
    for i in every[:cut]:
        originals.setdefault((i.model, i.pk), ObjectState.empty()).apply(i, SCHEMAS[i.model])
    copies = {k: ObjectState.from_bytes(s.to_bytes()) for k, s in originals.items()}
    for k, s in originals.items():
        assert copies[k].render(ITEM) == s.render(ITEM)
        assert copies[k].list_ids("tags") == s.list_ids("tags")
    for i in every[cut:]:
        for states in (originals, copies):
            states.setdefault((i.model, i.pk), ObjectState.empty()).apply(i, SCHEMAS[i.model])
    for k, s in originals.items():
        assert copies[k].render(ITEM) == s.render(ITEM)
        assert copies[k].to_bytes() == s.to_bytes()
