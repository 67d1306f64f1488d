"""Data API writes as sync instructions: JSON operations parsed, then turned into the
instructions a device would make, against the objects' current merge states.

An operation is one of:

- ``create`` (``POST .../data/{Model}``): an object's values. A new object (or one erased)
  gets one CREATE (every field but optional, collection and counter fields must be
  given); an existing one a SET of each field given (the rest keep their values), as a
  device's ``add(update=True)`` sets its fields.
- ``update`` (``PATCH .../data/{Model}/{pk}``): fields to change. A plain JSON value
  replaces the field's value (a whole list, set or dict included); an operator object
  changes part of it with the element instructions the merge rules give meaning to:
  ``{"$inc": n}`` (counter: ADD), ``{"$push": [...]}`` (list: insert at the end; set:
  add), ``{"$pull": [...]}`` (list: erase every element equal to one given; set: remove),
  ``{"$set": {key: value}}`` and ``{"$unset": [key, ...]}`` (dict: set or erase keys).
- ``delete`` (``DELETE .../data/{Model}/{pk}``): one ERASE.

An update or delete of an object that does not exist is a 404 naming it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...core.changeset import Instruction, Op
from ...core.hlc import HLC
from ...core.jsonvalues import JSONValueError, from_json, object_from_json, pk_from_json
from ...core.merge import ObjectState
from ...core.packing import pack
from ...core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..storage.base import ObjectKey
from .access import ApiError

CREATE, UPDATE, DELETE = "create", "update", "delete"
#: The operators of an update, by the fields they apply to.
_OPERATORS = {"$inc", "$push", "$pull", "$set", "$unset"}


@dataclass(frozen=True)
class FieldChange:
    """One field of an update: ``how`` is ``set`` (whole value) or an operator."""

    how: str
    value: Any


@dataclass(frozen=True)
class WriteOp:
    """One parsed operation on one object (values already converted from JSON)."""

    kind: str
    model: str
    pk: Any
    values: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, FieldChange] = field(default_factory=dict)

    @functools.cached_property
    def key(self) -> ObjectKey:
        """The object's storage key."""
        return (self.model, pack(self.pk))


def not_found(model: str, pk: Any) -> ApiError:
    """The 404 of a missing object (its key as written in JSON)."""
    shown = repr(pk) if isinstance(pk, str | int) else repr(str(pk))
    return ApiError(404, f"there is no {model} with primary key {shown}", "not_found")


def invalid(exc: JSONValueError) -> ApiError:
    """A 400 naming the field a value does not fit."""
    return ApiError(400, str(exc), "invalid_value", {"field": exc.field})


def parse_create(
    schema: ModelSchema,
    schemas: dict[str, ModelSchema],
    body: Any,
    read: Callable[[Any], dict[str, Any]] | None = None,
) -> WriteOp:
    """A ``create`` of one JSON object (its primary key must be given); ``read`` is
    :func:`~tidesync.core.jsonvalues.object_reader` of the model, made once for many."""
    try:
        if read is not None:
            values = read(body)
        else:
            values = object_from_json(schema, body, schemas, partial=True)
    except JSONValueError as exc:
        raise invalid(exc) from None
    pk = values.get(schema.primary_key)
    if pk is None:
        raise ApiError(
            400,
            f"{schema.name}.{schema.primary_key}: the primary key cannot be null",
            "invalid_value",
            {"field": f"{schema.name}.{schema.primary_key}"},
        )
    return WriteOp(CREATE, schema.name, pk, values=values)


def _change(f: FieldSchema, model: str, value: Any, schemas: dict[str, ModelSchema]) -> FieldChange:
    where = f"{model}.{f.name}"
    ops = isinstance(value, dict) and value and all(k in _OPERATORS for k in value)
    if not ops:
        return FieldChange("set", from_json(f, value, model, schemas))
    if len(value) != 1:
        raise JSONValueError(where, "give one operator per field")
    ((how, arg),) = value.items()
    if how == "$inc":
        if f.kind is not Kind.COUNTER:
            raise JSONValueError(where, f"$inc applies to counters, not {f.type_name()}")
        return FieldChange(how, from_json(f, arg, model))
    if how in ("$push", "$pull"):
        if f.collection not in (Collection.LIST, Collection.SET):
            raise JSONValueError(where, f"{how} applies to lists and sets, not {f.type_name()}")
        if not isinstance(arg, list):
            raise JSONValueError(where, f"{how} takes an array of elements")
        list_field = FieldSchema(f.name, f.kind, Collection.LIST, f.optional, target=f.target)
        return FieldChange(how, from_json(list_field, arg, model, schemas))
    if f.collection is not Collection.DICT:
        raise JSONValueError(where, f"{how} applies to dicts, not {f.type_name()}")
    if how == "$set":
        if not isinstance(arg, dict):
            raise JSONValueError(where, "$set takes an object of keys and values")
        return FieldChange(how, from_json(f, arg, model, schemas))
    if not isinstance(arg, list) or not all(isinstance(k, str) for k in arg):
        raise JSONValueError(where, "$unset takes an array of keys")
    return FieldChange(how, list(arg))


def parse_update(
    schema: ModelSchema, schemas: dict[str, ModelSchema], pk: Any, body: Any
) -> WriteOp:
    """An ``update`` of object ``pk`` with a JSON object of field changes."""
    if not isinstance(body, dict):
        raise ApiError(400, "an update is a JSON object of fields and values", "bad_request")
    changes: dict[str, FieldChange] = {}
    try:
        for name, value in body.items():
            f = schema.by_name.get(name)
            if f is None:
                raise JSONValueError(
                    f"{schema.name}.{name}", f"unknown field {name!r} of model {schema.name}"
                )
            if f.primary_key:
                raise JSONValueError(f"{schema.name}.{name}", "the primary key cannot change")
            changes[name] = _change(f, schema.name, value, schemas)
    except JSONValueError as exc:
        raise invalid(exc) from None
    return WriteOp(UPDATE, schema.name, pk, changes=changes)


def parse_pk_json(schema: ModelSchema, value: Any) -> Any:
    """A primary key given in a JSON body (a transaction's ``pk``)."""
    try:
        return pk_from_json(schema, value)
    except JSONValueError as exc:
        raise invalid(exc) from None


def _required(schema: ModelSchema) -> tuple[str, ...]:
    """The fields a new object of ``schema`` must be given."""
    return tuple(
        f.name
        for f in schema.fields
        if not (f.optional or f.is_collection or f.kind is Kind.COUNTER)
    )


def _require_all(
    schema: ModelSchema, values: dict[str, Any], required: tuple[str, ...] | None = None
) -> None:
    """A new object needs every field but optional, collection and counter fields
    (``required``: :func:`_required` of ``schema``, when already known)."""
    for name in _required(schema) if required is None else required:
        if name not in values:
            where = f"{schema.name}.{name}"
            raise ApiError(
                400,
                f"{where}: this required field is missing (a new object needs it)",
                "invalid_value",
                {"field": where},
            )


class Builder:
    """Turns operations into instructions, in order, each later one seeing what the earlier
    ones did (``states``: the objects' merge states, updated as instructions are made).

    ``tick()`` issues the instructions' timestamps."""

    def __init__(
        self,
        schemas: dict[str, ModelSchema],
        states: dict[ObjectKey, ObjectState],
        tick: Callable[[], HLC],
    ) -> None:
        self.schemas = schemas
        self.states = states
        self.tick = tick
        self.instructions: list[Instruction] = []
        #: CREATEs of objects never stored, whose states are made only if a later
        #: operation of the request touches them (most bulk inserts never do)
        self._fresh: dict[ObjectKey, tuple[ModelSchema, Instruction]] = {}
        self._required: dict[str, tuple[str, ...]] = {}

    def lone_creates(self) -> dict[ObjectKey, Instruction]:
        """The CREATE of each object that one CREATE of this request alone made from
        nothing (no stored state, no later operation on it)."""
        return {key: ins for key, (_, ins) in self._fresh.items()}

    def _materialize(self, key: ObjectKey) -> None:
        pending = self._fresh.pop(key, None)
        if pending is not None:
            schema, ins = pending
            state = self.states[key] = ObjectState.empty()
            state.apply(ins, schema)

    def _emit(self, schema: ModelSchema, key: ObjectKey, ins: Instruction) -> None:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = ObjectState.empty()
        state.apply(ins, schema)
        self.instructions.append(ins)

    def _alive(self, key: ObjectKey) -> ObjectState | None:
        state = self.states.get(key)
        return state if state is not None and state.alive else None

    def add(self, op: WriteOp) -> None:
        """Make the instructions of one operation."""
        schema = self.schemas[op.model]
        key = op.key
        self._materialize(key)
        state = self._alive(key)
        if op.kind == CREATE:
            if state is None:
                required = self._required.get(op.model)
                if required is None:
                    required = self._required[op.model] = _required(schema)
                _require_all(schema, op.values, required)
                ins = Instruction(Op.CREATE, op.model, op.pk, self.tick(), value=dict(op.values))
                if key in self.states:
                    self._emit(schema, key, ins)
                else:
                    self._fresh[key] = (schema, ins)
                    self.instructions.append(ins)
                return
            for name, value in op.values.items():
                if name != schema.primary_key:
                    ins = Instruction(Op.SET, op.model, op.pk, self.tick(), name, value)
                    self._emit(schema, key, ins)
            return
        if state is None:
            raise not_found(op.model, op.pk)
        if op.kind == DELETE:
            self._emit(schema, key, Instruction(Op.ERASE, op.model, op.pk, self.tick()))
            return
        for name, change in op.changes.items():
            self._change(schema, key, op.pk, schema.by_name[name], change)

    def _change(
        self, schema: ModelSchema, key: ObjectKey, pk: Any, f: FieldSchema, change: FieldChange
    ) -> None:
        model, name, how, value = schema.name, f.name, change.how, change.value

        def emit(op: Op, v: Any = None, k: Any = None) -> Instruction:
            ins = Instruction(op, model, pk, self.tick(), name, v, k)
            self._emit(schema, key, ins)
            return ins

        if how == "set":
            emit(Op.SET, value)
        elif how == "$inc":
            emit(Op.ADD, value)
        elif how == "$push" and f.collection is Collection.LIST:
            ids = self.states[key].list_ids(name)
            anchor = ids[-1] if ids else None
            for item in value:
                anchor = emit(Op.LIST_INSERT, item, anchor).hlc
        elif how == "$push":
            for item in value:
                emit(Op.SET_ADD, item)
        elif how == "$pull" and f.collection is Collection.LIST:
            state = self.states[key]
            rendered = state.render(schema) or {}
            pairs = list(zip(state.list_ids(name), rendered.get(name) or []))
            for elem, current in pairs:
                if any(_same(current, v) for v in value):
                    emit(Op.LIST_ERASE, None, elem)
        elif how == "$pull":
            for item in value:
                emit(Op.SET_REMOVE, item)
        elif how == "$set":
            for k, v in value.items():
                emit(Op.DICT_SET, v, k)
        else:  # $unset
            for k in value:
                emit(Op.DICT_ERASE, None, k)


def _same(a: Any, b: Any) -> bool:
    """List elements equal as the merge compares them (``True`` is not ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)
