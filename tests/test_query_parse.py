"""The query language: parser, binder, conjoin, and evaluate() agreeing with the SQL."""

from __future__ import annotations

import datetime as dt
import sqlite3
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidesync.core.query import (
    Arg,
    BoolOp,
    BoundNot,
    Compare,
    Comparison,
    Literal,
    Logical,
    Not,
    Path,
    bind,
    conjoin,
    evaluate,
    like_match,
    parse,
    render,
    string_op,
)
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.errors import QueryError
from tidesync.objectid import ObjectId
from tidesync.store.sqlquery import compile_query, register_functions
from tidesync.store.sqlvalues import column_type, quote, table_name, to_column

UTC = dt.UTC

OBJ = ModelSchema(
    "Obj",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("b", Kind.BOOL, optional=True),
        FieldSchema("i", Kind.INT, optional=True),
        FieldSchema("f", Kind.FLOAT, optional=True),
        FieldSchema("s", Kind.STR, optional=True),
        FieldSchema("by", Kind.BYTES, optional=True),
        FieldSchema("t", Kind.DATETIME, optional=True),
        FieldSchema("d", Kind.DECIMAL, optional=True),
        FieldSchema("u", Kind.UUID, optional=True),
        FieldSchema("o", Kind.OBJECTID, optional=True),
        FieldSchema("c", Kind.COUNTER),
        FieldSchema("ints", Kind.INT, Collection.LIST, optional=True),
        FieldSchema("strs", Kind.STR, Collection.SET),
        FieldSchema("link", Kind.LINK, optional=True, target="Obj"),
        FieldSchema("links", Kind.LINK, Collection.LIST, target="Obj"),
    ),
    "id",
)
SCHEMAS = {"Obj": OBJ}


def p(text: str) -> Any:
    return parse(text).predicate


def bound(text: str, *args: Any) -> Any:
    return bind(parse(text), OBJ, SCHEMAS, args)


# ------------------------------------------------------------------------------ parser


def test_comparison_shapes() -> None:
    c = p("i == 5")
    assert c == Comparison(Path(("i",), (0,)), "==", Literal(5, "5", 5), 2)
    assert p("i = 5").op == "==" and p("i <> 5").op == "!=" and p("i >= -2").right.value == -2
    assert p("s BeginsWith[C] 'x'").op == "beginswith" and p("s beginswith[c] 'x'").ci
    assert p("s ==[c] $1").right == Arg(1, 8)
    assert p("i BETWEEN {1, $0}").right.items == (Literal(1, "1", 11), Arg(0, 14))
    assert p("i IN {}").right.items == ()
    assert p("i in $0").right == Arg(0, 5)
    c = p("any ints > 2")
    assert c.quantifier == "any" and c.left.segments == ("ints",)
    assert p("SOME ints > 2").quantifier == "any"
    assert p("None ints > 2").quantifier == "none" and p("ALL ints > 2").quantifier == "all"
    assert p("link.link.s == null").left == Path(("link", "link", "s"), (0, 5, 10))
    assert p("ints.@COUNT > 1").left.segments == ("ints", "@count")
    assert p("TRUEPREDICATE") == Logical("true", (), 0)
    assert p("falsepredicate").op == "false"


def test_literals() -> None:
    assert p("s == 'it\\'s \\\"q\\\" \\\\ \\n \\u00e9'").right.value == 'it\'s "q" \\ \n é'
    assert p("s == \"dq 'x'\"").right.value == "dq 'x'"
    assert p("f == 1.5e3").right.value == 1500.0 and p("f == -0.25").right.value == -0.25
    assert p("b == TRUE").right.value is True and p("b == False").right.value is False
    assert p("s == NULL").right.value is None and p("s == nil").right.value is None
    oid = p("o == oid(507f1f77bcf86cd799439011)").right.value
    assert oid == ObjectId("507f1f77bcf86cd799439011")
    u = p("u == uuid(12345678-1234-5678-1234-567812345678)").right.value
    assert u == uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert p("t == T1:500000").right.value == dt.datetime(1970, 1, 1, 0, 0, 1, 500, UTC)
    assert p("t == T-1:-500000").right.value == dt.datetime(1969, 12, 31, 23, 59, 58, 999500, UTC)
    assert p("t == 2024-02-29@13:14:15").right.value == dt.datetime(2024, 2, 29, 13, 14, 15, 0, UTC)
    assert p("t > 2024-02-29T13:14:15:123456789").right.value == dt.datetime(
        2024, 2, 29, 13, 14, 15, 123456, UTC
    )


def test_precedence_not_and_or() -> None:
    tree = p("i == 1 OR i == 2 AND NOT i == 3 || !(i == 4) && i == 5")
    assert isinstance(tree, Logical) and tree.op == "or" and len(tree.terms) == 3
    middle = tree.terms[1]
    assert middle.op == "and" and isinstance(middle.terms[1], Not)
    last = tree.terms[2]
    assert last.op == "and" and isinstance(last.terms[0], Not)
    grouped = p("(i == 1 or i == 2) and i == 3")
    assert grouped.op == "and" and grouped.terms[0].op == "or"
    assert p("NOT NOT i == 1").term.term.op == "=="


def test_trailing_clauses() -> None:
    q = parse("TRUEPREDICATE SORT(i ASC, link.s Descending) LIMIT(10) DISTINCT(s, i)")
    assert [(k.path.dotted, k.ascending) for k in q.sort or ()] == [("i", True), ("link.s", False)]
    assert q.limit == 10 and [d.dotted for d in q.distinct or ()] == ["s", "i"]
    q = parse("i > 1 limit(3) sort(i desc)")
    assert q.limit == 3 and q.sort is not None and not q.sort[0].ascending
    assert parse("i > 1").sort is None and parse("i > 1").limit is None
    b = bound("TRUEPREDICATE SORT(i ASC, s DESC) LIMIT(2) DISTINCT(s)")
    assert b.sort == (("i", True), ("s", False)) and b.limit == 2 and b.distinct == ("s",)


def test_render_round_trips() -> None:
    for text in (
        "i == 1 OR NOT (s BEGINSWITH[c] 'a\\'b' AND ALL ints IN {1, $0}) SORT(i DESC) LIMIT(4)",
        "link.s LIKE '*x?' && f BETWEEN {-1.5, 2e3} DISTINCT(i)",
        "t > T1:2 and o == oid(507f1f77bcf86cd799439011)",
    ):
        q = parse(text)
        again = parse(render(q))
        assert render(again) == render(q)
        assert bind(again, OBJ, SCHEMAS, [2]).predicate == bind(q, OBJ, SCHEMAS, [2]).predicate


def test_conjoin() -> None:
    a = parse("i > $0 SORT(i ASC) LIMIT(5)")
    b = parse("s == $0 SORT(s DESC)")
    q = conjoin(a, b)
    assert q.sort is not None and q.sort[0].path.dotted == "s" and q.limit == 5
    bq = bind(q, OBJ, SCHEMAS, [1, "x"])
    assert isinstance(bq.predicate, BoolOp) and bq.predicate.op == "and"
    first, second = bq.predicate.terms
    assert isinstance(first, Compare) and first.values == (1,)
    assert isinstance(second, Compare) and second.values == ("x",)
    q = conjoin(parse("TRUEPREDICATE"), parse("s == $0"), arg_offset=2)
    assert bind(q, OBJ, SCHEMAS, [0, 0, "y"]).predicate.terms[1].values == ("y",)
    with pytest.raises(QueryError) as exc:
        bind(conjoin(parse("i > 1"), parse("nope == 1")), OBJ, SCHEMAS, [])
    assert exc.value.query[exc.value.position or 0 :].startswith("nope")


PARSE_ERRORS = [
    ("", 0),
    ("   ", 3),
    ("i ==", 4),
    ("i == 'abc", 5),
    ("s == 'a\\q'", 7),
    ("i ~ 3", 2),
    ("i == 5 i", 7),
    ("(i == 5", 7),
    ("i <[c] 5", 3),
    ("o == oid(123)", 5),
    ("u == uuid(xyz)", 5),
    ("t == 2024-13-01@00:00:00", 5),
    ("t == T1:-5", 5),
    ("i == 5 LIMIT(-1)", 13),
    ("i == 5 LIMIT(1.5)", 13),
    ("i == 5 SORT(i)", 13),
    ("i == 5 LIMIT(1) LIMIT(2)", 16),
    ("ints.@count.x == 1", 11),
    ("i BETWEEN {1}", 10),
    ("i == $x", 5),
    ("i IN {1, s}", 9),
    ("12abc == 1", 0),
    ("i == 1 AND", 10),
    ("i [x] 1", 2),
    ("i == 1 SORT(i ASC", 17),
    ("s == @count", 5),
]


@pytest.mark.parametrize(("text", "position"), PARSE_ERRORS)
def test_parse_errors_point_at_the_token(text: str, position: int) -> None:
    with pytest.raises(QueryError) as exc:
        parse(text)
    assert exc.value.position == position, str(exc.value)
    assert exc.value.query == text


BIND_ERRORS: list[tuple[str, tuple[Any, ...], int]] = [
    ("nope == 1", (), 0),
    ("link.nope == 1", (), 5),
    ("i.s == 1", (), 2),
    ("i.@count == 1", (), 2),
    ("ints.@foo == 1", (), 5),
    ("@count == 1", (), 0),
    ("i BEGINSWITH 'a'", (), 2),
    ("ints CONTAINS 'a'", (), 5),
    ("i ==[c] 5", (), 2),
    ("i == $3", (1, 2), 5),
    ("i == 'a'", (), 5),
    ("i == $0", ("a",), 5),
    ("i == $0", (True,), 5),
    ("b == 1", (), 5),
    ("f > $0", (float("nan"),), 4),
    ("d > $0", ("1",), 4),
    ("t > 5", (), 4),
    ("u == 'x'", (), 5),
    ("o == $0", ("507f1f77bcf86cd799439011",), 5),
    ("by == 'x'", (), 6),
    ("ANY i == 1", (), 0),
    ("i < null", (), 4),
    ("i BETWEEN {null, 2}", (), 11),
    ("s CONTAINS null", (), 11),
    ("i == s", (), 5),
    ("5 == 5", (), 0),
    ("'a' CONTAINS s", (), 0),
    ("i IN $0", (5,), 5),
    ("i IN $0", (["a"],), 5),
    ("i IN {1, 'a'}", (), 9),
    ("link < 1", (), 5),
    ("link == 'x'", (), 8),
    ("link.s == 1", (), 10),
    ("'x' IN s", (), 7),
    ("TRUEPREDICATE SORT(ints ASC)", (), 19),
    ("TRUEPREDICATE SORT(links.i ASC)", (), 19),
    ("TRUEPREDICATE DISTINCT(nope)", (), 23),
    ("ints.@count == 'a'", (), 15),
    ("s.@length > 'a'", (), 12),
]


@pytest.mark.parametrize(("text", "args", "position"), BIND_ERRORS)
def test_bind_errors_point_at_the_token(text: str, args: tuple[Any, ...], position: int) -> None:
    with pytest.raises(QueryError) as exc:
        bind(parse(text), OBJ, SCHEMAS, args)
    assert exc.value.position == position, str(exc.value)
    assert "^" in str(exc.value)


def test_bind_resolves_paths_and_values() -> None:
    c = bound("link.links.i > 2").predicate
    assert c.path.multi and [h.many for h in c.path.hops] == [False, True]
    assert c.path.model == "Obj" and c.path.kind is Kind.INT
    c = bound("d > 1.10").predicate
    assert c.values == (Decimal("1.10"),) and str(c.values[0]) == "1.10"
    assert bound("f > $0", 2).predicate.values == (2,)
    assert bound("i IN $0", {3}).predicate.values == (3,)
    assert bound("ints.@count > 1").predicate.path.attr == "count"
    assert bound("link == 3").predicate.path.kind is Kind.INT
    n = bound("NOT (i == 1)").predicate
    assert isinstance(n, BoundNot)
    c = bound("7 > i").predicate
    assert c.op == "<" and c.values == (7,)


def test_string_helpers() -> None:
    assert like_match("abc", "a*") and like_match("abc", "?b?") and not like_match("abc", "?b")
    assert like_match("a.c", "a.c") and not like_match("abc", "a.c")
    assert like_match("a\nb", "a*b") and like_match("", "*") and not like_match("", "?")
    assert string_op("like", "ABC", "a*", True) and not string_op("like", "ABC", "a*", False)
    assert string_op("eq", "STRASSE", "straße", True)
    assert not string_op("contains", None, "a", False)


def test_evaluate_links_and_missing_targets() -> None:
    objs = {1: {"id": 1, "i": 5, "link": 2, "links": [2, 99]}, 2: {"id": 2, "i": 8, "link": 99}}

    def lookup(model: str, pk: Any) -> dict[str, Any] | None:
        assert model == "Obj"
        return objs.get(pk)

    def ev(text: str, obj: int) -> bool:
        return evaluate(bound(text), objs[obj], lookup)

    assert ev("link.i == 8", 1) and not ev("link.i == 8", 2)
    assert ev("link.i == null", 2)  # dangling link reads as null
    assert ev("ALL links.i > 7", 1)  # the dangling element is dropped
    assert ev("links.@count == 2", 1) and ev("ints.@count == 0", 1)
    assert ev("link.link.i == null", 1)


# ------------------------------------------------- evaluate() and the SQL agree (property)

INTS = [-2, 0, 1, 3]
FLOATS = [-1.5, 0.0, 2.0, float("inf"), float("-inf")]
STRS = ["", "a", "A", "ab", "Straße", "STRASSE", "b*", "%_'"]
BYTES = [b"", b"\x00", b"\x01\xff", b"a"]
TIMES = [dt.datetime(2020, 1, 1, tzinfo=UTC), dt.datetime(1969, 7, 20, 20, 17, tzinfo=UTC)]
DECS = [Decimal("1"), Decimal("1.0"), Decimal("-2.5"), Decimal("10")]
UUIDS = [uuid.UUID(int=1), uuid.UUID(int=2**127)]
OIDS = [ObjectId("00" * 12), ObjectId("ab" * 12)]
DOMAIN: dict[str, list[Any]] = {
    "b": [True, False],
    "i": INTS,
    "c": INTS,
    "f": FLOATS,
    "s": STRS,
    "by": BYTES,
    "t": TIMES,
    "d": DECS,
    "u": UUIDS,
    "o": OIDS,
}
N_OBJECTS = 6


@st.composite
def objects(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    pks = st.integers(0, N_OBJECTS)  # N_OBJECTS itself is a dangling link
    for pk in range(N_OBJECTS):
        obj: dict[str, Any] = {"id": pk}
        for name, dom in DOMAIN.items():
            values = st.sampled_from(dom)
            obj[name] = draw(values if name == "c" else st.none() | values)
        obj["ints"] = draw(st.lists(st.none() | st.sampled_from(INTS), max_size=3))
        obj["strs"] = draw(st.sets(st.sampled_from(STRS), max_size=3))
        obj["link"] = draw(st.none() | pks)
        obj["links"] = draw(st.lists(pks, max_size=3))
        out.append(obj)
    return out


SCALAR_PATHS = ["b", "i", "c", "f", "s", "by", "t", "d", "u", "o"]
ORDERED = ["<", "<=", ">", ">="]


@st.composite
def leaves(draw: st.DrawFn, args: list[Any]) -> str:
    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args) - 1}"

    shape = draw(st.integers(0, 9))
    prefix = draw(st.sampled_from(["", "", "link.", "link.link."]))
    if shape <= 3:
        name = draw(st.sampled_from(SCALAR_PATHS))
        dom = DOMAIN[name]
        op = draw(st.sampled_from(["==", "!=", *ORDERED, "between", "in"]))
        if op == "between":
            lo, hi = draw(st.sampled_from(dom)), draw(st.sampled_from(dom))
            return f"{prefix}{name} BETWEEN {{{arg(lo)}, {arg(hi)}}}"
        if op == "in":
            items = draw(st.lists(st.none() | st.sampled_from(dom), max_size=3))
            return f"{prefix}{name} IN {arg(items)}"
        value = draw(st.sampled_from(dom) if op in ORDERED else st.none() | st.sampled_from(dom))
        return f"{prefix}{name} {op} {arg(value)}"
    if shape == 4:
        op = draw(st.sampled_from(["BEGINSWITH", "ENDSWITH", "CONTAINS", "LIKE", "==", "!="]))
        ci = draw(st.sampled_from(["", "[c]"]))
        pattern = draw(st.sampled_from([*STRS, "*", "?", "a*", "*b?", "s*e"]))
        return f"{prefix}s {op}{ci} {arg(pattern)}"
    if shape == 5:
        coll = draw(st.sampled_from(["ints", "strs", "links"]))
        op = draw(st.sampled_from(["==", "!=", *ORDERED]))
        return f"{prefix}{coll}.@count {op} {arg(draw(st.integers(0, 3)))}"
    quant = draw(st.sampled_from(["", "ANY ", "ALL ", "NONE "]))
    if shape == 6:
        op = draw(st.sampled_from(["==", "!=", *ORDERED]))
        value = draw(st.sampled_from(INTS) if op in ORDERED else st.none() | st.sampled_from(INTS))
        return f"{quant}{prefix}ints {op} {arg(value)}"
    if shape == 7:
        op = draw(st.sampled_from(["==", "!=", "BEGINSWITH[c]", "LIKE", ">"]))
        return f"{quant}{prefix}strs {op} {arg(draw(st.sampled_from(STRS)))}"
    if shape == 8:
        name = draw(st.sampled_from(["i", "f", "s", "d", "link.i"]))
        op = draw(st.sampled_from(["==", "!=", *ORDERED]))
        value = draw(st.sampled_from(DOMAIN[name.rsplit(".", 1)[-1]]))
        return f"{quant}{prefix}links.{name} {op} {arg(value)}"
    return draw(st.sampled_from(["TRUEPREDICATE", "FALSEPREDICATE", "link == null"]))


@st.composite
def queries(draw: st.DrawFn) -> tuple[str, list[Any]]:
    args: list[Any] = []

    def build(depth: int) -> str:
        kind = draw(st.integers(0, 5)) if depth < 3 else 0
        if kind <= 2:
            return draw(leaves(args))
        if kind == 3:
            return f"NOT ({build(depth + 1)})"
        joiner = " AND " if kind == 4 else " OR "
        return joiner.join(f"({build(depth + 1)})" for _ in range(draw(st.integers(2, 3))))

    return build(0), args


def _table(conn: sqlite3.Connection, objs: list[dict[str, Any]]) -> None:
    cols = ", ".join(f"{quote(f.name)} {column_type(f, SCHEMAS)}" for f in OBJ.fields)
    conn.execute(f"CREATE TABLE {table_name('Obj')} ({cols})")
    marks = ", ".join("?" for _ in OBJ.fields)
    for o in objs:
        row = [to_column(f, o[f.name], SCHEMAS) for f in OBJ.fields]
        conn.execute(f"INSERT INTO {table_name('Obj')} VALUES ({marks})", row)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objs=objects(), query=queries())
def test_evaluate_agrees_with_sql(objs: list[dict[str, Any]], query: tuple[str, list[Any]]) -> None:
    text, args = query
    b = bind(parse(text), OBJ, SCHEMAS, args)
    by_pk = {o["id"]: o for o in objs}
    expected = {o["id"] for o in objs if evaluate(b, o, lambda _m, pk: by_pk.get(pk))}
    conn = sqlite3.connect(":memory:")
    try:
        register_functions(conn)
        _table(conn, objs)
        cq = compile_query(b, SCHEMAS)
        got = {
            r[0] for r in conn.execute(f'SELECT id FROM "t_Obj" AS t0 WHERE {cq.where}', cq.params)
        }
    finally:
        conn.close()
    assert got == expected, (text, args, cq.where)
