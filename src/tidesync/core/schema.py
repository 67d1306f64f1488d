"""Model schemas as plain data: what fields a model has and of which types.

Both sides use this: the client builds it from ``Model`` classes, the server receives it
(as a dict) from clients in development mode. It is also what compatibility checks compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..errors import SchemaMismatchError


class Kind(StrEnum):
    """The scalar type of a field (or of a collection's elements)."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STR = "str"
    BYTES = "bytes"
    DATETIME = "datetime"
    DECIMAL = "decimal"
    UUID = "uuid"
    OBJECTID = "objectid"
    LINK = "link"
    COUNTER = "counter"


class Collection(StrEnum):
    """Whether a field holds one value or a collection of them."""

    NONE = "none"
    LIST = "list"
    SET = "set"
    DICT = "dict"


#: Kinds that may be a primary key.
PK_KINDS = frozenset({Kind.INT, Kind.STR, Kind.UUID, Kind.OBJECTID})


@dataclass(frozen=True, slots=True)
class FieldSchema:
    """One field of a model."""

    name: str
    kind: Kind
    collection: Collection = Collection.NONE
    optional: bool = False
    target: str | None = None  # the linked model's name, for Kind.LINK
    indexed: bool = False
    primary_key: bool = False

    @property
    def is_collection(self) -> bool:
        """True for list, set and dict fields."""
        return self.collection is not Collection.NONE

    def type_name(self) -> str:
        """A readable type, e.g. ``list[str]`` or ``int | None``."""
        base = self.target if self.kind is Kind.LINK and self.target else self.kind.value
        if self.optional:
            base = f"{base} | None"
        if self.collection is Collection.LIST:
            return f"list[{base}]"
        if self.collection is Collection.SET:
            return f"set[{base}]"
        if self.collection is Collection.DICT:
            return f"dict[str, {base}]"
        return base

    def to_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-friendly description."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind.value}
        if self.collection is not Collection.NONE:
            out["collection"] = self.collection.value
        if self.optional:
            out["optional"] = True
        if self.target is not None:
            out["target"] = self.target
        if self.indexed:
            out["indexed"] = True
        if self.primary_key:
            out["primary_key"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldSchema:
        """Parse :meth:`to_dict` output; raises ``ValueError`` on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("a field schema must be a map")
        name = data.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"invalid field name {name!r}")
        target = data.get("target")
        if target is not None and not isinstance(target, str):
            raise ValueError(f"invalid link target for field {name!r}")
        return cls(
            name=name,
            kind=Kind(str(data.get("kind"))),
            collection=Collection(data.get("collection", "none")),
            optional=bool(data.get("optional", False)),
            target=target,
            indexed=bool(data.get("indexed", False)),
            primary_key=bool(data.get("primary_key", False)),
        )


@dataclass(frozen=True, slots=True)
class ModelSchema:
    """A model: its name, its fields in declaration order, and its primary key."""

    name: str
    fields: tuple[FieldSchema, ...]
    primary_key: str
    by_name: dict[str, FieldSchema] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {f.name: f for f in self.fields})

    @property
    def pk_field(self) -> FieldSchema:
        """The primary key's field."""
        return self.by_name[self.primary_key]

    def to_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-friendly description."""
        return {
            "name": self.name,
            "primary_key": self.primary_key,
            "fields": [f.to_dict() for f in self.fields],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSchema:
        """Parse :meth:`to_dict` output; raises ``ValueError`` on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("a model schema must be a map")
        name = data.get("name")
        pk = data.get("primary_key")
        raw_fields = data.get("fields")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"invalid model name {name!r}")
        if not isinstance(raw_fields, list):
            raise ValueError(f"model {name}: fields must be a list")
        fields = tuple(FieldSchema.from_dict(f) for f in raw_fields)
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"model {name}: duplicate field names")
        if not isinstance(pk, str) or pk not in names:
            raise ValueError(f"model {name}: primary key {pk!r} is not a field")
        return cls(name=name, fields=fields, primary_key=pk)


def may_be_absent(f: FieldSchema) -> bool:
    """True if objects may lack a value for ``f`` (it reads as its default: None, empty,
    0): an optional field, a collection or a counter, never the primary key. Only such
    fields may be added to existing data, or left out by a model (an older release)."""
    return (f.optional or f.is_collection or f.kind is Kind.COUNTER) and not f.primary_key


def check_compatible(stored: ModelSchema, declared: ModelSchema) -> list[FieldSchema]:
    """Check that ``declared`` can open data written with ``stored``.

    Returns the fields ``declared`` adds (each must be optional, a collection, or a counter,
    so existing objects read them as their default). ``declared`` may leave out fields of
    the same kinds (an older release of the app: see :func:`widened`). Raises
    :class:`SchemaMismatchError` naming the model and field for anything else: a changed
    type, a changed primary key, a left-out required field, or an added required field.
    """
    if stored.primary_key != declared.primary_key:
        raise SchemaMismatchError(
            f"model {declared.name}: primary key changed from {stored.primary_key!r} "
            f"to {declared.primary_key!r}"
        )
    added: list[FieldSchema] = []
    for f in declared.fields:
        old = stored.by_name.get(f.name)
        if old is None:
            if not may_be_absent(f):
                raise SchemaMismatchError(
                    f"model {declared.name}: new field {f.name!r} ({f.type_name()}) must be "
                    "optional (or a collection or a counter) to be added to existing data"
                )
            added.append(f)
            continue
        if (old.kind, old.collection, old.optional, old.target) != (
            f.kind,
            f.collection,
            f.optional,
            f.target,
        ):
            raise SchemaMismatchError(
                f"model {declared.name}: field {f.name!r} changed type from "
                f"{old.type_name()} to {f.type_name()}"
            )
    for old in stored.fields:
        if old.name not in declared.by_name and not may_be_absent(old):
            raise SchemaMismatchError(
                f"model {declared.name}: field {old.name!r} ({old.type_name()}) is in the "
                "file but not in the model; only optional fields, collections and counters "
                "may be left out (objects created without it would have no value)"
            )
    return added


def widened(stored: ModelSchema | None, declared: ModelSchema) -> ModelSchema:
    """``declared`` plus the fields of ``stored`` it leaves out (kept, in their stored
    order, after the declared ones): the schema of the data, whatever release reads it.
    Call after :func:`check_compatible`."""
    if stored is None:
        return declared
    kept = tuple(f for f in stored.fields if f.name not in declared.by_name)
    if not kept:
        return declared
    return ModelSchema(declared.name, declared.fields + kept, declared.primary_key)
