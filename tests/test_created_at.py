"""``core.merge.created_at``: a state's bytes name a lone CREATE's HLC exactly when the
state is that CREATE's alone (what reconciling a flexible-sync upload relies on)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.merge import ObjectState, created_at
from tidesync.core.packing import pack
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema

PLAIN = ModelSchema(
    "Plain",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("a", Kind.INT),
        FieldSchema("b", Kind.STR, optional=True),
    ),
    "id",
)
MIXED = ModelSchema(
    "Mixed",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("a", Kind.INT),
        FieldSchema("hits", Kind.COUNTER),
        FieldSchema("tags", Kind.STR, Collection.LIST),
    ),
    "id",
)


def _op(schema: ModelSchema, kind: int, hlc: HLC, n: int) -> Instruction:
    if kind == 0:
        value: dict[str, Any] = {"id": "x", "a": n}
        if schema is MIXED:
            value.update(hits=n, tags=[str(n)])
        return Instruction(Op.CREATE, schema.name, "x", hlc, None, value)
    if kind == 1:
        return Instruction(Op.SET, schema.name, "x", hlc, "a", n)
    if kind == 2:
        return Instruction(Op.ERASE, schema.name, "x", hlc, None, None)
    if schema is MIXED:
        return Instruction(Op.ADD, schema.name, "x", hlc, "hits", n)
    return Instruction(Op.SET, schema.name, "x", hlc, "b", str(n))


steps = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 30), st.sampled_from("abc"), st.integers(0, 9)),
    min_size=1,
    max_size=6,
    unique_by=lambda t: (t[1], t[2]),  # HLCs are unique
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([PLAIN, MIXED]), steps)
def test_created_at_names_the_create_exactly_when_the_state_is_its_alone(
    schema: ModelSchema, ops: list[tuple[int, int, str, int]]
) -> None:
    instructions = [_op(schema, k, HLC(wall, 0, origin), n) for k, wall, origin, n in ops]
    state = ObjectState.empty()
    for ins in instructions:
        state.apply(ins, schema)
    data = state.to_bytes()
    found = created_at(data)
    if found is not None:
        lone = ObjectState.empty()
        lone.apply(next(i for i in instructions if i.hlc == found), schema)
        assert lone.to_bytes() == data
    creates = [i for i in instructions if i.op is Op.CREATE]
    if len(instructions) == 1 and creates and schema is PLAIN:
        assert found == creates[0].hlc


def test_a_lone_create_is_recognised_and_anything_more_is_not() -> None:
    h = HLC(5, 0, "a")
    create = Instruction(Op.CREATE, "Plain", "x", h, None, {"id": "x", "a": 1})
    state = ObjectState.empty()
    state.apply(create, PLAIN)
    assert created_at(state.to_bytes()) == h
    state.apply(Instruction(Op.SET, "Plain", "x", HLC(6, 0, "b"), "a", 2), PLAIN)
    assert created_at(state.to_bytes()) is None
    older = ObjectState.empty()
    older.apply(create, PLAIN)
    older.apply(Instruction(Op.SET, "Plain", "x", HLC(4, 0, "b"), "a", 2), PLAIN)  # void
    assert created_at(older.to_bytes()) == h
    erased = ObjectState.empty()
    erased.apply(create, PLAIN)
    erased.apply(Instruction(Op.ERASE, "Plain", "x", HLC(7, 0, "b"), None, None), PLAIN)
    assert created_at(erased.to_bytes()) is None
    assert created_at(None) is None
    assert created_at(b"\xc1") is None
    assert created_at(pack([1, 2, 3])) is None
    assert created_at(pack([1, [5, 0, "a"], None, [5, 0, "a"], {}, {}])) in (None, h)
