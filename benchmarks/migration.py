"""Local migration: 100,000 objects get a field renamed and a new field computed from the
old values (``schema_version`` 0 -> 1), beside the same change by hand in raw sqlite3.

Each run starts from a copy of one file seeded once; the time is the whole open of the
database with the migration (one transaction). 100,000 objects with ``--quick`` too: it is
the size the issue names (docs/migrations.md).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import tidesync as ts

from .harness import Context, timed

GROUP = "migration"
#: Objects migrated (whatever the size mode).
N = 100_000


def _release1() -> type[ts.Model]:
    class Person(ts.Model):
        id: int = ts.primary_key()
        name: str
        age: int = ts.field(default=0, indexed=True)

    return Person


def _release2(computed: bool) -> type[ts.Model]:
    if computed:

        class Person(ts.Model):
            id: int = ts.primary_key()
            full_name: str
            initials: str
            age: int = ts.field(default=0, indexed=True)

        return Person

    class Person(ts.Model):  # type: ignore[no-redef]  # the new field at its default
        id: int = ts.primary_key()
        full_name: str
        initials: str = ""
        age: int = ts.field(default=0, indexed=True)

    return Person


def _initials(name: str) -> str:
    return "".join(word[0] for word in name.split()[:2])


def _names(n: int) -> list[tuple[int, str, int]]:
    return [(i, f"Person Number{i} Lastname", i % 90) for i in range(n)]


def _seed_tidesync(path: Path, n: int) -> None:
    Person = _release1()
    with ts.Database(ts.Configuration.local([Person], path=path)) as db, db.write():
        for i, name, age in _names(n):
            db.add(Person(id=i, name=name, age=age))


def _seed_raw(path: Path, n: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE person (id INTEGER PRIMARY KEY, name TEXT NOT NULL, age INTEGER)")
    conn.execute("CREATE INDEX person_age ON person(age)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO person VALUES (?, ?, ?)", _names(n))
    conn.execute("COMMIT")
    conn.close()


def _fresh_copy(seed: Path, path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(seed, path)
    return path


def _migrate_tidesync(path: Path, computed: bool) -> float:
    Person = _release2(computed)

    def migrate(migration: ts.Migration, old_version: int) -> None:
        migration.rename_field("Person", "name", "full_name")
        if computed:
            for old, new in migration.enumerate_objects("Person"):
                new.initials = _initials(old["name"])

    def go() -> None:
        config = ts.Configuration.local(
            [Person], path=path, schema_version=1, migration_callback=migrate
        )
        ts.Database(config).close()

    return timed(go)


def _migrate_raw(path: Path) -> float:
    def go() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ALTER TABLE person RENAME COLUMN name TO full_name")
        conn.execute("ALTER TABLE person ADD COLUMN initials TEXT")
        rows: list[Any] = conn.execute("SELECT id, full_name FROM person").fetchall()
        conn.executemany(
            "UPDATE person SET initials = ? WHERE id = ?",
            [(_initials(name), i) for i, name in rows],
        )
        conn.execute("COMMIT")
        conn.close()

    return timed(go)


def run(ctx: Context) -> None:
    """Record the migration benchmarks."""
    work = ctx.workdir / "migration"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ts_seed, raw_seed = work / "seed.tidesync", work / "seed.sqlite"
    _seed_tidesync(ts_seed, N)
    _seed_raw(raw_seed, N)
    ts_path, raw_path = work / "run.tidesync", work / "run.sqlite"
    reference = f"sqlite3 rename + computed column, {N:,} rows"
    ctx.measure(GROUP, reference, lambda _: _migrate_raw(_fresh_copy(raw_seed, raw_path)))
    ctx.measure(
        GROUP,
        f"tidesync migrate {N:,} objects: rename + computed new field",
        lambda _: _migrate_tidesync(_fresh_copy(ts_seed, ts_path), computed=True),
        reference=reference,
        note="rename_field, then enumerate_objects setting initials from the old name; "
        "the whole open, one transaction",
    )
    ctx.measure(
        GROUP,
        f"tidesync migrate {N:,} objects: rename + new field at its default",
        lambda _: _migrate_tidesync(_fresh_copy(ts_seed, ts_path), computed=False),
        reference=reference,
        note="initials: str = '' filled by one UPDATE: the table's rebuild and the rename "
        "alone, without the per-object loop",
    )
