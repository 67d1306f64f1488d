"""Compile bound queries (``core/query.py``) to SQLite, with the same semantics as ``evaluate``.

The store keeps one table per model laid out by ``store/sqlvalues.py``; this module turns a
:class:`~tidesync.core.query.BoundQuery` into a WHERE expression over that table (alias
``t0``), its parameters, and ORDER BY / LIMIT / DISTINCT parts. Every leaf compiles to a
two-valued SQL expression (never NULL), so ``NOT`` means exactly what it means in Python.
Plain comparisons on a column stay in a form SQLite's planner can serve from an index.

A float column holds NaN and ``-0.0`` as their 8 bytes (``store/sqlvalues.py``); queries
read those as ``core.query`` does, NaN as null and ``-0.0`` as ``0.0``: a plain comparison
on the column keeps an index-friendly form that also handles the two BLOBs, and anywhere
else the column is read through :func:`float_value`.

Operations SQLite cannot express exactly (case folding, Realm's LIKE, decimal order, JSON
floats such as ``"Infinity"``) go through deterministic functions registered on every
connection by :func:`register_functions`; they call the same Python code ``evaluate`` uses.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ..core.query import (
    BoolOp,
    BoundNot,
    BoundPath,
    BoundPredicate,
    BoundQuery,
    Compare,
    Hop,
    string_op,
)
from ..core.schema import Collection, Kind, ModelSchema
from .sqlvalues import NEG_ZERO, quote, scalar_to_json, scalar_to_sql, table_name

__all__ = ["CompiledQuery", "compile_query", "register_functions"]


@dataclass(frozen=True)
class CompiledQuery:
    """SQL pieces for ``SELECT ... FROM "t_<Model>" AS t0 WHERE {where} ORDER BY ... LIMIT``."""

    where: str
    params: list[Any]
    order_by: list[str]
    limit: int | None
    distinct: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------- SQL functions


def _dec(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _dec_cmp(a: Any, b: Any) -> int | None:
    if a is None or b is None:
        return None
    try:
        x, y = _dec(a), _dec(b)
        return 0 if x == y else (-1 if x < y else 1)
    except (InvalidOperation, ValueError):
        return None


def _decimal_collation(a: str, b: str) -> int:
    result = _dec_cmp(a, b)
    if result is None:  # not a number: fall back to text order, deterministically
        return (a > b) - (a < b)
    return result


def _json_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, str):
        return {"Infinity": math.inf, "-Infinity": -math.inf}.get(v)  # "NaN" -> NULL
    return float(v)


def _strop(value: Any, pattern: Any, op: str, ci: int) -> int:
    return 1 if string_op(op, value, pattern, bool(ci)) else 0


def _fold(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


def _like(value: Any, pattern: Any, ci: int) -> int:
    return _strop(value, pattern, "like", ci)


def register_functions(conn: sqlite3.Connection) -> None:
    """Register the deterministic functions and collation compiled queries use.

    ``ts_fold(text)`` = ``str.casefold``; ``ts_like(value, pattern, ci)`` = Realm LIKE;
    ``ts_strop(value, pattern, op, ci)`` for ``eq/beginswith/endswith/contains/like``;
    ``ts_dec_cmp(a, b)`` = -1/0/1 comparing decimals (NULL if either is not a number);
    ``ts_jfloat(v)`` decodes a float from its JSON form; collation ``ts_decimal``.
    """
    conn.create_function("ts_fold", 1, _fold, deterministic=True)
    conn.create_function("ts_like", 3, _like, deterministic=True)
    conn.create_function("ts_strop", 4, _strop, deterministic=True)
    conn.create_function("ts_dec_cmp", 2, _dec_cmp, deterministic=True)
    conn.create_function("ts_jfloat", 1, _json_float, deterministic=True)
    conn.create_collation("ts_decimal", _decimal_collation)


# -------------------------------------------------------------------------- compiler

_SQL_OPS = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PY_OPS: dict[str, Any] = {
    "<": float.__lt__,
    "<=": float.__le__,
    ">": float.__gt__,
    ">=": float.__ge__,
}
#: ``-0.0`` as a float column holds it (a BLOB literal); every other BLOB there is a NaN.
_NZ = f"x'{NEG_ZERO.hex()}'"


def float_value(col: str) -> str:
    """A float column's value as queries compare it: NaN (a BLOB) as NULL, ``-0.0`` as
    ``0.0``, everything else as stored (numbers sort before BLOBs, none is TEXT)."""
    return (
        f"(CASE WHEN typeof({col}) = 'blob' THEN (CASE WHEN {col} = {_NZ} THEN 0.0 END) "
        f"ELSE {col} END)"
    )


class _Compiler:
    def __init__(self, schemas: dict[str, ModelSchema]) -> None:
        self.schemas = schemas
        self.n = 0
        self.params: list[Any] = []

    def alias(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def pk_column(self, model: str) -> str:
        return quote(self.schemas[model].primary_key)

    # ---- values of a path

    def terminal(self, alias: str, path: BoundPath) -> str:
        col = f"{alias}.{quote(path.field.name)}"
        if path.attr is None and path.field.kind is Kind.FLOAT and not path.field.is_collection:
            return float_value(col)
        if path.attr == "count":
            if path.field.collection is Collection.DICT:
                return f"(SELECT count(*) FROM json_each({col}))"
            return f"COALESCE(json_array_length({col}), 0)"
        if path.attr == "size":
            return f"length({col})"
        return col

    def scalar(self, alias: str, path: BoundPath, depth: int = 0) -> str:
        """The single value of a path with only to-one hops (NULL when a link is missing)."""
        if depth == len(path.hops):
            return self.terminal(alias, path)
        hop = path.hops[depth]
        a = self.alias("t")
        inner = self.scalar(a, path, depth + 1)
        return (
            f"(SELECT {inner} FROM {table_name(hop.target)} AS {a} "
            f"WHERE {a}.{self.pk_column(hop.target)} = {alias}.{quote(hop.field)})"
        )

    def exists(self, alias: str, path: BoundPath, c: Compare, negate: bool, depth: int = 0) -> str:
        """True when some value of a many-valued path passes (or, negated, fails) the test."""
        if depth == len(path.hops):
            if not path.elements:
                return self.test(c, self.terminal(alias, path), negate, simple=False)
            j = self.alias("j")
            value = f"{j}.value"
            if path.kind is Kind.FLOAT:
                value = f"ts_jfloat({value})"
            col = f"{alias}.{quote(path.field.name)}"
            cond = self.test(c, value, negate, simple=False, json=True)
            return f"EXISTS (SELECT 1 FROM json_each({col}) AS {j} WHERE {cond})"
        hop: Hop = path.hops[depth]
        a = self.alias("t")
        inner = self.exists(a, path, c, negate, depth + 1)
        link = f"{alias}.{quote(hop.field)}"
        target = f"{table_name(hop.target)} AS {a}"
        pk = f"{a}.{self.pk_column(hop.target)}"
        if hop.many:
            j = self.alias("j")
            return (
                f"EXISTS (SELECT 1 FROM json_each({link}) AS {j} JOIN {target} "
                f"ON {pk} = {j}.value WHERE {inner})"
            )
        return f"EXISTS (SELECT 1 FROM {target} WHERE {pk} = {link} AND {inner})"

    # ---- one test on one SQL value

    def param(self, c: Compare, value: Any, json: bool) -> Any:
        kind = c.path.kind
        if value is None:
            return None
        if type(value) is int and (kind is Kind.INT or kind is Kind.COUNTER):
            if not _INT64_MIN <= value <= _INT64_MAX:
                # SQLite cannot bind it; it lies beyond every stored int64, and so does
                # ±inf, which SQLite compares with an int64 exactly as Python would
                return math.inf if value > 0 else -math.inf
        if kind is Kind.DECIMAL:
            return str(value)
        if kind is Kind.FLOAT or (isinstance(value, float) and kind is not Kind.BOOL):
            return float(value)
        if json:
            return int(value) if kind is Kind.BOOL else scalar_to_json(kind, value)
        return scalar_to_sql(kind, value)

    def test(self, c: Compare, e: str, negate: bool, simple: bool, json: bool = False) -> str:
        sql = self.positive(c, e, simple, json)
        return f"NOT ({sql})" if negate else sql

    def positive(self, c: Compare, e: str, simple: bool, json: bool) -> str:
        op, kind = c.op, c.path.kind
        ps = [self.param(c, v, json) for v in c.values]
        if op in ("beginswith", "endswith", "contains", "like"):
            self.params.append(ps[0])
            return f"ts_strop({e}, ?, '{op}', {1 if c.ci else 0})"
        if op in ("==", "!="):
            if ps[0] is None:
                return f"{e} IS NULL" if op == "==" else f"{e} IS NOT NULL"
            self.params.append(ps[0])
            if c.ci:
                eq = f"ts_strop({e}, ?, 'eq', 1)"
            elif kind is Kind.DECIMAL:
                eq = f"COALESCE(ts_dec_cmp({e}, ?) = 0, 0)"
            else:
                return f"{e} IS ?" if op == "==" else f"{e} IS NOT ?"
            return eq if op == "==" else f"NOT {eq}"
        if op == "in":
            if kind is Kind.DECIMAL:
                parts = []
                for p in ps:
                    if p is None:
                        parts.append(f"{e} IS NULL")
                    else:
                        self.params.append(p)
                        parts.append(f"COALESCE(ts_dec_cmp({e}, ?) = 0, 0)")
                return "(" + " OR ".join(parts) + ")" if parts else "0"
            present = [p for p in ps if p is not None]
            parts = []
            if present:
                self.params.extend(present)
                marks = ", ".join("?" for _ in present)
                parts.append(f"({e} IN ({marks}) AND {e} IS NOT NULL)")
            if len(present) < len(ps):
                parts.append(f"{e} IS NULL")
            return "(" + " OR ".join(parts) + ")" if parts else "0"
        if op == "between":
            return f"({self.ordered('>=', e, ps[0], kind, simple)} AND " + (
                f"{self.ordered('<=', e, ps[1], kind, simple)})"
            )
        return self.ordered(op, e, ps[0], kind, simple)

    def float_test(self, c: Compare, col: str) -> str:
        """:meth:`positive` on a float column itself, in forms an index serves."""
        op = c.op
        ps = [self.param(c, v, False) for v in c.values]
        if op in ("==", "!="):
            sql = self.float_eq(col, ps[0])
            return sql if op == "==" else f"NOT {sql}"
        if op == "in":
            return "(" + " OR ".join(self.float_eq(col, p) for p in ps) + ")" if ps else "0"
        if op == "between":
            low, high = self.float_ordered(">=", col, ps[0]), self.float_ordered("<=", col, ps[1])
            return f"({low} AND {high})"
        if op in _SQL_OPS:
            return self.float_ordered(op, col, ps[0])
        return self.positive(c, float_value(col), False, False)

    def float_eq(self, col: str, p: Any) -> str:
        """``col == p`` on a float column, two-valued; NaN (any BLOB but -0.0's) is null."""
        if p is None:
            return f"({col} IS NULL OR ({col} >= x'' AND {col} IS NOT {_NZ}))"
        self.params.append(p)
        if p == 0:
            return f"({col} IN (?, {_NZ}) AND {col} IS NOT NULL)"
        return f"{col} IS ?"  # a BLOB is never equal to a number

    def float_ordered(self, op: str, col: str, p: Any) -> str:
        """``col <op> p`` on a float column, two-valued: BLOBs sort after every number, so
        a lower bound gets the upper bound ``< x''``; -0.0 is tested as 0.0."""
        self.params.append(p)
        sql = f"{col} {_SQL_OPS[op]} ?"
        if op in (">", ">="):
            sql += f" AND {col} < x''"
        sql = f"({sql} AND {col} IS NOT NULL)"
        if _PY_OPS[op](0.0, float(p)):
            sql = f"({sql} OR {col} IS {_NZ})"
        return sql

    def ordered(self, op: str, e: str, p: Any, kind: Kind, simple: bool) -> str:
        self.params.append(p)
        if kind is Kind.DECIMAL:
            return f"COALESCE(ts_dec_cmp({e}, ?) {_SQL_OPS[op]} 0, 0)"
        if simple:
            return f"({e} {_SQL_OPS[op]} ? AND {e} IS NOT NULL)"
        return f"COALESCE({e} {_SQL_OPS[op]} ?, 0)"

    # ---- predicates

    def predicate(self, p: BoundPredicate) -> str:
        if isinstance(p, BoundNot):
            return f"NOT ({self.predicate(p.term)})"
        if isinstance(p, BoolOp):
            if p.op in ("true", "false"):
                return "1" if p.op == "true" else "0"
            joiner = " AND " if p.op == "and" else " OR "
            return "(" + joiner.join(self.predicate(t) for t in p.terms) + ")"
        path = p.path
        if not path.multi:
            simple = not path.hops and path.attr is None
            if simple and path.field.kind is Kind.FLOAT:
                return self.float_test(p, f"t0.{quote(path.field.name)}")
            return self.test(p, self.scalar("t0", path), False, simple)
        if p.quantifier == "all":
            return f"NOT {self.exists('t0', path, p, negate=True)}"
        found = self.exists("t0", path, p, negate=False)
        return f"NOT {found}" if p.quantifier == "none" else found

    def compile(self, bound: BoundQuery) -> CompiledQuery:
        self.params = []
        where = self.predicate(bound.predicate)
        order_by = []
        for path, (_, asc) in zip(bound.sort_paths, bound.sort):
            expr = self.scalar("t0", path)
            if path.kind is Kind.DECIMAL:
                expr += " COLLATE ts_decimal"
            order_by.append(f"{expr} {'ASC' if asc else 'DESC'}")
        distinct = [self.scalar("t0", p) for p in bound.distinct_paths]
        return CompiledQuery(where, self.params, order_by, bound.limit, distinct)


def compile_query(bound: BoundQuery, schemas: dict[str, ModelSchema]) -> CompiledQuery:
    """Compile a bound query to SQL over ``"t_<Model>" AS t0``; see :class:`CompiledQuery`."""
    return _Compiler(schemas).compile(bound)
