"""One JSON form for every field type (the Data API, the change feed, webhooks, the admin
client): :func:`to_json` and :func:`from_json`, the same mapping in answers and requests.

==========  ==============================================================================
type        JSON
==========  ==============================================================================
bool        ``true`` / ``false``
int,        a number when it is a safe integer (``|n| <= 2**53 - 1``, exact in every JSON
counter     reader), else a decimal string (``"9007199254740993"``); both are accepted
float       a number; ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` for the values JSON lacks;
            ``-0.0`` stays ``-0.0``; an integer is accepted
str         a string
bytes       a base64 string (standard alphabet, padded)
datetime    ISO 8601 in UTC with microseconds: ``"2026-12-08T03:53:15.123456Z"``; a string
            with any offset is accepted and converted; one without an offset is taken as UTC
Decimal     a string (``"12.50"``), exactly as ``str(Decimal)``; a JSON number is refused
            (a float would round it)
UUID        the canonical string ``"5f0c...-..."``
ObjectId    24 hexadecimal digits
link        the linked object's primary key in its own JSON form, or ``null``
list        an array; set: an array (answers sort it); dict: an object with string keys
optional    ``null``
==========  ==============================================================================

Pure: no I/O. Errors are :class:`JSONValueError` naming the field and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import functools
import math
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import TidesyncError
from ..objectid import ObjectId
from .packing import pack
from .schema import Collection, FieldSchema, Kind, ModelSchema

#: The largest integer every JSON reader (JavaScript's ``Number``) holds exactly.
SAFE_INT = 2**53 - 1
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class JSONValueError(TidesyncError, ValueError):
    """A JSON value does not fit its field (the message names the field and the type)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        #: ``Model.field`` (or ``Model.field[i]`` inside a collection).
        self.field = field


# -- to JSON ----------------------------------------------------------------------------------


def _int_to_json(value: int) -> int | str:
    return value if -SAFE_INT <= value <= SAFE_INT else str(value)


def _float_to_json(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _datetime_to_json(value: _dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    value = value.astimezone(_dt.UTC).replace(tzinfo=None)
    # isoformat, not strftime: strftime's %Y does not pad years before 1000 to 4 digits
    return value.isoformat(timespec="microseconds") + "Z"


def scalar_to_json(
    kind: Kind, value: Any, schemas: dict[str, ModelSchema] | None = None, target: str | None = None
) -> Any:
    """The JSON form of one non-collection value of ``kind`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if kind is Kind.LINK:
        model = (schemas or {}).get(target or "")
        if model is None:
            return _guess_to_json(value)
        return scalar_to_json(model.pk_field.kind, value)
    if kind is Kind.INT or kind is Kind.COUNTER:
        return _int_to_json(int(value))
    if kind is Kind.FLOAT:
        return _float_to_json(float(value))
    if kind is Kind.BYTES:
        return base64.b64encode(bytes(value)).decode("ascii")
    if kind is Kind.DATETIME:
        return _datetime_to_json(value)
    if kind is Kind.DECIMAL or kind is Kind.UUID or kind is Kind.OBJECTID:
        return str(value)
    return value  # bool, str


def _guess_to_json(value: Any) -> Any:
    """A value of unknown kind (a link whose target model is unknown): by its Python type."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return _int_to_json(value)
    if isinstance(value, float):
        return _float_to_json(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, _dt.datetime):
        return _datetime_to_json(value)
    return str(value)


def _set_order(value: Any) -> bytes:
    return pack(value)


def to_json(field: FieldSchema, value: Any, schemas: dict[str, ModelSchema] | None = None) -> Any:
    """The JSON form of a whole field value (collections included)."""
    if value is None:
        return None
    kind, target = field.kind, field.target
    coll = field.collection
    if coll is Collection.NONE:
        return scalar_to_json(kind, value, schemas, target)
    if coll is Collection.LIST:
        return [scalar_to_json(kind, v, schemas, target) for v in value]
    if coll is Collection.SET:
        return [scalar_to_json(kind, v, schemas, target) for v in sorted(value, key=_set_order)]
    return {k: scalar_to_json(kind, v, schemas, target) for k, v in value.items()}


def _same(value: Any) -> Any:
    return value


def _plain_int(value: Any) -> Any:
    if type(value) is int and -SAFE_INT <= value <= SAFE_INT:
        return value
    return None if value is None else _int_to_json(int(value))


def _plain_float(value: Any) -> Any:
    return None if value is None else _float_to_json(float(value))


#: The converters of the plain kinds (no schema lookups), by ``(kind, collection)``.
_PLAIN: dict[tuple[Kind, Collection], Callable[[Any], Any]] = {
    (Kind.STR, Collection.NONE): _same,
    (Kind.BOOL, Collection.NONE): _same,
    (Kind.INT, Collection.NONE): _plain_int,
    (Kind.COUNTER, Collection.NONE): _plain_int,
    (Kind.FLOAT, Collection.NONE): _plain_float,
}


def converter(
    field: FieldSchema, schemas: dict[str, ModelSchema] | None = None
) -> Callable[[Any], Any]:
    """A function equal to ``lambda value: to_json(field, value, schemas)``: for the hot
    loops (the change feed, bulk answers), the one fast path of :func:`to_json`; plain
    kinds skip its dispatch (tests/test_json_converters.py proves the two equal)."""
    plain = _PLAIN.get((field.kind, field.collection))
    if plain is not None:
        return plain
    return functools.partial(to_json, field, schemas=schemas)


def object_converter(
    schema: ModelSchema, schemas: dict[str, ModelSchema] | None = None
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function equal to ``lambda values: object_to_json(schema, values, schemas)``, its
    converters made once (for many objects of one model)."""
    convs = [(f.name, converter(f, schemas)) for f in schema.fields]

    def convert(values: dict[str, Any]) -> dict[str, Any]:
        return {name: conv(values[name]) for name, conv in convs if name in values}

    return convert


def object_to_json(
    schema: ModelSchema, values: dict[str, Any], schemas: dict[str, ModelSchema] | None = None
) -> dict[str, Any]:
    """An object's values (as stored) in JSON form, fields in declaration order."""
    out: dict[str, Any] = {}
    for f in schema.fields:
        if f.name in values:
            out[f.name] = to_json(f, values[f.name], schemas)
    return out


# -- from JSON --------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {text!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _int_from_json(value: Any, where: str, what: str = "an integer") -> int:
    if isinstance(value, bool):
        raise JSONValueError(where, f"expected {what}, got {_describe(value)}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer() and abs(value) <= SAFE_INT:
        n = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) <= 21:
        n = int(value)
    else:
        raise JSONValueError(
            where, f"expected {what} (a number or a decimal string), got {_describe(value)}"
        )
    if not _INT_MIN <= n <= _INT_MAX:
        raise JSONValueError(where, f"{n} does not fit in 64 bits")
    return n


_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_from_json(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise JSONValueError(where, f"expected a number, got {_describe(value)}")
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise JSONValueError(where, f"{value} is too large for a float") from None
    if isinstance(value, str) and value in _FLOAT_WORDS:
        return _FLOAT_WORDS[value]
    raise JSONValueError(
        where,
        f'expected a number (or "NaN", "Infinity", "-Infinity"), got {_describe(value)}',
    )


def _datetime_from_json(value: Any, where: str) -> _dt.datetime:
    if not isinstance(value, str):
        raise JSONValueError(
            where, f"expected an ISO 8601 date-time string, got {_describe(value)}"
        )
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise JSONValueError(
            where, f"expected an ISO 8601 date-time such as 2026-12-08T03:53:15Z, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=_dt.UTC)
    return parsed.astimezone(_dt.UTC)


def _decimal_from_json(value: Any, where: str) -> Decimal:
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if not isinstance(value, str):
        raise JSONValueError(
            where, f'expected a decimal string such as "12.50", got {_describe(value)}'
        )
    try:
        return Decimal(value.strip())
    except InvalidOperation:
        raise JSONValueError(where, f"{value!r} is not a decimal number") from None


def scalar_from_json(
    kind: Kind,
    value: Any,
    where: str,
    schemas: dict[str, ModelSchema] | None = None,
    target: str | None = None,
) -> Any:
    """The stored value of one non-null JSON scalar of ``kind`` (``where`` names the field)."""
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise JSONValueError(where, f"expected true or false, got {_describe(value)}")
        return value
    if kind is Kind.INT or kind is Kind.COUNTER:
        return _int_from_json(value, where)
    if kind is Kind.FLOAT:
        return _float_from_json(value, where)
    if kind is Kind.STR:
        if not isinstance(value, str):
            raise JSONValueError(where, f"expected a string, got {_describe(value)}")
        return value
    if kind is Kind.BYTES:
        if not isinstance(value, str):
            raise JSONValueError(where, f"expected a base64 string, got {_describe(value)}")
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise JSONValueError(where, "expected a base64 string (standard alphabet)") from None
    if kind is Kind.DATETIME:
        return _datetime_from_json(value, where)
    if kind is Kind.DECIMAL:
        return _decimal_from_json(value, where)
    if kind is Kind.UUID:
        if not isinstance(value, str):
            raise JSONValueError(where, f"expected a UUID string, got {_describe(value)}")
        try:
            return uuid.UUID(value)
        except ValueError:
            raise JSONValueError(where, f"{value!r} is not a UUID") from None
    if kind is Kind.OBJECTID:
        if not isinstance(value, str) or len(value) != 24:
            raise JSONValueError(where, f"expected 24 hexadecimal digits, got {_describe(value)}")
        try:
            return ObjectId(value)
        except (ValueError, TypeError):
            raise JSONValueError(where, f"{value!r} is not an ObjectId") from None
    if kind is Kind.LINK:
        model = (schemas or {}).get(target or "")
        if model is None:
            raise JSONValueError(where, f"the link's target model {target!r} is unknown")
        return scalar_from_json(model.pk_field.kind, value, f"{where} (link to {model.name})")
    raise JSONValueError(where, f"unsupported kind {kind}")  # pragma: no cover


def _element(
    field: FieldSchema, value: Any, where: str, schemas: dict[str, ModelSchema] | None
) -> Any:
    if value is None:
        if not field.optional:
            raise JSONValueError(where, "null is not allowed (the field is not optional)")
        return None
    return scalar_from_json(field.kind, value, where, schemas, field.target)


def from_json(
    field: FieldSchema, value: Any, model: str, schemas: dict[str, ModelSchema] | None = None
) -> Any:
    """The stored value of a whole field value given in JSON (collections included)."""
    where = f"{model}.{field.name}"
    coll = field.collection
    if coll is Collection.NONE:
        if value is None and field.kind is not Kind.COUNTER:
            if not field.optional:
                raise JSONValueError(where, "null is not allowed (the field is not optional)")
            return None
        return scalar_from_json(field.kind, value, where, schemas, field.target)
    if coll is Collection.DICT:
        if not isinstance(value, dict):
            raise JSONValueError(where, f"expected an object, got {_describe(value)}")
        return {k: _element(field, v, f"{where}[{k!r}]", schemas) for k, v in value.items()}
    if not isinstance(value, list):
        raise JSONValueError(where, f"expected an array, got {_describe(value)}")
    items = [_element(field, v, f"{where}[{i}]", schemas) for i, v in enumerate(value)]
    if coll is Collection.SET:
        for i, item in enumerate(items):
            if isinstance(item, float) and math.isnan(item):
                raise JSONValueError(f"{where}[{i}]", "NaN cannot be a set element")
        return set(items)
    return items


def pk_from_json(schema: ModelSchema, value: Any) -> Any:
    """A primary key given in JSON (or as a URL path segment: a string for every kind)."""
    field = schema.pk_field
    where = f"{schema.name}.{field.name}"
    if isinstance(value, str) and field.kind is Kind.INT:
        return _int_from_json(value, where)
    if value is None:
        raise JSONValueError(where, "the primary key cannot be null")
    return scalar_from_json(field.kind, value, where)


def reader(
    field: FieldSchema, model: str, schemas: dict[str, ModelSchema] | None = None
) -> Callable[[Any], Any]:
    """A function equal to ``lambda value: from_json(field, value, model, schemas)``
    (errors included): the one fast path of :func:`from_json`, for bulk writes. A value
    of a plain kind already of its stored type is taken as it is; anything else goes
    through :func:`from_json` (tests/test_json_converters.py proves the two equal)."""
    kind, coll = field.kind, field.collection

    def general(value: Any) -> Any:
        return from_json(field, value, model, schemas)

    if coll is not Collection.NONE:
        return general
    if kind is Kind.STR or kind is Kind.BOOL or kind is Kind.FLOAT:
        wanted = {Kind.STR: str, Kind.BOOL: bool, Kind.FLOAT: float}[kind]

        def same_type(value: Any) -> Any:
            return value if type(value) is wanted else general(value)

        return same_type
    if kind is Kind.INT or kind is Kind.COUNTER:

        def integer(value: Any) -> Any:
            if type(value) is int and _INT_MIN <= value <= _INT_MAX:
                return value
            return general(value)

        return integer
    return general


def object_reader(
    schema: ModelSchema, schemas: dict[str, ModelSchema] | None = None
) -> Callable[[Any], dict[str, Any]]:
    """A function equal to ``lambda body: object_from_json(schema, body, schemas,
    partial=True)`` (errors included), its field readers made once (for many objects)."""
    readers = {f.name: reader(f, schema.name, schemas) for f in schema.fields}
    names = readers.keys()

    def read(body: Any) -> dict[str, Any]:
        if type(body) is not dict or not body.keys() <= names:
            return object_from_json(schema, body, schemas, partial=True)
        return {name: readers[name](value) for name, value in body.items()}

    return read


def object_from_json(
    schema: ModelSchema,
    body: Any,
    schemas: dict[str, ModelSchema] | None = None,
    *,
    partial: bool = False,
) -> dict[str, Any]:
    """The stored values of an object given as a JSON object; unknown fields are an error
    naming them. ``partial``: only the given fields (else every field but counters,
    optional and collection fields must be there)."""
    if not isinstance(body, dict):
        raise JSONValueError(schema.name, f"expected a JSON object, got {_describe(body)}")
    unknown = [k for k in body if k not in schema.by_name]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise JSONValueError(
            f"{schema.name}.{unknown[0]}", f"unknown field(s) {names} of model {schema.name}"
        )
    out = {
        name: from_json(schema.by_name[name], value, schema.name, schemas)
        for name, value in body.items()
    }
    if not partial:
        for f in schema.fields:
            required = not (f.optional or f.is_collection or f.kind is Kind.COUNTER)
            if required and f.name not in out:
                raise JSONValueError(f"{schema.name}.{f.name}", "this required field is missing")
    return out
