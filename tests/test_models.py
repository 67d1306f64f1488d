"""Model declaration: every field type, defaults, and errors at class definition."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

import tidesync as ts
from tidesync.core.schema import Collection, Kind

from .conftest import Person, Task


def test_every_field_type_maps_to_schema() -> None:
    s = Task.schema()
    kinds = {f.name: (f.kind, f.collection, f.optional) for f in s.fields}
    assert s.primary_key == "id"
    assert kinds["id"] == (Kind.OBJECTID, Collection.NONE, False)
    assert kinds["done"] == (Kind.BOOL, Collection.NONE, False)
    assert kinds["priority"] == (Kind.INT, Collection.NONE, False)
    assert kinds["score"] == (Kind.FLOAT, Collection.NONE, False)
    assert kinds["blob"] == (Kind.BYTES, Collection.NONE, False)
    assert kinds["due"] == (Kind.DATETIME, Collection.NONE, True)
    assert kinds["price"] == (Kind.DECIMAL, Collection.NONE, True)
    assert kinds["ref"] == (Kind.UUID, Collection.NONE, True)
    assert kinds["other"] == (Kind.OBJECTID, Collection.NONE, True)
    assert kinds["tags"] == (Kind.STR, Collection.LIST, False)
    assert kinds["labels"] == (Kind.STR, Collection.SET, False)
    assert kinds["attrs"] == (Kind.INT, Collection.DICT, False)
    assert kinds["owner"] == (Kind.LINK, Collection.NONE, True)
    assert s.by_name["owner"].target == "Person"
    assert kinds["watchers"] == (Kind.LINK, Collection.LIST, False)
    assert kinds["votes"] == (Kind.COUNTER, Collection.NONE, False)
    assert s.by_name["priority"].indexed
    assert not s.by_name["score"].indexed


def test_defaults_and_unmanaged_values() -> None:
    t = Task(summary="x")
    assert t.done is False and t.priority == 0 and t.tags == [] and t.labels == set()
    assert t.attrs == {} and t.owner is None and t.votes == 0 and t.note is None
    assert isinstance(t.id, ts.ObjectId)
    assert Task(summary="a").id != Task(summary="b").id
    t.votes.increment(3)
    assert t.votes.value == 3
    t.tags.append("a")
    assert t.tags == ["a"]
    assert not t.is_managed


def test_missing_required_field_and_unknown_field() -> None:
    with pytest.raises(TypeError, match="summary"):
        Task()
    with pytest.raises(TypeError, match="nope"):
        Task(summary="x", nope=1)


def test_model_without_primary_key_fails_at_definition() -> None:
    with pytest.raises(ts.SchemaError, match="NoPk has no primary key"):

        class NoPk(ts.Model):
            name: str


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (complex, "unsupported type"),
        (list[dict[str, int]], "unsupported element type"),
        (dict[int, str], "dict fields must be dict"),
        (int | str, "unions"),
        (list[int] | None, "collection cannot be optional"),
    ],
)
def test_unsupported_type_names_class_and_field(annotation: object, message: str) -> None:
    with pytest.raises(ts.SchemaError) as info:
        type(
            "Bad",
            (ts.Model,),
            {
                "__annotations__": {"id": int, "weird": annotation},
                "id": ts.primary_key(),
            },
        )
    text = str(info.value)
    assert "Bad" in text and "'weird'" in text and message in text


def test_bad_primary_key_type() -> None:
    with pytest.raises(ts.SchemaError, match="primary key must be"):

        class BadPk(ts.Model):
            id: float = ts.primary_key()


def test_two_primary_keys() -> None:
    with pytest.raises(ts.SchemaError, match="two primary keys"):

        class TwoPk(ts.Model):
            a: int = ts.primary_key()
            b: int = ts.primary_key()


def test_all_scalar_values_on_unmanaged_object(utc_now: dt.datetime) -> None:
    u = uuid.uuid4()
    t = Task(summary="s", due=utc_now, price=Decimal("1.25"), ref=u, blob=b"\x00")
    assert (t.due, t.price, t.ref, t.blob) == (utc_now, Decimal("1.25"), u, b"\x00")
    p = Person(id="p", name="Ann")
    t.owner = p
    assert t.owner is p
    assert t.to_dict()["owner"] == "p"
