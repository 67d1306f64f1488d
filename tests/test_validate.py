"""validate_changeset / validate_value: every refusal names the problem."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from decimal import Decimal
from typing import Any

import pytest

from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.core.validate import validate_changeset, validate_value
from tidesync.objectid import ObjectId

USER = ModelSchema(
    "User", (FieldSchema("id", Kind.UUID, primary_key=True), FieldSchema("name", Kind.STR)), "id"
)
ITEM = ModelSchema(
    "Item",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("title", Kind.STR),
        FieldSchema("n", Kind.INT, optional=True),
        FieldSchema("score", Kind.FLOAT, optional=True),
        FieldSchema("when", Kind.DATETIME, optional=True),
        FieldSchema("price", Kind.DECIMAL, optional=True),
        FieldSchema("oid", Kind.OBJECTID, optional=True),
        FieldSchema("raw", Kind.BYTES, optional=True),
        FieldSchema("done", Kind.BOOL, optional=True),
        FieldSchema("hits", Kind.COUNTER),
        FieldSchema("tags", Kind.STR, Collection.LIST),
        FieldSchema("nums", Kind.FLOAT, Collection.SET),
        FieldSchema("attrs", Kind.INT, Collection.DICT, optional=True),
        FieldSchema("owner", Kind.LINK, optional=True, target="User"),
        FieldSchema("friends", Kind.LINK, Collection.LIST, target="User"),
        FieldSchema("ghost", Kind.LINK, optional=True, target="Nowhere"),
    ),
    "id",
)
SCHEMAS = {"User": USER, "Item": ITEM}
F = ITEM.by_name
U1 = uuid.UUID(int=1)


def H(wall: int, counter: int = 0, origin: str = "o") -> HLC:
    return HLC(wall, counter, origin)


def check(*instructions: Instruction, origin: str = "o", version: int = 1) -> None:
    validate_changeset(Changeset(origin, version, tuple(instructions)), SCHEMAS)


def op(
    op: Op, field: str | None = None, value: Any = None, key: Any = None, **kw: Any
) -> Instruction:
    return Instruction(
        op, kw.get("model", "Item"), kw.get("pk", 1), kw.get("hlc", H(10)), field, value, key
    )


def create(**values: Any) -> Instruction:
    base: dict[str, Any] = {"id": 1, "title": "t"}
    base.update(values)
    return op(Op.CREATE, value={k: v for k, v in base.items() if v is not ...})


def test_a_valid_changeset_passes() -> None:
    check(
        create(
            n=3,
            score=2,
            when=dt.datetime(2024, 1, 1),  # naive: taken as UTC
            price=Decimal("1.50"),
            oid=ObjectId(b"\x00" * 12),
            raw=b"x",
            done=True,
            hits=5,
            tags=["a"],
            nums={1.5, 2},
            attrs={"a": None},
            owner=U1,
            friends=[U1],
        ),
        op(
            Op.SET,
            "when",
            dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            hlc=H(11),
        ),
        op(Op.ADD, "hits", -4, hlc=H(12)),
        op(Op.LIST_INSERT, "tags", "b", H(10), hlc=H(13)),
        op(Op.LIST_INSERT, "friends", U1, None, hlc=H(14)),
        op(Op.LIST_SET, "tags", "c", H(13), hlc=H(15)),
        op(Op.LIST_ERASE, "tags", key=H(13), hlc=H(16)),
        op(Op.SET_ADD, "nums", 3.0, hlc=H(17)),
        op(Op.SET_REMOVE, "nums", 1, hlc=H(18)),
        op(Op.DICT_SET, "attrs", 4, "k", hlc=H(19)),
        op(Op.DICT_ERASE, "attrs", key="k", hlc=H(20)),
        op(Op.ERASE, hlc=H(21)),
    )


@pytest.mark.parametrize(
    ("instruction", "message"),
    [
        (op(Op.SET, "title", "x", model="Nope"), "unknown model 'Nope'"),
        (op(Op.SET, "nope", 1), "has no field 'nope'"),
        (op(Op.SET, "title", 5), "expected str, got int"),
        (op(Op.SET, "n", True), "expected int, got bool"),
        (op(Op.SET, "n", 2**63), "does not fit in 64 bits"),
        (op(Op.SET, "score", 10**400), "too large for a float"),
        (op(Op.SET, "score", False), "expected float, got bool"),
        (op(Op.SET, "score", "1.0"), "expected float"),
        (op(Op.SET, "when", "2024-01-01"), "expected datetime"),
        (op(Op.SET, "price", 1.5), "expected decimal"),
        (op(Op.SET, "oid", "00" * 12), "expected objectid"),
        (op(Op.SET, "raw", "text"), "expected bytes"),
        (op(Op.SET, "title", None), "None is not allowed"),
        (op(Op.SET, "id", 2), "primary key cannot be changed"),
        (op(Op.SET, "hits", 1.5), "counter's value must be an int"),
        (op(Op.SET, "hits", True), "counter's value must be an int"),
        (op(Op.SET, "tags", "abc"), "expected a list"),
        (op(Op.SET, "tags", ["a", 1]), "expected str, got int"),
        (op(Op.SET, "nums", {"x"}), "expected float, got str"),
        (op(Op.SET, "nums", 1.0), "expected a set"),
        (op(Op.SET, "nums", {float("nan")}), "NaN"),
        (op(Op.SET, "attrs", [1]), "expected a dict"),
        (op(Op.SET, "attrs", {1: 1}), "dict keys must be str"),
        (op(Op.SET, "attrs", {"a": "b"}), "expected int, got str"),
        (op(Op.SET, "owner", "not a uuid"), "link to User"),
        (op(Op.SET, "ghost", 1), "link target model 'Nowhere' is unknown"),
        (op(Op.SET, "friends", [U1, 3]), "link to User"),
        (op(Op.SET, "title", "x", pk="1"), "primary key: expected int"),
        (op(Op.SET, "title", "x", pk=True), "primary key: expected int"),
        (op(Op.SET, "title", "x", pk=None), "primary key is missing"),
        (op(Op.SET, "title", "x", hlc=(10, 0, "o")), "is not an HLC"),
        (op(Op.SET, "title", "x", hlc=H(10, 0, "other")), "is not the changeset's"),
        (op(Op.ADD, "n", 1), "ADD applies only to counters"),
        (op(Op.ADD, "hits", 1.0), "amount must be an int"),
        (op(Op.ADD, "hits", True), "amount must be an int"),
        (op(Op.ADD, "hits", -(2**63) - 1), "does not fit in 64 bits"),
        (op(Op.LIST_INSERT, "nums", 1.0), "LIST_INSERT does not apply to a set[float] field"),
        (op(Op.LIST_INSERT, "hits", 1), "does not apply to a counter field"),
        (op(Op.LIST_INSERT, "tags", 1), "expected str, got int"),
        (op(Op.LIST_INSERT, "tags", "a", (1, 0, "o")), "element id: (1, 0, 'o') is not an HLC"),
        (op(Op.LIST_INSERT, "tags", "a", H(10)), "not older than the instruction"),
        (op(Op.LIST_SET, "tags", "a", "id"), "element id: 'id' is not an HLC"),
        (op(Op.LIST_SET, "tags", "a", H(11)), "not older than the instruction"),
        (op(Op.LIST_SET, "tags", None, H(1)), "None is not allowed"),
        (op(Op.LIST_ERASE, "tags", key=None), "is not an HLC"),
        (op(Op.LIST_ERASE, "tags", key=HLC(-1, 0, "o")), "is not an HLC"),
        (op(Op.SET_ADD, "tags", "a"), "SET_ADD does not apply to a list[str] field"),
        (op(Op.SET_ADD, "nums", "a"), "expected float, got str"),
        (op(Op.SET_REMOVE, "nums", float("nan")), "NaN cannot be a set element"),
        (op(Op.DICT_SET, "attrs", 1, 5), "a dict key must be a str"),
        (op(Op.DICT_SET, "attrs", "v", "k"), "expected int, got str"),
        (op(Op.DICT_ERASE, "attrs", key=None), "a dict key must be a str"),
        (op(Op.DICT_SET, "title", "v", "k"), "DICT_SET does not apply to a str field"),
        (op(Op.ERASE, "title"), "an ERASE names no field"),
        (op(Op.CREATE, "title", {"id": 1, "title": "t"}), "a CREATE names no field"),
        (op(Op.CREATE, value=[("id", 1)]), "must be a dict"),
        (create(title=...), "missing required field 'title'"),
        (create(bogus=1), "unknown field 'bogus'"),
        (create(id=2), "primary key field holds 2"),
        (create(hits="many"), "counter's value must be an int"),
        (create(tags=None), "expected a list"),
    ],
)
def test_refusals(instruction: Instruction, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check(instruction)


def test_not_an_instruction() -> None:
    with pytest.raises(ValueError, match="not an instruction"):
        validate_changeset(Changeset("o", 1, ("CREATE",)), SCHEMAS)  # type: ignore[arg-type]


def test_unknown_op() -> None:
    bad = Instruction(99, "Item", 1, H(1), "title", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown instruction op"):
        check(bad)


@pytest.mark.parametrize(
    ("origin", "version", "message"),
    [
        ("", 1, "origin"),
        ("a#b", 1, "origin"),
        ("o", 0, "version"),
        ("o", True, "version"),
    ],
)
def test_changeset_identity(origin: str, version: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(op(Op.ERASE, hlc=H(1, 0, origin)), origin=origin, version=version)


def test_duplicate_timestamps() -> None:
    with pytest.raises(ValueError, match="share the timestamp"):
        check(op(Op.SET, "title", "a"), op(Op.SET, "title", "b"))


def test_validate_value_directly() -> None:
    validate_value(F["score"], 3, SCHEMAS)  # an int is a fine float
    validate_value(F["score"], None, SCHEMAS)
    validate_value(F["nums"], [1.0, 2.0], SCHEMAS)
    validate_value(F["attrs"], {"a": None}, SCHEMAS)  # optional elements
    validate_value(F["owner"], U1, SCHEMAS)
    for field, value in [
        ("title", b"bytes"),
        ("done", 1),
        ("n", 1.0),
        ("tags", None),
        ("hits", None),
        ("owner", 1),
        ("friends", [None]),
    ]:
        with pytest.raises(ValueError, match=repr(field)):
            validate_value(F[field], value, SCHEMAS)


def test_counter_collection_is_refused() -> None:
    bad = FieldSchema("c", Kind.COUNTER, Collection.LIST)
    with pytest.raises(ValueError, match="counter cannot be a collection"):
        validate_value(bad, [1], SCHEMAS)
