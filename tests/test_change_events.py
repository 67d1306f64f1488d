"""``server/api/events.py``: one change event per object per changeset, the field changes
folded as docs/backend.md "Change feed" says (pure tests on packed log entries)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack_instructions
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.server.api.events import changeset_events, iso_millis
from tidesync.server.storage.base import LogEntry

BOX = ModelSchema(
    "Box",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("name", Kind.STR, optional=True),
        FieldSchema("hits", Kind.COUNTER),
        FieldSchema("tags", Kind.STR, Collection.SET),
        FieldSchema("attrs", Kind.DATETIME, Collection.DICT),
        FieldSchema("items", Kind.BYTES, Collection.LIST),
        FieldSchema("big", Kind.INT, optional=True),
    ),
    "id",
)
SCHEMAS = {"Box": BOX}
WHEN = dt.datetime(2026, 12, 8, 4, 0, tzinfo=dt.UTC)


def entry(*ops: tuple[Any, ...], version: int = 7) -> LogEntry:
    instructions = [
        Instruction(op, "Box", pk, HLC(1_796_702_400_000 + i, 0, "dev"), fld, value, key)
        for i, (op, pk, fld, value, key) in enumerate(ops)
    ]
    return LogEntry(version, "dev", 1, pack_instructions(instructions))


def events(*ops: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [e.to_json(SCHEMAS, "u1") for e in changeset_events(entry(*ops), SCHEMAS)]


def test_a_create_gives_every_value_in_json_form() -> None:
    value = {"id": 1, "name": "a", "hits": 0, "tags": {"y", "x"}, "attrs": {"d": WHEN}}
    value |= {"items": [b"\x00"], "big": 2**60}
    (ev,) = events((Op.CREATE, 1, None, value, None))
    assert ev["op"] == "create" and ev["pk"] == 1 and ev["version"] == 7
    assert ev["fields"] == {
        "id": 1,
        "name": "a",
        "hits": 0,
        "tags": ["x", "y"],
        "attrs": {"d": "2026-12-08T04:00:00.000000Z"},
        "items": ["AA=="],
        "big": str(2**60),
    }
    assert ev["by"] == {"user_id": "u1", "origin": "dev"}
    assert ev["at"] == "2026-12-08T04:00:00.000Z"


def test_element_changes_fold_into_operations() -> None:
    elem = HLC(5, 0, "other")
    (ev,) = events(
        (Op.SET, 1, "name", "b", None),
        (Op.ADD, 1, "hits", 2, None),
        (Op.ADD, 1, "hits", 3, None),
        (Op.SET_ADD, 1, "tags", "x", None),
        (Op.SET_REMOVE, 1, "tags", "y", None),
        (Op.DICT_SET, 1, "attrs", WHEN, "d"),
        (Op.DICT_ERASE, 1, "attrs", None, "e"),
        (Op.LIST_INSERT, 1, "items", b"\x01", None),
        (Op.LIST_SET, 1, "items", b"\x02", elem),
        (Op.LIST_ERASE, 1, "items", None, elem),
    )
    assert ev["op"] == "update"
    assert ev["fields"] == {
        "name": "b",
        "hits": {"$inc": 5},
        "tags": {"$add": ["x"], "$remove": ["y"]},
        "attrs": {"$set": {"d": "2026-12-08T04:00:00.000000Z"}, "$unset": ["e"]},
        "items": {"$insert": ["AQ=="], "$replace": ["Ag=="], "$erase": 1},
    }
    assert ev["at"] == iso_millis(1_796_702_400_009)


def test_operations_after_a_whole_value_give_the_new_value() -> None:
    (ev,) = events(
        (Op.CREATE, 1, None, {"id": 1, "hits": 1, "tags": {"a"}, "attrs": {}}, None),
        (Op.ADD, 1, "hits", 4, None),
        (Op.SET_ADD, 1, "tags", "b", None),
        (Op.DICT_SET, 1, "attrs", WHEN, "k"),
    )
    assert ev["op"] == "create"
    assert ev["fields"]["hits"] == 5 and ev["fields"]["tags"] == ["a", "b"]
    assert ev["fields"]["attrs"] == {"k": "2026-12-08T04:00:00.000000Z"}


def test_one_event_per_object_in_first_touch_order_and_erase_wins() -> None:
    got = events(
        (Op.CREATE, 2, None, {"id": 2}, None),
        (Op.SET, 1, "name", "x", None),
        (Op.ERASE, 2, None, None, None),
        (Op.SET, 2, "name", "after erase", None),
        (Op.ERASE, 3, None, None, None),
        (Op.CREATE, 3, None, {"id": 3, "name": "again"}, None),
    )
    assert [(e["pk"], e["op"], e["fields"]) for e in got] == [
        (2, "erase", {}),
        (1, "update", {"name": "x"}),
        (3, "create", {"id": 3, "name": "again"}),
    ]


def test_an_unknown_model_keeps_its_raw_primary_key_and_no_fields() -> None:
    ins = Instruction(Op.SET, "Gone", "k", HLC(1, 0, "dev"), "f", 1, None)
    raw = LogEntry(3, "dev", 1, pack_instructions([ins]))
    (ev,) = changeset_events(raw, SCHEMAS)
    assert ev.to_json(SCHEMAS, None) | {"at": ""} == {
        "version": 3,
        "model": "Gone",
        "pk": "k",
        "op": "update",
        "fields": {},
        "by": {"user_id": None, "origin": "dev"},
        "at": "",
    }
