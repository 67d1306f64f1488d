"""The push fast paths (issue 8, round 3) agree with the general code they shortcut:
the one-pass CREATE check in ``validate_changeset``, ``created_rows_many``, and the
inlined instruction parse of ``unpack_instructions``."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest

from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.merge import created_rows, created_rows_many
from tidesync.core.packing import instruction_from_list, pack, pack_each, unpack_instructions
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.core.validate import validate_changeset, validate_instruction

ITEM = ModelSchema(
    "Item",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("name", Kind.STR),
        FieldSchema("price", Kind.FLOAT),
        FieldSchema("done", Kind.BOOL),
        FieldSchema("at", Kind.DATETIME, optional=True),
        FieldSchema("note", Kind.STR, optional=True),
    ),
    "id",
)
SCHEMAS = {"Item": ITEM}


def _value(pk: Any, rng: random.Random) -> dict[str, Any]:
    return {
        "id": pk,
        "name": f"n{pk}",
        "price": rng.choice([2, 2.5, -1, 1.0]),
        "done": rng.choice([True, False]),
        "at": rng.choice([None, dt.datetime(2024, 5, 1, 12, 0)]),
        "note": rng.choice([None, "x"]),
    }


def _mutations(rng: random.Random) -> list[dict[str, Any]]:
    """Valid and invalid CREATE values: wrong types, missing / extra / reordered fields,
    out-of-range ints, a pk field not matching the instruction."""
    base = _value(1, rng)
    out: list[dict[str, Any]] = [base, dict(reversed(list(base.items())))]
    for name, bad in [
        ("name", 3),
        ("price", "2"),
        ("price", 2**70),
        ("id", 2**70),
        ("id", True),
        ("id", 1.0),
        ("done", 1),
        ("at", "today"),
        ("note", b"x"),
        ("name", None),
        ("id", 2),
    ]:
        out.append({**base, name: bad})
    out.append({k: v for k, v in base.items() if k != "name"})
    out.append({k: v for k, v in base.items() if k != "note"})
    out.append({**base, "extra": 1})
    out.append({**base, 7: 1})
    return out


def _outcome(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except ValueError as exc:
        return str(exc)
    return None


def test_changeset_check_agrees_with_the_per_instruction_check() -> None:
    rng = random.Random(8)
    cases: list[Instruction] = []
    for value in _mutations(rng):
        cases.append(Instruction(Op.CREATE, "Item", 1, HLC(5, 0, "o"), value=value))
    good = _value(1, rng)
    cases += [
        Instruction(Op.CREATE, "Item", 1, HLC(5, 0, "other"), value=good),
        Instruction(Op.CREATE, "Item", 1, HLC(-1, 0, "o"), value=good),
        Instruction(Op.CREATE, "Item", None, HLC(5, 0, "o"), value=good),
        Instruction(Op.CREATE, "Item", True, HLC(5, 0, "o"), value=good),
        Instruction(Op.CREATE, "Item", 1, HLC(5, 0, "o"), field="name", value=good),
        Instruction(Op.CREATE, "Nope", 1, HLC(5, 0, "o"), value=good),
        Instruction(Op.CREATE, "Item", 1, HLC(5, 0, "o"), value=[good]),
    ]
    accepted = 0
    for ins in cases:
        expected = _outcome(validate_instruction, ins, SCHEMAS, "o")
        for _ in range(2):  # the second time the value's shape is remembered
            got = _outcome(validate_changeset, Changeset("o", 1, (ins,)), SCHEMAS)
            assert got == expected, ins
        accepted += expected is None
    assert 0 < accepted < len(cases)


def test_duplicate_timestamps_are_still_refused() -> None:
    rng = random.Random(1)
    a = Instruction(Op.CREATE, "Item", 1, HLC(5, 0, "o"), value=_value(1, rng))
    b = Instruction(Op.CREATE, "Item", 2, HLC(5, 0, "o"), value=_value(2, rng))
    with pytest.raises(ValueError, match="share the timestamp"):
        validate_changeset(Changeset("o", 1, (a, b)), SCHEMAS)


def test_created_rows_many_gives_the_same_bytes() -> None:
    rng = random.Random(2)
    creates = [
        Instruction(Op.CREATE, "Item", i, HLC(10 + i, 0, "o"), value=_value(i, rng))
        for i in range(200)
    ]
    shuffled = dict(reversed(list(_value(500, rng).items())))
    creates.append(Instruction(Op.CREATE, "Item", 500, HLC(9, 0, "o"), value=shuffled))
    creates.append(
        Instruction(Op.CREATE, "Item", 501, HLC(9, 1, "o"), value={"id": 501, "name": "x"})
    )
    many = created_rows_many(creates, ITEM)
    assert many == [created_rows(ins, ITEM) for ins in creates]
    assert pack_each([1, "a", None]) == [pack(1), pack("a"), pack(None)]
    with pytest.raises(ValueError):
        created_rows_many([Instruction(Op.CREATE, "Item", 1, HLC(1, 0, "o"), value=[1])], ITEM)


def test_unpack_instructions_parses_like_the_single_parser() -> None:
    items: list[Any] = [
        [1, "Item", 1, 5, 0, None, {"id": 1}, None],
        [2, "Item", "k", 5, 3, "note", "x", None],
        [5, "Item", 1, 7, 1, "l", 1, [3, 0, "o"]],
        [True, "Item", 1, 5, 0, None, {"id": 1}, None],
        [10, "Item", 1, 7, 1, "d", 2.5, "key"],
    ]
    data = pack(items)
    parsed = unpack_instructions(data, "o")
    assert list(parsed) == [instruction_from_list(i, "o") for i in items]
    assert all(type(i) is Instruction and type(i.hlc) is HLC for i in parsed)
    for bad in ([1, "", 1, 5, 0, None, {}, None], [1, "Item", 1, 5, 0, None, [1], None]):
        with pytest.raises(ValueError):
            unpack_instructions(pack([items[0], bad]), "o")


def test_gc_pause_nests_across_threads_and_restores_the_collector() -> None:
    import gc
    import threading

    from tidesync.support.gcpause import GCPause

    pause = GCPause()
    assert gc.isenabled()
    inside = threading.Event()
    leave = threading.Event()

    def other() -> None:
        with pause:
            inside.set()
            assert leave.wait(30)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert inside.wait(30)
        assert not gc.isenabled()
        with pause:
            assert not gc.isenabled()
        assert not gc.isenabled()  # the other thread still pauses it
    finally:
        leave.set()
        t.join(30)
    assert gc.isenabled()
    gc.disable()
    try:  # a collector disabled before stays disabled
        with pause:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
