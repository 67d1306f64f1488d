"""Shared fixtures: models covering every field type, and databases on real files."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

import tidesync as ts


class Person(ts.Model):
    id: str = ts.primary_key()
    name: str
    age: int = ts.field(default=0, indexed=True)


class Task(ts.Model):
    id: ts.ObjectId = ts.primary_key(default_factory=ts.ObjectId)
    summary: str
    done: bool = False
    priority: int = ts.field(default=0, indexed=True)
    score: float = 0.0
    blob: bytes = b""
    due: dt.datetime | None = None
    price: Decimal | None = None
    ref: uuid.UUID | None = None
    other: ts.ObjectId | None = None
    note: str | None = None
    tags: list[str]
    labels: set[str]
    attrs: dict[str, int]
    owner: Person | None = None
    watchers: list[Person]
    votes: ts.Counter


MODELS = [Person, Task]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "test.tidesync"


@pytest.fixture
def db(db_path: Path) -> Iterator[ts.Database]:
    with ts.Database(ts.Configuration.local(MODELS, path=db_path)) as database:
        yield database


@pytest.fixture
def utc_now() -> dt.datetime:
    return dt.datetime(2026, 11, 26, 12, 30, 15, 123456, tzinfo=dt.UTC)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A PostgreSQL storage URL (``TIDESYNC_TEST_PG_DSN``) with a schema of its own,
    dropped after the test; the test is skipped when the variable is unset."""
    dsn = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
    if not dsn:
        pytest.skip("TIDESYNC_TEST_PG_DSN is not set")
    asyncpg = pytest.importorskip("asyncpg")
    schema = "ts_t_" + uuid.uuid4().hex[:12]
    yield f"{dsn}?schema={schema}"
    conn = await asyncpg.connect(dsn)
    try:
        from tidesync.server.storage.pgviews import drop_views_of_storage

        await drop_views_of_storage(conn, schema)  # the apps' SQL view schemas
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
