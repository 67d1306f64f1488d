"""support/sqlbatch.py: many rows per INSERT write what one-row ``executemany`` writes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidesync.support import sqlbatch
from tidesync.support.sqlbatch import insert_rows

_UPSERT = " ON CONFLICT (k) DO UPDATE SET a = excluded.a, b = excluded.b"


def _db(width: int) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    cols = ", ".join(f"c{i}" for i in range(1, width))
    conn.execute(f"CREATE TABLE t (k INTEGER PRIMARY KEY{', ' + cols if cols else ''})")
    return conn


def _dump(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT * FROM t ORDER BY k").fetchall()


values = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5), st.binary())


@given(
    width=st.integers(1, 12),
    keys=st.lists(st.integers(0, 10**6), unique=True, max_size=450),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_the_same_rows_as_executemany(width: int, keys: list[int], data: st.DataObject) -> None:
    rows = [[k, *data.draw(st.lists(values, min_size=width - 1, max_size=width - 1))] for k in keys]
    one, many = _db(width), _db(width)
    marks = ", ".join("?" * width)
    one.executemany(f"INSERT INTO t VALUES ({marks})", rows)
    insert_rows(many, "INSERT INTO t VALUES", width, rows)
    assert _dump(many) == _dump(one)


@given(
    ops=st.lists(
        st.tuples(st.integers(0, 30), st.integers(-(2**63), 2**63 - 1), st.text(max_size=3)),
        max_size=300,
    )
)
@settings(max_examples=60, deadline=None)
def test_an_upsert_tail_applies_rows_in_order(ops: list[tuple[int, int, str]]) -> None:
    """Rows of one key in one statement update each other in order, as one per step."""
    one, many = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    for conn in (one, many):
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, a, b)")
    one.executemany("INSERT INTO t VALUES (?, ?, ?)" + _UPSERT, ops)
    insert_rows(many, "INSERT INTO t VALUES", 3, ops, _UPSERT)
    assert _dump(many) == _dump(one)


@pytest.fixture
def small_statements(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(sqlbatch, "MAX_ROWS", 4)
    yield


def test_statements_stay_within_the_parameter_limit(small_statements: None) -> None:
    statements: list[str] = []
    conn = _db(400)
    conn.set_trace_callback(statements.append)
    rows = [[k, *range(399)] for k in range(7)]
    insert_rows(conn, "INSERT INTO t VALUES", 400, rows)
    assert len(statements) == 4  # 999 // 400 = 2 rows per statement: 2, 2, 2, 1
    assert [r[0] for r in _dump(conn)] == list(range(7))
    statements.clear()
    conn = _db(3)
    conn.set_trace_callback(statements.append)
    insert_rows(conn, "INSERT INTO t VALUES", 3, [[k, k, k] for k in range(10)])
    assert len(statements) == 3  # MAX_ROWS 4: 4, 4, 2
    assert len(_dump(conn)) == 10


def test_a_failing_row_fails_its_statement_and_the_transaction_rolls_back() -> None:
    conn = _db(2)
    conn.execute("INSERT INTO t VALUES (5, 'old')")
    conn.execute("BEGIN IMMEDIATE")
    rows = [[k, "new"] for k in range(10)]  # key 5 is stored already
    with pytest.raises(sqlite3.IntegrityError):
        insert_rows(conn, "INSERT INTO t VALUES", 2, rows)
    conn.execute("ROLLBACK")
    assert _dump(conn) == [(5, "old")]


def test_rows_of_the_wrong_width_are_refused_not_misaligned() -> None:
    conn = _db(3)
    with pytest.raises(sqlite3.ProgrammingError):
        insert_rows(conn, "INSERT INTO t VALUES", 3, [[1, 2, 3], [4, 5]])
    assert _dump(conn) == []
