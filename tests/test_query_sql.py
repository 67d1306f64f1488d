"""Queries compiled by store/sqlquery.py and run on a real SQLite database."""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
import struct
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidesync.core.query import bind, conjoin, evaluate, parse
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.errors import QueryError
from tidesync.objectid import ObjectId
from tidesync.store.sqlquery import compile_query, register_functions
from tidesync.store.sqlvalues import column_type, from_column, quote, table_name, to_column

UTC = dt.UTC

USER = ModelSchema(
    "User",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("name", Kind.STR, optional=True),
        FieldSchema("age", Kind.INT),
        FieldSchema("friends", Kind.LINK, Collection.LIST, target="User"),
        FieldSchema("boss", Kind.LINK, optional=True, target="User"),
    ),
    "id",
)
TASK = ModelSchema(
    "Task",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("qty", Kind.INT, indexed=True),
        FieldSchema("name", Kind.STR, optional=True),
        FieldSchema("price", Kind.DECIMAL, optional=True),
        FieldSchema("ratio", Kind.FLOAT, optional=True),
        FieldSchema("done", Kind.BOOL),
        FieldSchema("due", Kind.DATETIME, optional=True),
        FieldSchema("ref", Kind.UUID, optional=True),
        FieldSchema("oid", Kind.OBJECTID, optional=True),
        FieldSchema("blob", Kind.BYTES, optional=True),
        FieldSchema("hits", Kind.COUNTER),
        FieldSchema("tags", Kind.STR, Collection.LIST),
        FieldSchema("scores", Kind.FLOAT, Collection.SET),
        FieldSchema("attrs", Kind.INT, Collection.DICT),
        FieldSchema("owner", Kind.LINK, optional=True, target="User"),
        FieldSchema("watchers", Kind.LINK, Collection.LIST, target="User"),
    ),
    "id",
)
SCHEMAS = {"User": USER, "Task": TASK}
U1 = uuid.UUID("12345678-1234-5678-1234-567812345678")
O1 = ObjectId("507f1f77bcf86cd799439011")

USERS: list[dict[str, Any]] = [
    {"id": "ann", "name": "Ann", "age": 41, "friends": ["bob", "cy"], "boss": None},
    {"id": "bob", "name": "Bob", "age": 25, "friends": [], "boss": "ann"},
    {"id": "cy", "name": None, "age": 33, "friends": ["bob"], "boss": "bob"},
]


def task(id: int, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {f.name: None for f in TASK.fields}
    base.update(id=id, qty=0, done=False, hits=0, tags=[], scores=set(), attrs={}, watchers=[])
    base.update(kw)
    return base


TASKS = [
    task(
        1,
        qty=5,
        name="Buy milk",
        price=Decimal("9.50"),
        ratio=0.5,
        done=True,
        owner="ann",
        tags=["home", "shop"],
        scores={1.5, 2.0},
        attrs={"a": 1},
        watchers=["bob", "cy"],
        due=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        ref=U1,
        oid=O1,
        blob=b"\x01\x02",
        hits=3,
    ),
    task(
        2,
        qty=10,
        name="buy BREAD",
        price=Decimal("10"),
        ratio=float("inf"),
        owner="bob",
        tags=["shop"],
        scores={float("-inf")},
        watchers=["ann"],
    ),
    task(
        3,
        qty=-1,
        name="100% done; it's_ok",
        price=Decimal("-3.25"),
        owner="cy",
        tags=["work", "home", "urgent"],
        attrs={"x": 5, "y": 6},
    ),
    task(4, qty=7, name=None, owner=None, tags=[], due=dt.datetime(2030, 1, 1, tzinfo=UTC)),
    task(5, qty=5, name="Straße", owner="missing", watchers=["missing"]),
]


def _create(conn: sqlite3.Connection, model: ModelSchema, rows: list[dict[str, Any]]) -> None:
    cols = ", ".join(f"{quote(f.name)} {column_type(f, SCHEMAS)}" for f in model.fields)
    conn.execute(f"CREATE TABLE {table_name(model.name)} ({cols})")
    marks = ", ".join("?" for _ in model.fields)
    for row in rows:
        values = [to_column(f, row[f.name], SCHEMAS) for f in model.fields]
        conn.execute(f"INSERT INTO {table_name(model.name)} VALUES ({marks})", values)


@pytest.fixture(scope="module")
def conn() -> sqlite3.Connection:
    c = sqlite3.connect(":memory:")
    register_functions(c)
    _create(c, USER, USERS)
    _create(c, TASK, TASKS)
    c.execute('CREATE INDEX "i_Task_qty" ON "t_Task"("qty")')
    return c


def _lookup(model: str, pk: Any) -> dict[str, Any] | None:
    rows = USERS if model == "User" else TASKS
    return next((r for r in rows if r["id"] == pk), None)


def run(conn: sqlite3.Connection, text: str, *args: Any, model: ModelSchema = TASK) -> list[Any]:
    """Matched pks in result order; also checks evaluate() agrees on the set."""
    bound = bind(parse(text), model, SCHEMAS, args)
    cq = compile_query(bound, SCHEMAS)
    order = ", ".join([*cq.order_by, "t0.rowid"])
    sql = f"SELECT t0.{quote(model.primary_key)} FROM {table_name(model.name)} AS t0 "
    sql += f"WHERE {cq.where} ORDER BY {order}"
    if cq.limit is not None:
        sql += f" LIMIT {cq.limit}"
    got = [r[0] for r in conn.execute(sql, cq.params)]
    rows = USERS if model is USER else TASKS
    expected = {r["id"] for r in rows if evaluate(bound, r, _lookup)}
    if cq.limit is None:
        assert set(got) == expected, (text, cq.where)
    return got


def ids(conn: sqlite3.Connection, text: str, *args: Any, model: ModelSchema = TASK) -> set[Any]:
    return set(run(conn, text, *args, model=model))


def test_comparisons(conn: sqlite3.Connection) -> None:
    assert ids(conn, "qty == 5") == {1, 5}
    assert ids(conn, "qty = $0", 10) == {2}
    assert ids(conn, "qty != 5") == {2, 3, 4}
    assert ids(conn, "qty <> 5") == {2, 3, 4}
    assert ids(conn, "qty < 5") == {3}
    assert ids(conn, "qty <= 5") == {1, 3, 5}
    assert ids(conn, "qty > 5") == {2, 4}
    assert ids(conn, "qty >= 7") == {2, 4}
    assert ids(conn, "5 < qty") == {2, 4}
    assert ids(conn, "qty BETWEEN {0, 7}") == {1, 4, 5}
    assert ids(conn, "qty > 4.5") == {1, 2, 4, 5}
    assert ids(conn, "done == true") == {1}
    assert ids(conn, "done != true") == {2, 3, 4, 5}
    assert ids(conn, "hits > 2") == {1}


def test_null_semantics(conn: sqlite3.Connection) -> None:
    assert ids(conn, "name == null") == {4}
    assert ids(conn, "name == nil") == {4}
    assert ids(conn, "name != null") == {1, 2, 3, 5}
    assert ids(conn, "name != 'Buy milk'") == {2, 3, 4, 5}  # null != x is true
    assert ids(conn, "NOT (name == 'Buy milk')") == {2, 3, 4, 5}
    assert ids(conn, "NOT (ratio < 1.0)") == {2, 3, 4, 5}  # null < 1 false, NOT true
    assert ids(conn, "ratio < 1.0") == {1}
    assert ids(conn, "due > 2025-01-01@00:00:00") == {4}
    assert ids(conn, "owner == null") == {4}


def test_other_kinds(conn: sqlite3.Connection) -> None:
    assert ids(conn, "price > 9.6") == {2}  # decimal order is numeric, not text
    assert ids(conn, "price == 10.00") == {2}
    assert ids(conn, "price < $0", Decimal("0")) == {3}
    assert ids(conn, "price BETWEEN {-5, 9.5}") == {1, 3}
    assert ids(conn, "price IN {10, 9.5}") == {1, 2}
    assert ids(conn, "ratio > 100") == {2}  # +inf
    assert ids(conn, "due == 2024-01-02@03:04:05") == {1}
    assert ids(conn, "due == T1704164645:0") == {1}
    assert ids(conn, "due < $0", dt.datetime(2025, 1, 1, tzinfo=UTC)) == {1}
    assert ids(conn, f"ref == uuid({U1})") == {1}
    assert ids(conn, "ref == $0", U1) == {1}
    assert ids(conn, f"oid == oid({O1})") == {1}
    assert ids(conn, "blob == $0", b"\x01\x02") == {1}
    assert ids(conn, "blob > $0", b"\x01") == {1}
    assert ids(conn, "name > 'a'") == {2}  # binary order: 'B' < 'S' < 'a' < 'b'


def test_string_operators(conn: sqlite3.Connection) -> None:
    assert ids(conn, "name BEGINSWITH 'Buy'") == {1}
    assert ids(conn, "name BEGINSWITH[c] 'buy'") == {1, 2}
    assert ids(conn, "name ENDSWITH 'ok'") == {3}
    assert ids(conn, "name ENDSWITH[c] 'BREAD'") == {2}
    assert ids(conn, "name CONTAINS 'milk'") == {1}
    assert ids(conn, "name CONTAINS[c] 'STRASSE'") == {5}  # casefold: ß -> ss
    assert ids(conn, "name ==[c] 'BUY MILK'") == {1}
    assert ids(conn, "name !=[c] 'BUY MILK'") == {2, 3, 4, 5}
    assert ids(conn, "name LIKE 'B*k'") == {1}
    assert ids(conn, "name LIKE '?uy*'") == {1, 2}
    assert ids(conn, "name LIKE[c] '*bread'") == {2}
    assert ids(conn, "name LIKE 'Buy'") == set()
    assert ids(conn, "NOT name CONTAINS 'u'") == {3, 4, 5}


def test_sql_metacharacters_are_literal(conn: sqlite3.Connection) -> None:
    assert ids(conn, "name CONTAINS '%'") == {3}
    assert ids(conn, "name CONTAINS $0", "_") == {3}
    assert ids(conn, "name LIKE '*%*'") == {3}
    assert ids(conn, "name LIKE $0", "100_ done*") == set()
    assert ids(conn, "name == $0", "100% done; it's_ok") == {3}
    assert ids(conn, "name == '100% done; it\\'s_ok'") == {3}
    assert ids(conn, "name == $0", 'x\'; DROP TABLE "t_Task"; --') == set()
    assert ids(conn, "name BEGINSWITH '1%'") == set()
    assert conn.execute('SELECT count(*) FROM "t_Task"').fetchone()[0] == 5


def test_in(conn: sqlite3.Connection) -> None:
    assert ids(conn, "qty IN {5, 7}") == {1, 4, 5}
    assert ids(conn, "qty IN $0", [10, -1]) == {2, 3}
    assert ids(conn, "qty IN $0", ()) == set()
    assert ids(conn, "name IN {null, 'Buy milk'}") == {1, 4}
    assert ids(conn, "NOT qty IN $0", {5}) == {2, 3, 4}
    assert ids(conn, "'home' IN tags") == {1, 3}


def test_collections(conn: sqlite3.Connection) -> None:
    assert ids(conn, "tags.@count == 0") == {4, 5}
    assert ids(conn, "tags.@size >= 2") == {1, 3}
    assert ids(conn, "attrs.@count == 2") == {3}
    assert ids(conn, "scores.@count == 1") == {2}
    assert ids(conn, "name.@length > 8") == {2, 3}
    assert ids(conn, "ANY tags == 'home'") == {1, 3}
    assert ids(conn, "SOME tags == 'home'") == {1, 3}
    assert ids(conn, "tags == 'shop'") == {1, 2}  # implicit ANY
    assert ids(conn, "ALL tags == 'shop'") == {2, 4, 5}  # vacuous truth on empty
    assert ids(conn, "NONE tags == 'shop'") == {3, 4, 5}
    assert ids(conn, "ANY tags BEGINSWITH[c] 'UR'") == {3}
    assert ids(conn, "ALL scores > 1") == {1, 3, 4, 5}
    assert ids(conn, "ANY scores < -1000") == {2}  # -inf in JSON
    assert ids(conn, "attrs > 5") == {3}  # dict values
    assert ids(conn, "ANY tags IN {'work', 'shop'}") == {1, 2, 3}


def test_links(conn: sqlite3.Connection) -> None:
    assert ids(conn, "owner.name == 'Ann'") == {1}
    assert ids(conn, "owner.age > 30") == {1, 3}
    assert ids(conn, "owner.name == null") == {3, 4, 5}  # null name, null link, dangling
    assert ids(conn, "owner.boss.name == $0", "Ann") == {2}
    assert ids(conn, "owner.boss.boss.id == 'ann'") == {3}
    assert ids(conn, "owner == 'bob'") == {2}
    assert ids(conn, "owner.friends.@count >= 1") == {1, 3}
    assert ids(conn, "ANY watchers.age > 40") == {2}
    assert ids(conn, "watchers.age < 30") == {1}  # implicit ANY
    assert ids(conn, "ALL watchers.age > 30") == {2, 3, 4, 5}  # dangling target dropped
    assert ids(conn, "ANY watchers.friends.name == 'Bob'") == {1, 2}
    assert ids(conn, "watchers == 'cy'") == {1}
    assert ids(conn, "ANY friends.name == 'Bob'", model=USER) == {"ann", "cy"}
    assert ids(conn, "boss.age < 30", model=USER) == {"cy"}


def test_logic_and_constants(conn: sqlite3.Connection) -> None:
    assert ids(conn, "TRUEPREDICATE") == {1, 2, 3, 4, 5}
    assert ids(conn, "FALSEPREDICATE") == set()
    assert ids(conn, "qty == 5 && name BEGINSWITH 'B' || qty == 7") == {1, 4}
    assert ids(conn, "qty == 5 AND (name BEGINSWITH 'B' OR qty == 7)") == {1}
    assert ids(conn, "!(qty == 5) and not done == true") == {2, 3, 4}


def test_sort_limit_distinct(conn: sqlite3.Connection) -> None:
    assert run(conn, "TRUEPREDICATE SORT(qty DESC)") == [2, 4, 1, 5, 3]
    assert run(conn, "TRUEPREDICATE SORT(qty ASC, id DESCENDING)") == [3, 5, 1, 4, 2]
    assert run(conn, "qty > 0 LIMIT(2) SORT(qty ASCENDING)") == [1, 5]
    assert run(conn, "TRUEPREDICATE SORT(price ASC)") == [4, 5, 3, 1, 2]  # nulls first
    assert run(conn, "owner != null SORT(owner.age DESC)") == [1, 3, 2, 5]
    assert run(conn, "TRUEPREDICATE LIMIT(0)") == []
    bound = bind(parse("TRUEPREDICATE DISTINCT(qty)"), TASK, SCHEMAS, [])
    cq = compile_query(bound, SCHEMAS)
    assert cq.distinct == ['t0."qty"']
    sql = f'SELECT DISTINCT {cq.distinct[0]} FROM "t_Task" AS t0 WHERE {cq.where}'
    assert sorted(r[0] for r in conn.execute(sql, cq.params)) == [-1, 5, 7, 10]


def test_indexed_equality_uses_the_index(conn: sqlite3.Connection) -> None:
    bound = bind(parse("qty == $0"), TASK, SCHEMAS, [5])
    cq = compile_query(bound, SCHEMAS)
    assert cq.where in ('t0."qty" = ?', 't0."qty" IS ?')
    plan = conn.execute(
        f'EXPLAIN QUERY PLAN SELECT * FROM "t_Task" AS t0 WHERE {cq.where}', cq.params
    ).fetchall()
    assert any("i_Task_qty" in row[-1] for row in plan), plan
    bound = bind(parse("qty > 3 AND qty < 6"), TASK, SCHEMAS, [])
    cq = compile_query(bound, SCHEMAS)
    plan = conn.execute(
        f'EXPLAIN QUERY PLAN SELECT * FROM "t_Task" AS t0 WHERE {cq.where}', cq.params
    ).fetchall()
    assert any("i_Task_qty" in row[-1] for row in plan), plan


def test_conjoin_narrows(conn: sqlite3.Connection) -> None:
    q = conjoin(parse("qty >= $0 SORT(qty DESC)"), parse("name BEGINSWITH[c] $0 LIMIT(1)"))
    bound = bind(q, TASK, SCHEMAS, [0, "b"])
    cq = compile_query(bound, SCHEMAS)
    sql = f'SELECT id FROM "t_Task" AS t0 WHERE {cq.where} ORDER BY {cq.order_by[0]} LIMIT 1'
    assert [r[0] for r in conn.execute(sql, cq.params)] == [2]


def test_functions_are_registered_and_deterministic(conn: sqlite3.Connection) -> None:
    row = conn.execute(
        "SELECT ts_fold('Straße'), ts_like('abc', 'a?c', 0), ts_like('ABC', 'a*', 1), "
        "ts_like('abc', 'a*', 1), ts_like(NULL, '*', 0), ts_dec_cmp('10', '9.5')"
    ).fetchone()
    assert row == ("strasse", 1, 1, 1, 0, 1)
    with pytest.raises(QueryError):
        bind(parse("name LIKE 5"), TASK, SCHEMAS, [])


# ------------------------------------------------ special floats (NaN, -0.0) in a column

READING = ModelSchema(
    "Reading",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("x", Kind.FLOAT, optional=True, indexed=True),
        FieldSchema("xs", Kind.FLOAT, Collection.LIST),
        FieldSchema("peer", Kind.LINK, optional=True, target="Reading"),
    ),
    "id",
)
R_SCHEMAS = {"Reading": READING}
NEG_NAN = struct.unpack(">d", bytes.fromhex("fff8000000000000"))[0]
ODD_NAN = struct.unpack(">d", bytes.fromhex("7ff0000000000bad"))[0]
SPECIAL = [math.nan, NEG_NAN, ODD_NAN, -0.0, 0.0, math.inf, -math.inf, -1.5, 2.0, 5e-324]
R_ARGS = [-0.0, 0.0, math.inf, -math.inf, -1.5, 2.0, 1, -3, 5e-324]


def _reading_db(xs: list[float | None]) -> sqlite3.Connection:
    c = sqlite3.connect(":memory:")
    register_functions(c)
    rows = [
        {"id": i, "x": x, "xs": [] if x is None else [x, 1.0], "peer": (i + 1) % len(xs)}
        for i, x in enumerate(xs)
    ]
    _create_in(c, READING, rows, R_SCHEMAS)
    c.execute('CREATE INDEX "i_Reading_x" ON "t_Reading"("x")')
    return c


def _create_in(
    conn: sqlite3.Connection, model: ModelSchema, rows: list[dict[str, Any]], schemas: Any
) -> None:
    cols = ", ".join(f"{quote(f.name)} {column_type(f, schemas)}" for f in model.fields)
    conn.execute(f"CREATE TABLE {table_name(model.name)} ({cols})")
    marks = ", ".join("?" for _ in model.fields)
    for row in rows:
        values = [to_column(f, row[f.name], schemas) for f in model.fields]
        conn.execute(f"INSERT INTO {table_name(model.name)} VALUES ({marks})", values)


R_QUERIES = st.sampled_from(
    [
        "x == $0",
        "x != $0",
        "x < $0",
        "x <= $0",
        "x > $0",
        "x >= $0",
        "x BETWEEN {$0, $1}",
        "x IN {$0, $1, nil}",
        "x IN {$0}",
        "x == nil",
        "x != nil",
        "NOT (x > $0)",
        "NOT (x == nil)",
        "peer.x == $0",
        "peer.x > $0",
        "peer.x == nil",
        "ANY xs == $0",
        "ALL xs > $0",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.none() | st.sampled_from(SPECIAL), min_size=1, max_size=8),
    R_QUERIES,
    st.sampled_from(R_ARGS),
    st.sampled_from(R_ARGS),
)
def test_special_floats_query_as_core_query_says(
    xs: list[float | None], text: str, a: float, b: float
) -> None:
    """NaN and -0.0 are BLOBs in the column; every query still agrees with ``evaluate``
    (NaN reads as null, -0.0 as 0.0), and SORT puts NaN with the nulls."""
    conn = _reading_db(xs)
    rows = {
        i: {"id": i, "x": x, "xs": [] if x is None else [x, 1.0], "peer": (i + 1) % len(xs)}
        for i, x in enumerate(xs)
    }
    bound = bind(parse(text), READING, R_SCHEMAS, [a, b])
    cq = compile_query(bound, R_SCHEMAS)
    sql = f'SELECT t0."id" FROM "t_Reading" AS t0 WHERE {cq.where}'
    got = {r[0] for r in conn.execute(sql, cq.params)}
    expected = {i for i, r in rows.items() if evaluate(bound, r, lambda m, pk: rows.get(pk))}
    assert got == expected, (text, a, b, cq.where)
    for direction in ("ASC", "DESC"):
        sort = bind(parse(f"TRUEPREDICATE SORT(x {direction})"), READING, R_SCHEMAS, [])
        sq = compile_query(sort, R_SCHEMAS)
        order = ", ".join([*sq.order_by, "t0.rowid"])
        got_order = [
            r[0] for r in conn.execute(f'SELECT id FROM "t_Reading" AS t0 ORDER BY {order}')
        ]

        nulls = [i for i, x in enumerate(xs) if x is None or x != x]
        numbers = [i for i, x in enumerate(xs) if x is not None and x == x]
        if direction == "ASC":  # nulls (and NaN) first; ties keep rowid order
            want = nulls + sorted(numbers, key=lambda i: xs[i])  # type: ignore[arg-type,return-value]
        else:
            want = sorted(numbers, key=lambda i: -xs[i]) + nulls  # type: ignore[operator]
        assert got_order == want, (direction, xs)


def test_special_floats_read_back_bit_exactly_and_keep_the_index() -> None:
    conn = _reading_db(SPECIAL)
    raw = [r[0] for r in conn.execute('SELECT x FROM "t_Reading" ORDER BY id')]
    assert [struct.pack(">d", from_column(READING.by_name["x"], v, R_SCHEMAS)) for v in raw] == [
        struct.pack(">d", x) for x in SPECIAL
    ]
    assert [type(v) for v in raw[:4]] == [bytes] * 4  # the NaNs and -0.0; the rest are REAL
    assert all(type(v) is float for v in raw[4:])
    for text in ("x == $0", "x > $0", "x BETWEEN {$0, $1}", "x <= $0"):
        bound = bind(parse(text), READING, R_SCHEMAS, [0.0, 3.0])
        cq = compile_query(bound, R_SCHEMAS)
        plan = conn.execute(
            f'EXPLAIN QUERY PLAN SELECT * FROM "t_Reading" AS t0 WHERE {cq.where}', cq.params
        ).fetchall()
        assert any("i_Reading_x" in row[-1] for row in plan), (text, plan)


def test_int_arguments_beyond_64_bits_compare_exactly(conn: sqlite3.Connection) -> None:
    """SQLite cannot bind them; they compare as Python compares ints (and as evaluate)."""
    assert ids(conn, "qty < $0", 2**70) == {1, 2, 3, 4, 5}
    assert ids(conn, "qty <= $0", 2**63) == {1, 2, 3, 4, 5}
    assert ids(conn, "qty > $0", -(2**63) - 1) == {1, 2, 3, 4, 5}
    assert ids(conn, "qty == $0", 2**64) == set()
    assert ids(conn, "qty != $0", -(2**64)) == {1, 2, 3, 4, 5}
    assert ids(conn, "qty IN {$0, 5}", 2**64) == {1, 5}
    assert ids(conn, "qty BETWEEN {$0, $1}", -(2**64), 2**64) == {1, 2, 3, 4, 5}
    assert ids(conn, "hits >= 9223372036854775808") == set()
    assert ids(conn, "ANY attrs < $0", 2**64) == {1, 3}  # dict values, in JSON
