"""Local database: inserts in one and in many transactions, and queries, beside raw sqlite3."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import tidesync as ts

from .harness import Context, timed

GROUP = "local database"


class Bench(ts.Model):
    """The benchmark workload: 5 fields, about 150 bytes as JSON."""

    id: int = ts.primary_key()
    owner: str
    title: str
    qty: int = ts.field(default=0, indexed=True)
    price: float = 0.0
    done: bool = False


def rows(n: int) -> list[tuple[int, str, str, int, float, bool]]:
    """The same rows for every system."""
    return [
        (
            i,
            f"owner-{i % 97}",
            f"task number {i} with a title of some length",
            i % 1000,
            (i % 1000) * 1.25,
            i % 3 == 0,
        )
        for i in range(n)
    ]


def _fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.unlink()
    return path


def _ts_insert(
    path: Path, data: list[tuple[int, str, str, int, float, bool]], per_tx: int
) -> float:
    _fresh(path)
    with ts.Database(ts.Configuration.local([Bench], path=path)) as db:

        def go() -> None:
            for start in range(0, len(data), per_tx):
                with db.write():
                    for i, owner, title, qty, price, done in data[start : start + per_tx]:
                        db.add(
                            Bench(id=i, owner=owner, title=title, qty=qty, price=price, done=done)
                        )

        return timed(go)


def _raw_insert(
    path: Path, data: list[tuple[int, str, str, int, float, bool]], per_tx: int
) -> float:
    _fresh(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE bench (id INTEGER PRIMARY KEY, owner TEXT, title TEXT, qty INTEGER, "
        "price REAL, done INTEGER)"
    )
    conn.execute("CREATE INDEX bench_qty ON bench(qty)")

    def go() -> None:
        for start in range(0, len(data), per_tx):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?)", data[start : start + per_tx]
            )
            conn.execute("COMMIT")

    took = timed(go)
    conn.close()
    return took


def _inserts(ctx: Context, n: int, ts_path: Path, raw_path: Path) -> None:
    """The insert benchmarks at size ``n`` (each run starts from a fresh file)."""
    data = rows(n)
    ctx.log(f"{GROUP}: N = {n:,}")
    ctx.measure(
        GROUP, f"sqlite3 insert {n:,} rows, 1 transaction", lambda _: _raw_insert(raw_path, data, n)
    )
    ctx.measure(
        GROUP,
        f"tidesync add {n:,} objects, 1 transaction",
        lambda _: _ts_insert(ts_path, data, n),
        reference=f"sqlite3 insert {n:,} rows, 1 transaction",
        note="includes the change log entry",
    )
    tx = n // 100
    ctx.measure(
        GROUP,
        f"sqlite3 insert {n:,} rows, {tx:,} transactions",
        lambda _: _raw_insert(raw_path, data, 100),
    )
    ctx.measure(
        GROUP,
        f"tidesync add {n:,} objects, {tx:,} transactions",
        lambda _: _ts_insert(ts_path, data, 100),
        reference=f"sqlite3 insert {n:,} rows, {tx:,} transactions",
    )


def run(ctx: Context) -> None:
    """Record the local-database benchmarks."""
    work = ctx.workdir / "local"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ts_path, raw_path = work / "bench.tidesync", work / "raw.sqlite"
    for n in ctx.sizes:
        _inserts(ctx, n, ts_path, raw_path)
    # queries over the database the last insert left
    conn = sqlite3.connect(raw_path)
    with ts.Database(ts.Configuration.local([Bench], path=ts_path)) as db:
        ctx.measure(
            GROUP,
            "sqlite3 query, indexed (qty == 42)",
            lambda _: timed(lambda: conn.execute("SELECT * FROM bench WHERE qty = 42").fetchall()),
            repeats=5,
        )
        ctx.measure(
            GROUP,
            "tidesync query, indexed (qty == 42)",
            lambda _: timed(lambda: list(db.query(Bench, "qty == $0", 42))),
            reference="sqlite3 query, indexed (qty == 42)",
            repeats=5,
            note="includes building the objects",
        )
        ctx.measure(
            GROUP,
            "sqlite3 query, not indexed (price > 1200)",
            lambda _: timed(
                lambda: conn.execute("SELECT * FROM bench WHERE price > 1200").fetchall()
            ),
            repeats=5,
        )
        ctx.measure(
            GROUP,
            "tidesync query, not indexed (price > 1200)",
            lambda _: timed(lambda: list(db.query(Bench, "price > $0", 1200.0))),
            reference="sqlite3 query, not indexed (price > 1200)",
            repeats=5,
        )
    conn.close()
