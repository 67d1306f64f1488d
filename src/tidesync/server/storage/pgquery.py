"""Compile bound queries (``core.query.BoundQuery``) to SQL over the ``objects.doc`` JSONB.

The PostgreSQL backend evaluates flexible-sync subscriptions and read rules inside
PostgreSQL (``PostgresStorage.read_matching``). :func:`compile_filter` turns them into one
boolean SQL expression with **three** outcomes per row:

- ``TRUE``: the object certainly matches (``core.query.evaluate`` would say True);
- ``FALSE``: it certainly does not;
- ``NULL``: SQL cannot decide it exactly; the caller evaluates that row in Python.

Every comparison is made two-valued (``COALESCE(..., FALSE)``) so SQL's NULLs never leak into
``NOT``, and only the deliberate "cannot decide" cases yield NULL, which AND / OR / NOT then
combine by Kleene logic (``FALSE AND unknown`` is FALSE, ``TRUE OR unknown`` is TRUE): the
result is exact wherever it is not NULL. The undecidable cases:

- a string holding U+FFFD: ``doc`` replaces U+0000 with it (JSONB cannot hold U+0000), so
  the original text is not known;
- ``[c]`` on a non-ASCII string: Python's ``str.casefold`` has no PostgreSQL equivalent
  (for ASCII, ``lower()`` under the ``C`` collation is the same);
- a Decimal stored in exponent notation, or NaN (they are left to Python's rules);
- a whole query the compiler does not handle (a path through links, an argument SQL cannot
  carry exactly: see :class:`Unsupported`) becomes NULL, so that query runs in Python.

How values are compared, by kind (``doc`` holds ``postgres.to_json`` renderings): strings,
UUIDs and ObjectIds as text under ``COLLATE "C"`` (code point order, like Python); ints and
counters as ``numeric`` with arguments passed as exact Decimals (an int compared with a float
is exact, as in Python); floats as ``float8`` (NaN reads as null, like ``core.query``);
Decimals as ``numeric``; bytes as ``bytea`` (``decode(..., 'base64')``); datetimes as
``timestamptz`` (the connection's time zone is UTC, naive values are UTC).
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ...core import query as q
from ...core.packing import datetime_to_micros, micros_to_datetime
from ...core.schema import Collection, Kind
from ...objectid import ObjectId

__all__ = ["SqlFilter", "Unsupported", "compile_filter", "compile_query"]

#: The shape of a Decimal text SQL compares exactly (others are left to Python).
_PLAIN_DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"
#: Arguments with a larger exponent are evaluated in Python (numeric has limits).
_MAX_EXPONENT = 300
_STRING_OPS = ("beginswith", "endswith", "contains", "like")
_ORDER_OPS = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}


class Unsupported(Exception):
    """The query (or one of its arguments) cannot be compiled exactly; evaluate it in Python."""


@dataclass(frozen=True)
class SqlFilter:
    """A three-valued SQL boolean expression over the column ``doc``, and its parameters
    (numbered from the ``first_param`` given to :func:`compile_filter`)."""

    sql: str
    params: list[Any]
    #: How many of the queries (and the rule) fell back to Python entirely.
    fallbacks: int = 0


class _Params:
    def __init__(self, first: int) -> None:
        self.first = first
        self.values: list[Any] = []

    def add(self, value: Any, cast: str) -> str:
        self.values.append(value)
        return f"${self.first + len(self.values) - 1}::{cast}"


def compile_filter(
    queries: Sequence[q.BoundQuery] | None, rule: q.BoundQuery | None, first_param: int
) -> SqlFilter:
    """SQL for "matches one of ``queries`` (None: all; empty: none) and ``rule`` (None: no
    rule)", the same as ``storage.base.object_matches`` wherever the result is not NULL."""
    params = _Params(first_param)
    fallbacks = 0

    def one(bound: q.BoundQuery) -> str:
        nonlocal fallbacks
        mark = len(params.values)
        try:
            return compile_query(bound, params)
        except Unsupported:
            del params.values[mark:]
            fallbacks += 1
            return "NULL::boolean"

    if queries is None:
        match = "TRUE"
    elif not queries:
        match = "FALSE"
    else:
        match = "(" + " OR ".join(one(b) for b in queries) + ")"
    if rule is None:
        return SqlFilter(match, params.values, fallbacks)
    return SqlFilter(f"({match} AND {one(rule)})", params.values, fallbacks)


def compile_query(bound: q.BoundQuery, params: _Params) -> str:
    """One bound query's predicate as three-valued SQL; raises :class:`Unsupported`."""
    return _pred(bound.predicate, params)


def _pred(p: q.BoundPredicate, params: _Params) -> str:
    if isinstance(p, q.BoundNot):
        return f"(NOT {_pred(p.term, params)})"
    if isinstance(p, q.BoolOp):
        if p.op in ("and", "or") and p.terms:
            joiner = " AND " if p.op == "and" else " OR "
            return "(" + joiner.join(_pred(t, params) for t in p.terms) + ")"
        if p.op == "and" or p.op == "true":
            return "TRUE"
        if p.op == "or" or p.op == "false":
            return "FALSE"
        raise Unsupported(f"unknown operator {p.op!r}")
    return _compare(p, params)


def _compare(c: q.Compare, params: _Params) -> str:
    path = c.path
    if path.hops:
        raise Unsupported("paths through links are evaluated in Python")
    field = params.add(path.field.name, "text")
    node = f"(doc -> {field})"
    if path.attr == "count":
        count = (
            f"(CASE jsonb_typeof({node}) WHEN 'array' THEN jsonb_array_length({node}) "
            f"WHEN 'object' THEN (SELECT count(*) FROM jsonb_object_keys({node}))::int "
            "ELSE 0 END)"
        )
        return _test(c, count, "numeric", None, params)
    text = f"(doc ->> {field})"
    if path.attr == "size":
        if path.field.kind is Kind.STR:
            return _test(c, f"char_length({text})", "numeric", None, params)
        if path.field.kind is Kind.BYTES:
            return _test(c, f"length(decode({text}, 'base64'))", "numeric", None, params)
        raise Unsupported(f"@size of {path.field.type_name()}")
    if not path.elements:
        value, cast, unsure = _value(path.kind, text, c.ci)
        return _test(c, value, cast, unsure, params)
    # ANY / ALL / NONE over a collection's elements (a dict's values)
    if path.field.collection is Collection.DICT:
        source = (
            f"jsonb_each_text(CASE WHEN jsonb_typeof({node}) = 'object' "
            f"THEN {node} ELSE '{{}}'::jsonb END) AS x(k, e)"
        )
    else:
        source = (
            f"jsonb_array_elements_text(CASE WHEN jsonb_typeof({node}) = 'array' "
            f"THEN {node} ELSE '[]'::jsonb END) AS x(e)"
        )
    value, cast, unsure = _value(path.kind, "x.e", c.ci)
    each = _test(c, value, cast, unsure, params)
    if c.quantifier == "all":
        agg = (
            "CASE WHEN bool_or(r IS FALSE) THEN FALSE WHEN bool_or(r IS NULL) THEN NULL "
            "ELSE TRUE END"
        )
    else:
        agg = (
            "CASE WHEN bool_or(r IS TRUE) THEN TRUE WHEN bool_or(r IS NULL) THEN NULL "
            "ELSE FALSE END"
        )
    found = f"(SELECT {agg} FROM (SELECT {each} AS r FROM {source}) AS y)"
    return f"(NOT {found})" if c.quantifier == "none" else found


def _value(kind: Kind, text: str, ci: bool) -> tuple[str, str, str | None]:
    """``(SQL value, parameter cast, SQL "cannot decide" condition or None)`` of a text."""
    if kind is Kind.STR:
        unsure = f"strpos({text}, chr(65533)) > 0"
        if ci:
            unsure = f"({unsure} OR octet_length({text}) <> char_length({text}))"
            return f'lower({text} COLLATE "C")', "text", unsure
        return f'({text} COLLATE "C")', "text", unsure
    if kind is Kind.BOOL:
        return f"({text})::boolean", "boolean", None
    if kind in (Kind.INT, Kind.COUNTER):
        return f"({text})::numeric", "numeric", None
    if kind is Kind.FLOAT:
        return f"NULLIF(({text})::float8, 'NaN'::float8)", "float8", None
    if kind is Kind.DECIMAL:
        plain = f"({text} ~ '{_PLAIN_DECIMAL}')"
        return (
            f"(CASE WHEN {plain} THEN ({text})::numeric END)",
            "numeric",
            f"({text} IS NOT NULL AND NOT {plain})",
        )
    if kind is Kind.BYTES:
        return f"decode({text}, 'base64')", "bytea", None
    if kind is Kind.DATETIME:
        # sent as ISO text: asyncpg would encode datetime.min as -infinity
        return f"({text})::timestamptz", "text::timestamptz", None
    if kind in (Kind.UUID, Kind.OBJECTID):
        return f'({text} COLLATE "C")', "text", None
    raise Unsupported(f"values of kind {kind}")


def _arg(kind: Kind, value: Any, ci: bool) -> Any:
    """An argument as the parameter SQL compares exactly; raises :class:`Unsupported`."""
    if kind is Kind.STR:
        if not isinstance(value, str) or "\x00" in value or "\ufffd" in value:
            raise Unsupported("a string argument holding U+0000 or U+FFFD")
        return value.casefold() if ci else value
    if kind is Kind.BOOL:
        return bool(value)
    if kind in (Kind.INT, Kind.COUNTER):
        if isinstance(value, float) and not math.isfinite(value):
            raise Unsupported("an infinite argument for an int field")
        return Decimal(value)
    if kind is Kind.FLOAT:
        return float(value)
    if kind is Kind.DECIMAL:
        d = Decimal(value)
        exponent = d.as_tuple().exponent
        if not d.is_finite() or not isinstance(exponent, int) or abs(exponent) > _MAX_EXPONENT:
            raise Unsupported("a Decimal argument outside numeric's exact range")
        if len(d.as_tuple().digits) > _MAX_EXPONENT:
            raise Unsupported("a Decimal argument with too many digits")
        return d
    if kind is Kind.BYTES:
        return bytes(value)
    if kind is Kind.DATETIME:
        if not isinstance(value, dt.datetime):
            raise Unsupported("a datetime argument that is not a datetime")
        return micros_to_datetime(datetime_to_micros(value)).isoformat()
    if kind is Kind.UUID and isinstance(value, uuid.UUID):
        return str(value)
    if kind is Kind.OBJECTID and isinstance(value, ObjectId):
        return str(value)
    raise Unsupported(f"an argument {value!r} for kind {kind}")


def _test(c: q.Compare, value: str, cast: str, unsure: str | None, params: _Params) -> str:
    """``core.query._test`` of one value, as SQL (TRUE/FALSE; NULL when ``unsure``)."""
    kind, op = c.path.kind, c.op
    if c.path.attr is not None:
        kind = Kind.INT

    def arg(v: Any) -> str:
        return params.add(_arg(kind, v, c.ci), cast)

    if op in _STRING_OPS:
        pattern = c.values[0]
        if op == "like":
            p = params.add(_like_pattern(_arg(kind, pattern, c.ci)), "text")
            sure = f"COALESCE({value} LIKE {p}, FALSE)"
        else:
            p = arg(pattern)
            if op == "beginswith":
                sure = f"COALESCE(starts_with({value}, {p}), FALSE)"
            elif op == "endswith":
                sure = f"COALESCE(right({value}, char_length({p})) = {p}, FALSE)"
            else:
                sure = f"COALESCE(strpos({value}, {p}) > 0, FALSE)"
    elif c.ci or op in ("==", "!="):
        first = c.values[0]
        if first is None:
            hit = f"({value} IS NULL)"
        else:
            hit = f"COALESCE({value} = {arg(first)}, FALSE)"
        sure = hit if op == "==" else f"(NOT {hit})"
    elif op == "in":
        present = [v for v in c.values if v is not None]
        parts = []
        if present:
            array_cast = cast.replace("::", "[]::") + "[]"  # text::x -> text[]::x[]
            array = params.add([_arg(kind, v, c.ci) for v in present], array_cast)
            parts.append(f"COALESCE({value} = ANY({array}), FALSE)")
        if len(present) < len(c.values):
            parts.append(f"({value} IS NULL)")
        # an empty list matches nothing (the value is still named: its parameters are used)
        sure = "(" + " OR ".join(parts) + ")" if parts else f"({value} IS NULL AND FALSE)"
    elif op == "between":
        low, high = arg(c.values[0]), arg(c.values[1])
        sure = f"COALESCE({value} >= {low} AND {value} <= {high}, FALSE)"
    elif op in _ORDER_OPS:
        sure = f"COALESCE({value} {_ORDER_OPS[op]} {arg(c.values[0])}, FALSE)"
    else:
        raise Unsupported(f"operator {op!r}")
    if unsure is None:
        return sure
    return f"(CASE WHEN COALESCE({unsure}, FALSE) THEN NULL ELSE {sure} END)"


def _like_pattern(pattern: str) -> str:
    """A Realm LIKE pattern (``*``, ``?``) as a SQL LIKE pattern (``%``, ``_``, ``\\``)."""
    out: list[str] = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
