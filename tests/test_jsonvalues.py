"""core/jsonvalues.py: every field type's value survives to_json -> JSON text -> from_json,
and what does not fit a field is a JSONValueError naming it."""

from __future__ import annotations

import datetime as _dt
import json
import math
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidesync.core.jsonvalues import (
    JSONValueError,
    from_json,
    object_from_json,
    object_to_json,
    pk_from_json,
    to_json,
)
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.objectid import ObjectId

INT64 = st.integers(-(2**63), 2**63 - 1)
DATETIMES = st.datetimes(min_value=_dt.datetime(1, 1, 2), max_value=_dt.datetime(9999, 12, 30)).map(
    lambda d: d.replace(tzinfo=_dt.UTC)
)
DECIMALS = st.decimals(allow_nan=False, allow_infinity=False, places=None) | st.decimals(
    allow_nan=False, allow_infinity=False, places=4
)
SCALARS: dict[Kind, st.SearchStrategy[Any]] = {
    Kind.BOOL: st.booleans(),
    Kind.INT: INT64,
    Kind.COUNTER: INT64,
    Kind.FLOAT: st.floats(allow_nan=True, allow_infinity=True),
    Kind.STR: st.text(),
    Kind.BYTES: st.binary(),
    Kind.DATETIME: DATETIMES,
    Kind.DECIMAL: DECIMALS,
    Kind.UUID: st.uuids(),
    Kind.OBJECTID: st.binary(min_size=12, max_size=12).map(ObjectId),
}
TARGET = ModelSchema("Target", (FieldSchema("id", Kind.UUID, primary_key=True),), "id")
SCHEMAS = {"Target": TARGET}


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and the sign of zero kept."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return str(a) == str(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def through_text(field: FieldSchema, value: Any) -> Any:
    """``value`` to JSON text and back."""
    text = json.dumps(to_json(field, value, SCHEMAS), allow_nan=False)
    return from_json(field, json.loads(text), "M", SCHEMAS)


@st.composite
def field_and_value(draw: st.DrawFn) -> tuple[FieldSchema, Any]:
    kind = draw(st.sampled_from([*SCALARS, Kind.LINK]))
    elem = st.uuids() if kind is Kind.LINK else SCALARS[kind]
    target = "Target" if kind is Kind.LINK else None
    coll = Collection.NONE if kind is Kind.COUNTER else draw(st.sampled_from(list(Collection)))
    optional = kind is not Kind.COUNTER and draw(st.booleans())
    field = FieldSchema("f", kind, coll, optional, target)
    item = st.none() | elem if optional else elem
    if coll is Collection.NONE:
        return field, draw(item)
    if coll is Collection.LIST:
        return field, draw(st.lists(item, max_size=5))
    if coll is Collection.DICT:
        return field, draw(st.dictionaries(st.text(max_size=5), item, max_size=5))
    if kind is Kind.FLOAT:
        elem = st.floats(allow_nan=False)
        item = st.none() | elem if optional else elem
    return field, draw(st.sets(item, max_size=5))


@settings(max_examples=400, deadline=None)
@given(field_and_value())
def test_every_value_survives_json_text(case: tuple[FieldSchema, Any]) -> None:
    field, value = case
    back = through_text(field, value)
    if field.collection is Collection.SET:
        assert isinstance(back, set) and back == value
    else:
        assert same(back, value), (field, value, back)


@settings(max_examples=200, deadline=None)
@given(INT64)
def test_ints_are_numbers_when_safe_and_strings_beyond(n: int) -> None:
    field = FieldSchema("n", Kind.INT)
    out = to_json(field, n)
    assert isinstance(out, int) == (abs(n) <= 2**53 - 1)
    assert from_json(field, out, "M") == n


def test_datetimes_with_offsets_or_none_are_taken_as_utc() -> None:
    field = FieldSchema("at", Kind.DATETIME)
    at = from_json(field, "2026-12-08T05:53:15+02:00", "M")
    assert at == _dt.datetime(2026, 12, 8, 3, 53, 15, tzinfo=_dt.UTC)
    assert to_json(field, at) == "2026-12-08T03:53:15.000000Z"
    assert from_json(field, "2026-12-08T03:53:15", "M") == at


@pytest.mark.parametrize(
    ("kind", "value", "words"),
    [
        (Kind.INT, "12x", "an integer"),
        (Kind.INT, 2**63, "64 bits"),
        (Kind.INT, True, "a boolean"),
        (Kind.DECIMAL, 1.5, "decimal string"),
        (Kind.BYTES, "not base64!", "base64"),
        (Kind.UUID, "nope", "UUID"),
        (Kind.OBJECTID, "abc", "24 hexadecimal"),
        (Kind.DATETIME, "yesterday", "ISO 8601"),
        (Kind.STR, None, "null is not allowed"),
        (Kind.BOOL, "true", "true or false"),
    ],
)
def test_a_value_that_does_not_fit_names_the_field(kind: Kind, value: Any, words: str) -> None:
    with pytest.raises(JSONValueError) as caught:
        from_json(FieldSchema("f", kind), value, "Model")
    assert caught.value.field == "Model.f" and words in str(caught.value)


def test_objects_name_unknown_and_missing_fields_and_pks_come_from_urls() -> None:
    schema = ModelSchema(
        "Task",
        (
            FieldSchema("id", Kind.INT, primary_key=True),
            FieldSchema("title", Kind.STR),
            FieldSchema("tags", Kind.STR, Collection.SET),
        ),
        "id",
    )
    with pytest.raises(JSONValueError, match="'colour'"):
        object_from_json(schema, {"id": 1, "title": "a", "colour": 2})
    with pytest.raises(JSONValueError, match=r"Task\.title: this required field is missing"):
        object_from_json(schema, {"id": 1})
    values = object_from_json(schema, {"id": "7", "title": "a", "tags": ["b", "a"]})
    assert values == {"id": 7, "title": "a", "tags": {"a", "b"}}
    assert object_to_json(schema, values) == {"id": 7, "title": "a", "tags": ["a", "b"]}
    assert pk_from_json(schema, "9007199254740993") == 9007199254740993
    target = pk_from_json(TARGET, "5f0c9a2e-8d4b-4c1e-9a7f-1b2c3d4e5f60")
    assert target == uuid.UUID("5f0c9a2e-8d4b-4c1e-9a7f-1b2c3d4e5f60")
