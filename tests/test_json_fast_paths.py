"""The JSON fast paths equal the general ones: ``converter`` is ``to_json``,
``reader``/``object_reader`` are ``from_json``/``object_from_json`` (errors included),
and ``EventJson.text`` is ``json.dumps`` of the event's JSON form (pure tests)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import uuid
from typing import Any

import pytest

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.jsonvalues import (
    JSONValueError,
    converter,
    from_json,
    object_from_json,
    object_reader,
    reader,
    to_json,
)
from tidesync.core.packing import pack_instructions
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.objectid import ObjectId
from tidesync.server.api.events import (
    EventJson,
    changeset_events,
    create_events,
    encode_json,
    general_events,
)
from tidesync.server.storage.base import LogEntry

TARGET = ModelSchema("T", (FieldSchema("id", Kind.STR, primary_key=True),), "id")
SCHEMAS = {"T": TARGET}
WHEN = dt.datetime(2026, 12, 8, 4, 0, 1, 500, tzinfo=dt.UTC)
#: Stored values of each kind (to JSON), and JSON values to read (right and wrong types).
STORED: dict[Kind, list[Any]] = {
    Kind.STR: ["", "é\u2028x", 'a"b'],
    Kind.BOOL: [True, False],
    Kind.INT: [0, -5, 2**53, -(2**53) - 1, 2**63 - 1],
    Kind.COUNTER: [0, 3, 2**60],
    Kind.FLOAT: [0.0, -1.5, math.inf, -math.inf, math.nan, 3],
    Kind.BYTES: [b"", b"\x00\xff"],
    Kind.DATETIME: [WHEN],
    Kind.DECIMAL: [decimal.Decimal("1.25")],
    Kind.UUID: [uuid.UUID(int=7)],
    Kind.OBJECTID: [ObjectId("65a1f0c2e4b0a1b2c3d4e5f6")],
    Kind.LINK: ["t1"],
}
GIVEN: list[Any] = [
    None, True, False, 0, 1, -7, 2**63, -(2**63) - 1, 2**63 - 1, 1.0, 2.5, math.nan,
    "", "x", "12", "NaN", "Infinity", [], ["a"], {}, {"k": 1},
    "2026-12-08T04:00:00Z", "1.25", "AAE=", "65a1f0c2e4b0a1b2c3d4e5f6",
    "12345678-1234-5678-1234-567812345678",
]  # fmt: skip


def fields() -> list[FieldSchema]:
    out = []
    for kind in STORED:
        for coll in Collection:
            if kind is Kind.COUNTER and coll is not Collection.NONE:
                continue
            for optional in (False, True):
                target = "T" if kind is Kind.LINK else None
                out.append(FieldSchema(f"f_{kind.name}", kind, coll, optional, target=target))
    return out


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types throughout (NaN equal to NaN)."""
    return repr(a) == repr(b)


def wrap(f: FieldSchema, value: Any) -> Any:
    if f.collection is Collection.LIST:
        return [value, value]
    if f.collection is Collection.SET:
        return {value} if not (isinstance(value, float) and math.isnan(value)) else {1.0}
    if f.collection is Collection.DICT:
        return {"k": value}
    return value


@pytest.mark.parametrize("f", fields(), ids=lambda f: f"{f.type_name()}")
def test_converter_is_to_json(f: FieldSchema) -> None:
    convert = converter(f, SCHEMAS)
    for value in [None, *STORED[f.kind]]:
        stored = None if value is None else wrap(f, value)
        assert same(convert(stored), to_json(f, stored, SCHEMAS)), (f, stored)


def outcome(fn: Any, value: Any) -> tuple[str, str]:
    try:
        return ("ok", repr(fn(value)))
    except JSONValueError as exc:
        return ("error", f"{exc} @ {exc.field}")


@pytest.mark.parametrize("f", fields(), ids=lambda f: f"{f.type_name()}")
def test_reader_is_from_json(f: FieldSchema) -> None:
    read = reader(f, "M", SCHEMAS)
    for value in [*GIVEN, *([v] for v in GIVEN), *({"k": v} for v in GIVEN)]:
        expected = outcome(lambda v: from_json(f, v, "M", SCHEMAS), value)
        assert outcome(read, value) == expected, (f, value)


def test_object_reader_is_object_from_json() -> None:
    schema = ModelSchema(
        "M",
        (
            FieldSchema("id", Kind.INT, primary_key=True),
            FieldSchema("name", Kind.STR, optional=True),
            FieldSchema("ratio", Kind.FLOAT),
            FieldSchema("tags", Kind.STR, Collection.SET),
        ),
        "id",
    )
    read = object_reader(schema, SCHEMAS)
    bodies: list[Any] = [
        {"id": 1, "name": "a", "ratio": 2, "tags": ["x"]},
        {"id": "12", "ratio": "NaN"},
        {"id": 1.0, "name": None},
        {"id": True},
        {"id": 2**64},
        {"name": 5},
        {"id": 1, "nope": 2},
        [],
        "x",
        {},
    ]
    for body in bodies:
        expected = outcome(lambda b: object_from_json(schema, b, SCHEMAS, partial=True), body)
        assert outcome(read, body) == expected, body


BOX = ModelSchema(
    "Box",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("name", Kind.STR, optional=True),
        FieldSchema("hits", Kind.COUNTER),
        FieldSchema("tags", Kind.STR, Collection.SET),
        FieldSchema("attrs", Kind.DATETIME, Collection.DICT),
        FieldSchema("items", Kind.BYTES, Collection.LIST),
        FieldSchema("ratio", Kind.FLOAT, optional=True),
    ),
    "id",
)


def box_entry() -> LogEntry:
    ops: list[tuple[Any, ...]] = [
        (Op.CREATE, 1, None, {"id": 1, "name": "é", "hits": 0, "ratio": math.inf}, None),
        (Op.CREATE, 2, None, {"id": 2, "name": None, "gone": 1}, None),  # a field unknown
        (Op.SET, 3, "name", "x", None),
        (Op.ADD, 3, "hits", 2, None),
        (Op.SET_ADD, 3, "tags", "a", None),
        (Op.DICT_SET, 3, "attrs", WHEN, "k"),
        (Op.LIST_INSERT, 3, "items", b"\x01", None),
        (Op.SET, 4, "ratio", math.nan, None),
        (Op.ERASE, 5, None, None, None),
        (Op.SET, 6, "hits", 5, None),
        (Op.ADD, 6, "hits", 1, None),  # after a whole value: the new value
    ]
    instructions = [
        Instruction(op, "Box", pk, HLC(1_796_702_400_000 + i, 0, "dev"), fld, value, key)
        for i, (op, pk, fld, value, key) in enumerate(ops)
    ]
    return LogEntry(9, "dev", 1, pack_instructions(instructions))


def test_event_text_is_json_dumps_of_its_json_form() -> None:
    schemas = {"Box": BOX}
    encoder = EventJson(schemas)
    found = changeset_events(box_entry(), schemas)
    assert len(found) == 6
    for ev in found:
        for user in (None, "u\u00e91"):
            form = encoder.to_json(ev, user)
            assert form == ev.to_json(schemas, user)
            assert encoder.text(ev, user) == json.dumps(form, separators=(",", ":"))
            assert encode_json(form) == json.dumps(form, separators=(",", ":"))
    by_pk = {ev.pk: encoder.to_json(ev, None) for ev in found}
    assert by_pk[2]["fields"] == {"id": 2, "name": None}  # the unknown field left out
    assert by_pk[1]["fields"]["ratio"] == "Infinity"
    assert by_pk[3]["fields"]["hits"] == {"$inc": 2}
    assert by_pk[6]["fields"]["hits"] == 6


def test_whole_value_events_convert_as_the_general_loop_does() -> None:
    schemas = {"Box": BOX}
    encoder = EventJson(schemas)
    for ev in changeset_events(box_entry(), schemas):
        fast = encoder.to_json(ev, "u")
        ev.has_ops = True  # forces the field-by-field loop
        assert encoder.to_json(ev, "u") == fast


def creates_entry(pks: list[Any], *, version: int = 3, model: str = "Box") -> LogEntry:
    instructions = [
        Instruction(Op.CREATE, model, pk, HLC(1_796_702_400_000 - i, i, "d"), None, {"id": pk})
        for i, pk in enumerate(pks)
    ]
    return LogEntry(version, "d", 1, pack_instructions(instructions))


def test_create_only_entries_decode_as_the_general_path_does() -> None:
    schemas = {"Box": BOX}
    many = list(range(40))  # past 15: a longer array header
    entries = [creates_entry([1]), creates_entry(many), creates_entry(list(range(70000))[-3:])]
    entries.append(creates_entry(["a", "b"], model="Unknown"))
    for e in entries:
        fast = create_events(e)
        assert fast is not None
        assert fast == general_events(e, schemas) == changeset_events(e, schemas)
    # the general path's cases: an object twice, other instructions, a create after others
    others = [creates_entry([1, 2, 1]), box_entry()]
    mixed = [
        Instruction(Op.CREATE, "Box", 9, HLC(5, 0, "d"), None, {"id": 9}),
        Instruction(Op.SET, "Box", 9, HLC(6, 0, "d"), "name", "x"),
    ]
    others.append(LogEntry(4, "d", 1, pack_instructions(mixed)))
    others.append(LogEntry(4, "d", 1, pack_instructions(mixed[::-1])))
    for e in others:
        assert create_events(e) is None
        assert same(changeset_events(e, schemas), general_events(e, schemas))  # NaN too
    with pytest.raises(ValueError):
        changeset_events(LogEntry(4, "d", 1, b"\x98\x01"), schemas)
