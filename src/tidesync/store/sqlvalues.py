"""How model values are laid out in the local SQLite file.

One table per model, ``"t_<Model>"``, one column per field (named as the field), plus
``"_state"`` (the object's merge state, see ``core/merge.py``). Columns are what queries run
on; they use encodings that sort and compare like the Python values:

==========  ===============  ================================================
kind        column (SQL)     in JSON (collections)
==========  ===============  ================================================
bool        INTEGER 0/1      true/false
int         INTEGER          number
float       REAL (specials:  number ("Infinity"/"-Infinity"/"NaN" strings,
            8-byte BLOB)     "NaN:<16 hex>" for another NaN's bits)
str         TEXT             string
bytes       BLOB             hex string
datetime    INTEGER µs UTC   number (µs since the epoch)
decimal     TEXT str(d)      string
uuid        TEXT canonical   string
objectid    TEXT 24 hex      string
counter     INTEGER          (not in collections)
link        the target's pk, encoded as the target's pk kind
==========  ===============  ================================================

Lists are JSON arrays in order, sets JSON arrays (sorted by their JSON text), dicts JSON
objects. ``None`` is SQL NULL / JSON null.

Floats are kept bit-exactly. SQLite stores a NaN as NULL and folds ``-0.0`` into ``0``
(a REAL with an integral value is stored as an integer), so those two, the only floats
a REAL column changes, are stored as their 8 IEEE 754 bytes, big-endian, in the same
column (a BLOB); every other float, ``±inf`` included, is a REAL as before, so queries,
sorts and indexes work on it. Queries read a BLOB of the column as the value
``core.query`` compares: NaN as null, ``-0.0`` as ``0.0`` (``store/sqlquery.py``). The
hot path checks a float with ``v != v or v == 0.0`` and encodes only what passes.
"""

from __future__ import annotations

import json
import math
import struct
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from ..core.packing import datetime_to_micros, micros_to_datetime
from ..core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..objectid import ObjectId

_SQL_TYPES = {
    Kind.BOOL: "INTEGER",
    Kind.INT: "INTEGER",
    Kind.FLOAT: "REAL",
    Kind.STR: "TEXT",
    Kind.BYTES: "BLOB",
    Kind.DATETIME: "INTEGER",
    Kind.DECIMAL: "TEXT",
    Kind.UUID: "TEXT",
    Kind.OBJECTID: "TEXT",
    Kind.COUNTER: "INTEGER",
}


def table_name(model: str) -> str:
    """The quoted SQL table name of a model."""
    return f'"t_{model}"'


def quote(name: str) -> str:
    """Quote an identifier (field names are Python identifiers, so this is safe)."""
    return f'"{name}"'


def scalar_kind(f: FieldSchema, schemas: dict[str, ModelSchema]) -> Kind:
    """The kind whose encoding a field's values use: a link uses its target's pk kind."""
    if f.kind is Kind.LINK:
        assert f.target is not None
        return schemas[f.target].pk_field.kind
    return f.kind


def column_type(f: FieldSchema, schemas: dict[str, ModelSchema]) -> str:
    """The SQL column type of a field."""
    if f.collection is not Collection.NONE:
        return "TEXT"
    return _SQL_TYPES[scalar_kind(f, schemas)]


#: The column value of ``-0.0`` (its bits): the one special float equal to a number.
NEG_ZERO = struct.pack(">d", -0.0)
_PACK_DOUBLE = struct.Struct(">d")
#: The bits of ``float("nan")``: the NaN that JSON collections write as ``"NaN"``.
_NAN_BITS = struct.pack(">d", math.nan)


def special_float_to_sql(value: Any) -> Any:
    """A float's column value when it passed the cheap check ``v != v or v == 0.0``: a NaN
    or ``-0.0`` as its 8 bytes, anything else (``0.0``, an int ``0``) as it is."""
    if value != value or math.copysign(1.0, value) < 0:
        return _PACK_DOUBLE.pack(value)
    return value


def float_to_sql(value: Any) -> Any:
    """A float field's column value (see the module docstring)."""
    if value != value or value == 0.0:
        return special_float_to_sql(value)
    return value


def float_from_sql(raw: Any) -> Any:
    """Decode a float column's value (a REAL, a special's 8 bytes, or NULL)."""
    if type(raw) is float or raw is None:
        return raw
    if type(raw) is bytes and len(raw) == 8:
        return _PACK_DOUBLE.unpack(raw)[0]
    return float(raw)


def is_float_column(f: FieldSchema) -> bool:
    """True for a scalar float field (its column may hold a special's BLOB)."""
    return f.kind is Kind.FLOAT and f.collection is Collection.NONE


def scalar_to_sql(kind: Kind, value: Any) -> Any:
    """Encode one scalar for a column or a query argument."""
    if value is None:
        return None
    if kind is Kind.FLOAT:
        return float_to_sql(value)
    if kind is Kind.BOOL:
        return 1 if value else 0
    if kind is Kind.DATETIME:
        return datetime_to_micros(value)
    if kind in (Kind.DECIMAL, Kind.UUID, Kind.OBJECTID):
        return str(value)
    return value


def scalar_from_sql(kind: Kind, raw: Any) -> Any:
    """Decode one column value."""
    if raw is None:
        return None
    if kind is Kind.BOOL:
        return bool(raw)
    if kind is Kind.DATETIME:
        return micros_to_datetime(raw)
    if kind is Kind.DECIMAL:
        return Decimal(raw)
    if kind is Kind.UUID:
        return uuid.UUID(raw)
    if kind is Kind.OBJECTID:
        return ObjectId(raw)
    if kind is Kind.FLOAT:
        return float_from_sql(raw)
    return raw


def scalar_to_json(kind: Kind, value: Any) -> Any:
    """Encode one collection element for the JSON column (and for query arguments on it)."""
    if value is None:
        return None
    if kind is Kind.BOOL:
        return bool(value)
    if kind is Kind.FLOAT:
        value = float(value)
        if math.isfinite(value):
            return value  # JSON keeps -0.0 as "-0.0"
        if value == value:
            return "Infinity" if value > 0 else "-Infinity"
        bits = _PACK_DOUBLE.pack(value)
        return "NaN" if bits == _NAN_BITS else "NaN:" + bits.hex()
    if kind is Kind.BYTES:
        return bytes(value).hex()
    if kind is Kind.DATETIME:
        return datetime_to_micros(value)
    if kind in (Kind.DECIMAL, Kind.UUID, Kind.OBJECTID):
        return str(value)
    return value


def scalar_from_json(kind: Kind, raw: Any) -> Any:
    """Decode one collection element from the JSON column."""
    if raw is None:
        return None
    if kind is Kind.FLOAT:
        if type(raw) is str and raw.startswith("NaN:"):
            return _PACK_DOUBLE.unpack(bytes.fromhex(raw[4:]))[0]
        return float(raw)
    if kind is Kind.BYTES:
        return bytes.fromhex(raw)
    return scalar_from_sql(kind, raw)


def _json_sort_key(item: Any) -> str:
    return json.dumps(item, sort_keys=True)


def to_column(f: FieldSchema, value: Any, schemas: dict[str, ModelSchema]) -> Any:
    """Encode a field's (rendered) value for its column."""
    kind = scalar_kind(f, schemas)
    coll = f.collection
    if coll is Collection.NONE:
        return scalar_to_sql(kind, value)
    if value is None:
        return None
    if coll is Collection.LIST:
        return json.dumps([scalar_to_json(kind, v) for v in value], separators=(",", ":"))
    if coll is Collection.SET:
        if kind is Kind.FLOAT:  # -0.0 and 0.0 are one element, 0.0 (as the merge keeps it)
            value = {0.0 if v == 0 else v for v in value}
        items = sorted((scalar_to_json(kind, v) for v in value), key=_json_sort_key)
        return json.dumps(items, separators=(",", ":"))
    return json.dumps(
        {str(k): scalar_to_json(kind, v) for k, v in value.items()}, separators=(",", ":")
    )


def column_encoder(f: FieldSchema, schemas: dict[str, ModelSchema]) -> Callable[[Any], Any]:
    """A fast function encoding a field's values for its column (same as :func:`to_column`)."""
    if f.collection is Collection.NONE:
        kind = scalar_kind(f, schemas)
        if kind in (Kind.INT, Kind.STR, Kind.BYTES, Kind.COUNTER):
            return _identity
        if kind is Kind.BOOL:
            return _bool_to_sql
        if kind is Kind.FLOAT:
            return float_to_sql
        return lambda v: scalar_to_sql(kind, v)
    return lambda v: to_column(f, v, schemas)


def _identity(value: Any) -> Any:
    return value


def is_identity(encoder: Callable[[Any], Any]) -> bool:
    """True when :func:`column_encoder` gave a field no encoding (its values go as they are)."""
    return encoder is _identity


def _bool_to_sql(value: Any) -> Any:
    return None if value is None else (1 if value else 0)


def from_column(f: FieldSchema, raw: Any, schemas: dict[str, ModelSchema]) -> Any:
    """Decode a field's column (links decode to the target's pk value)."""
    kind = scalar_kind(f, schemas)
    coll = f.collection
    if coll is Collection.NONE:
        if raw is None and kind is Kind.COUNTER:
            return 0  # a counter added to the schema after the object was written
        return scalar_from_sql(kind, raw)
    if raw is None:
        return [] if coll is Collection.LIST else set() if coll is Collection.SET else {}
    data = json.loads(raw)
    if coll is Collection.LIST:
        return [scalar_from_json(kind, v) for v in data]
    if coll is Collection.SET:
        return {scalar_from_json(kind, v) for v in data}
    return {k: scalar_from_json(kind, v) for k, v in data.items()}
