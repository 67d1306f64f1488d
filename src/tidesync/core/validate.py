"""Checks that a changeset (or one value) fits the schemas before anything applies it.

The merge engine trusts its input; everything that crosses a trust boundary (an upload
on the server, a download on the client, a local write in the store) goes through here
first, so a malformed or ill-typed instruction is refused with a ``ValueError`` naming the
problem instead of corrupting a replica.
"""

from __future__ import annotations

import datetime as _dt
import math
import uuid
from decimal import Decimal
from typing import Any

from ..objectid import ObjectId
from .changeset import Changeset, Instruction, Op
from .hlc import HLC
from .schema import Collection, FieldSchema, Kind, ModelSchema

_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

_SCALAR_TYPES: dict[Kind, tuple[type, ...]] = {
    Kind.STR: (str,),
    Kind.BYTES: (bytes,),
    Kind.DATETIME: (_dt.datetime,),
    Kind.DECIMAL: (Decimal,),
    Kind.UUID: (uuid.UUID,),
    Kind.OBJECTID: (ObjectId,),
}

_COLLECTION_OPS: dict[Op, Collection] = {
    Op.LIST_INSERT: Collection.LIST,
    Op.LIST_SET: Collection.LIST,
    Op.LIST_ERASE: Collection.LIST,
    Op.SET_ADD: Collection.SET,
    Op.SET_REMOVE: Collection.SET,
    Op.DICT_SET: Collection.DICT,
    Op.DICT_ERASE: Collection.DICT,
}


#: Exact value types that need no further check for a scalar field of a kind (the fast path
#: of :func:`validate_value`; anything else takes the full check).
_EXACT: dict[Kind, tuple[type, ...]] = {
    Kind.STR: (str,),
    Kind.BYTES: (bytes,),
    Kind.BOOL: (bool,),
    Kind.FLOAT: (float,),
    Kind.UUID: (uuid.UUID,),
    Kind.OBJECTID: (ObjectId,),
    Kind.DECIMAL: (Decimal,),
    Kind.DATETIME: (_dt.datetime,),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_kind(
    kind: Kind, value: Any, what: str, schemas: dict[str, ModelSchema], target: str | None
) -> None:
    """Check one non-None scalar of ``kind``."""
    if kind is Kind.BOOL:
        ok = isinstance(value, bool)
    elif kind is Kind.INT or kind is Kind.COUNTER:
        ok = _is_int(value)
        if ok and not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"{what}: {value} does not fit in 64 bits")
    elif kind is Kind.FLOAT:
        ok = isinstance(value, float)
        if not ok and _is_int(value):
            ok = True
            try:
                float(value)  # how the merge stores an int given for a float
            except OverflowError:
                raise ValueError(f"{what}: {value} is too large for a float") from None
    elif kind is Kind.LINK:
        model = schemas.get(target) if target is not None else None
        if model is None:
            raise ValueError(f"{what}: link target model {target!r} is unknown")
        pk = model.pk_field
        _check_kind(pk.kind, value, f"{what} (link to {model.name})", schemas, pk.target)
        return
    else:
        ok = isinstance(value, _SCALAR_TYPES[kind])
    if not ok:
        raise ValueError(f"{what}: expected {kind.value}, got {type(value).__name__} {value!r}")


def _check_element(
    field: FieldSchema, value: Any, schemas: dict[str, ModelSchema], *, identity: bool = False
) -> None:
    """Check one element (or a scalar field's value); ``identity``: it must be hashable/equal
    to itself (set elements)."""
    what = f"field {field.name!r}"
    if value is None:
        if not field.optional:
            raise ValueError(f"{what}: None is not allowed (the field is not optional)")
        return
    _check_kind(field.kind, value, what, schemas, field.target)
    if identity and (
        (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, Decimal) and value.is_nan())
    ):
        raise ValueError(f"{what}: NaN cannot be a set element")


def validate_value(field: FieldSchema, value: Any, schemas: dict[str, ModelSchema]) -> None:
    """Check a whole value for ``field`` (what a CREATE or SET carries); ``ValueError`` if not.

    Collections: list/tuple for lists; set/frozenset/list/tuple for sets; a dict with str
    keys for dicts. ``bool`` is not an ``int``; an ``int`` is accepted for a ``float``;
    naive datetimes are taken as UTC.
    """
    kind = field.kind
    if field.collection is Collection.NONE and kind is not Kind.COUNTER:
        # fast path for the common case: a plain value of exactly the field's type
        t = type(value)
        if t in _EXACT.get(kind, ()):
            return
        if t is int and (kind is Kind.INT or kind is Kind.FLOAT) and _INT_MIN <= value <= _INT_MAX:
            return
    what = f"field {field.name!r}"
    if kind is Kind.COUNTER:
        if field.collection is not Collection.NONE:
            raise ValueError(f"{what}: a counter cannot be a collection")
        if not _is_int(value):
            raise ValueError(f"{what}: a counter's value must be an int, got {value!r}")
        _check_kind(Kind.COUNTER, value, what, schemas, None)
        return
    coll = field.collection
    if coll is Collection.NONE:
        _check_element(field, value, schemas)
    elif coll is Collection.LIST:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{what}: expected a list, got {type(value).__name__}")
        for item in value:
            _check_element(field, item, schemas)
    elif coll is Collection.SET:
        if not isinstance(value, (set, frozenset, list, tuple)):
            raise ValueError(f"{what}: expected a set, got {type(value).__name__}")
        for item in value:
            _check_element(field, item, schemas, identity=True)
    else:
        if not isinstance(value, dict):
            raise ValueError(f"{what}: expected a dict, got {type(value).__name__}")
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{what}: dict keys must be str, got {key!r}")
            _check_element(field, item, schemas)


def _check_hlc(value: Any, what: str) -> HLC:
    if (
        not isinstance(value, HLC)
        or not _is_int(value.wall)
        or not _is_int(value.counter)
        or not isinstance(value.origin, str)
        or value.wall < 0
        or value.counter < 0
    ):
        raise ValueError(f"{what}: {value!r} is not an HLC")
    return value


def _check_element_id(ins: Instruction, what: str) -> None:
    key = _check_hlc(ins.key, f"{what}: element id")
    if key >= ins.hlc:
        raise ValueError(f"{what}: element id {key} is not older than the instruction")


class _Fast:
    """Per model, what the fast path of :func:`validate_instruction` needs (built once)."""

    __slots__ = ("fields", "nfields", "pk_exact", "pk_name", "shapes")

    def __init__(self, model: ModelSchema) -> None:
        #: name -> (field, exact types needing no further check, ints in range also fine)
        self.fields: dict[str, tuple[FieldSchema, tuple[type, ...], bool]] = {}
        for f in model.fields:
            exact: tuple[type, ...] = ()
            plain = f.collection is Collection.NONE and f.kind is not Kind.COUNTER
            if plain:
                exact = _EXACT.get(f.kind, ())
                if f.optional:
                    exact += (type(None),)
            intish = plain and (f.kind is Kind.INT or f.kind is Kind.FLOAT)
            self.fields[f.name] = (f, exact, intish)
        pk = model.pk_field
        self.pk_exact = _EXACT.get(pk.kind, ()) if pk.kind is not Kind.LINK else ()
        self.pk_name = pk.name
        self.nfields = len(model.fields)
        #: CREATE value shapes, (names, value types) -> the names of int values that need
        #: a range check, or None if the shape needs the full checks
        self.shapes: dict[tuple[tuple[Any, ...], tuple[type, ...]], tuple[str, ...] | None] = {}

    def shape(self, names: tuple[Any, ...], types: tuple[type, ...]) -> tuple[str, ...] | None:
        """Classify a CREATE value's shape (see ``shapes``), remembering the answer."""
        key = (names, types)
        if key in self.shapes:
            return self.shapes[key]
        ranged: list[str] = []
        ok = len(names) == self.nfields and self.pk_name in names
        if ok:
            for name, t in zip(names, types, strict=True):
                entry = self.fields.get(name) if type(name) is str else None
                if entry is None:
                    ok = False
                    break
                _, exact, intish = entry
                if t in exact:
                    continue
                if t is int and intish:
                    ranged.append(name)
                    continue
                ok = False
                break
        answer = tuple(ranged) if ok else None
        if len(self.shapes) > 256:
            self.shapes.clear()
        self.shapes[key] = answer
        return answer


_FAST: dict[int, tuple[ModelSchema, _Fast]] = {}


def _fast(model: ModelSchema) -> _Fast:
    entry = _FAST.get(id(model))
    if entry is not None and entry[0] is model:
        return entry[1]
    if len(_FAST) > 1024:
        _FAST.clear()
    fast = _Fast(model)
    _FAST[id(model)] = (model, fast)
    return fast


def _validate_create(ins: Instruction, model: ModelSchema, schemas: dict[str, ModelSchema]) -> None:
    if ins.field is not None:
        raise ValueError(f"CREATE {model.name}[{ins.pk!r}]: a CREATE names no field")
    values = ins.value
    if not isinstance(values, dict):
        raise ValueError(
            f"CREATE {model.name}[{ins.pk!r}]: the value must be a dict of field values"
        )
    table = _fast(model).fields
    for name, value in values.items():
        entry = table.get(name) if type(name) is str else None
        if entry is None:
            field = model.by_name.get(name) if isinstance(name, str) else None
            if field is None:
                raise ValueError(f"CREATE {model.name}[{ins.pk!r}]: unknown field {name!r}")
        else:
            field, exact, intish = entry
            t = type(value)
            if t in exact or (t is int and intish and _INT_MIN <= value <= _INT_MAX):
                continue  # the common case: a plain value of exactly the field's type
        try:
            validate_value(field, value, schemas)
        except ValueError as exc:
            raise ValueError(f"CREATE {model.name}[{ins.pk!r}]: {exc}") from None
    # every name is a known field (checked above), so as many names as fields means none
    # is missing
    if len(values) != len(model.fields):
        for field in model.fields:
            required = not (field.optional or field.is_collection or field.kind is Kind.COUNTER)
            if required and field.name not in values:
                raise ValueError(
                    f"CREATE {model.name}[{ins.pk!r}]: missing required field {field.name!r}"
                )
    pk_value = values.get(model.primary_key)
    if pk_value != ins.pk or type(pk_value) is not type(ins.pk):
        raise ValueError(
            f"CREATE {model.name}[{ins.pk!r}]: the primary key field holds {pk_value!r}"
        )


def _validate_field_op(
    ins: Instruction, model: ModelSchema, schemas: dict[str, ModelSchema]
) -> None:
    op = ins.op
    field = model.by_name.get(ins.field) if isinstance(ins.field, str) else None
    what = f"{op.name} {model.name}[{ins.pk!r}].{ins.field}"
    if field is None:
        raise ValueError(f"{what}: model {model.name} has no field {ins.field!r}")
    if field.primary_key:
        raise ValueError(f"{what}: the primary key cannot be changed")
    if op is Op.SET:
        validate_value(field, ins.value, schemas)
        return
    if op is Op.ADD:
        if field.kind is not Kind.COUNTER:
            raise ValueError(f"{what}: ADD applies only to counters, not {field.type_name()}")
        if not _is_int(ins.value):
            raise ValueError(f"{what}: the amount must be an int, got {ins.value!r}")
        _check_kind(Kind.COUNTER, ins.value, what, schemas, None)
        return
    if field.kind is Kind.COUNTER or _COLLECTION_OPS[op] is not field.collection:
        raise ValueError(f"{what}: {op.name} does not apply to a {field.type_name()} field")
    if op is Op.LIST_INSERT:
        if ins.key is not None:
            _check_element_id(ins, what)
        _check_element(field, ins.value, schemas)
    elif op is Op.LIST_SET:
        _check_element_id(ins, what)
        _check_element(field, ins.value, schemas)
    elif op is Op.LIST_ERASE:
        _check_element_id(ins, what)
    elif op is Op.SET_ADD or op is Op.SET_REMOVE:
        _check_element(field, ins.value, schemas, identity=True)
    else:
        if not isinstance(ins.key, str):
            raise ValueError(f"{what}: a dict key must be a str, got {ins.key!r}")
        if op is Op.DICT_SET:
            _check_element(field, ins.value, schemas)


def validate_instruction(
    ins: Instruction, schemas: dict[str, ModelSchema], origin: str | None = None
) -> None:
    """Check one instruction against the schemas; ``ValueError`` naming the problem."""
    if not isinstance(ins, Instruction):
        raise ValueError(f"not an instruction: {ins!r}")
    if not isinstance(ins.op, Op):
        raise ValueError(f"unknown instruction op {ins.op!r}")
    model = schemas.get(ins.model)
    if model is None:
        raise ValueError(f"unknown model {ins.model!r}")
    hlc = ins.hlc
    # the fast paths below accept only what the full checks accept; error messages (and
    # anything unusual) come from the full checks
    if not (
        type(hlc) is HLC
        and type(hlc.wall) is int
        and type(hlc.counter) is int
        and type(hlc.origin) is str
        and hlc.wall >= 0
        and hlc.counter >= 0
    ):
        hlc = _check_hlc(hlc, f"{ins.op.name} {ins.model}: timestamp")
    if origin is not None and hlc.origin != origin:
        raise ValueError(
            f"{ins.op.name} {ins.model}: timestamp origin {hlc.origin!r} is not the changeset's"
        )
    if ins.pk is None:
        raise ValueError(f"{ins.op.name} {ins.model}: the primary key is missing")
    tpk = type(ins.pk)
    if not (
        tpk in _fast(model).pk_exact
        or (tpk is int and model.pk_field.kind is Kind.INT and _INT_MIN <= ins.pk <= _INT_MAX)
    ):
        pk = model.pk_field
        _check_kind(pk.kind, ins.pk, f"{ins.op.name} {ins.model}: primary key", schemas, pk.target)
    if ins.op is Op.CREATE:
        _validate_create(ins, model, schemas)
    elif ins.op is Op.ERASE:
        if ins.field is not None:
            raise ValueError(f"ERASE {ins.model}[{ins.pk!r}]: an ERASE names no field")
    else:
        _validate_field_op(ins, model, schemas)


def validate_changeset(cs: Changeset, schemas: dict[str, ModelSchema]) -> None:
    """Check a whole changeset; raises ``ValueError`` naming the first problem found.

    Besides each instruction (see :func:`validate_instruction`): the origin is a non-empty
    string without ``#`` (reserved for the ids of whole-list items), the version a positive
    int, and every instruction's HLC carries the changeset's origin and is unique.
    """
    if not isinstance(cs.origin, str) or not cs.origin or "#" in cs.origin:
        raise ValueError(f"invalid changeset origin {cs.origin!r}")
    if not _is_int(cs.version) or cs.version < 1:
        raise ValueError(f"invalid changeset version {cs.version!r}")
    seen: set[HLC] = set()
    origin = cs.origin
    models: dict[Any, _Fast | None] = {}
    for ins in cs.instructions:
        if not (_create_ok(ins, schemas, origin, models)):
            validate_instruction(ins, schemas, origin)
        if ins.hlc in seen:
            raise ValueError(f"two instructions share the timestamp {ins.hlc}")
        seen.add(ins.hlc)


def _create_ok(
    ins: Instruction, schemas: dict[str, ModelSchema], origin: str, models: dict[Any, _Fast | None]
) -> bool:
    """The common case of :func:`validate_instruction`, checked in one pass: a CREATE of
    plain values of exactly their fields' types (every field given). True means it passes
    the full checks; False means "not known": run the full checks (they name the error)."""
    if type(ins) is not Instruction or ins.op is not Op.CREATE or ins.field is not None:
        return False
    name = ins.model
    if type(name) is not str:
        return False
    if name in models:
        fast = models[name]
    else:
        model = schemas.get(name)
        fast = models[name] = _fast(model) if model is not None else None
    if fast is None:
        return False
    hlc = ins.hlc
    if not (
        type(hlc) is HLC
        and type(hlc.wall) is int
        and type(hlc.counter) is int
        and type(hlc.origin) is str
        and hlc.wall >= 0
        and hlc.counter >= 0
        and hlc.origin == origin
    ):
        return False
    values = ins.value
    if type(values) is not dict:
        return False
    ranged = fast.shape(tuple(values), tuple(map(type, values.values())))
    if ranged is None:
        return False
    for field in ranged:
        if not _INT_MIN <= values[field] <= _INT_MAX:
            return False
    pk = ins.pk
    # the pk field's value passed its field's check; the instruction's pk is that value
    pk_value = values[fast.pk_name]
    return pk is not None and type(pk) is type(pk_value) and pk == pk_value
