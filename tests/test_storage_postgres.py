"""The PostgreSQL server storage: the shared conformance suite plus PostgreSQL-specific checks.

Runs against the database named by ``TIDESYNC_TEST_PG_DSN`` (skipped when unset). Every test
module run uses its own PostgreSQL schema, dropped at the end, so runs share the database.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tidesync.server.storage import StorageError
from tidesync.server.storage.conformance import (
    TASK,
    StorageConformance,
    StorageFactory,
    Writer,
    batch,
)

asyncpg = pytest.importorskip("asyncpg")

from tidesync.core.merge import ObjectState  # noqa: E402
from tidesync.core.packing import pack  # noqa: E402
from tidesync.server.storage.postgres import (  # noqa: E402
    _BY_KEYS,
    FORMAT_VERSION,
    PostgresStorage,
    split_storage_url,
    to_json,
)

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
pytestmark = pytest.mark.skipif(not DSN, reason="TIDESYNC_TEST_PG_DSN is not set")


async def _drop(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        from tidesync.server.storage.pgviews import drop_views_of_storage

        await drop_views_of_storage(conn, schema)  # the apps' SQL view schemas
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[str]:
    """A PostgreSQL schema for this module's tests, dropped afterwards."""
    schema = "ts_test_" + uuid.uuid4().hex[:12]
    yield schema
    asyncio.run(_drop(schema))


@pytest.fixture
async def fresh_schema() -> AsyncIterator[str]:
    """A PostgreSQL schema for one test, dropped afterwards."""
    schema = "ts_test_" + uuid.uuid4().hex[:12]
    yield schema
    await _drop(schema)


class TestPostgresConformance(StorageConformance):
    """Every conformance test, on one shared schema (each test wipes its own app id)."""

    @pytest.fixture
    def make_storage(self, pg_schema: str) -> StorageFactory:
        return lambda: PostgresStorage(DSN, schema=pg_schema, poll_interval=0.2)


async def test_migrations_are_safe_from_several_processes_at_once(fresh_schema: str) -> None:
    storages = [PostgresStorage(DSN, schema=fresh_schema) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in storages))
    try:
        conn = await asyncpg.connect(DSN)
        try:
            versions = await conn.fetch(f"SELECT version FROM {fresh_schema}.schema_migrations")
        finally:
            await conn.close()
        assert [r["version"] for r in versions] == list(range(1, FORMAT_VERSION + 1))
    finally:
        await asyncio.gather(*(s.close() for s in storages))


async def test_refuses_a_newer_format(fresh_schema: str) -> None:
    async with PostgresStorage(DSN, schema=fresh_schema):
        pass
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"INSERT INTO {fresh_schema}.schema_migrations (version) VALUES (99)")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="format 99"):
        await PostgresStorage(DSN, schema=fresh_schema).open()


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(StorageError, match="schema name"):
        PostgresStorage(DSN, schema="Robert'); DROP TABLE x;--")
    with pytest.raises(StorageError, match="not a PostgreSQL URL"):
        split_storage_url("mysql://x/y")
    assert split_storage_url("postgresql://u@h:5/db?schema=abc&sslmode=disable") == (
        "postgresql://u@h:5/db?sslmode=disable",
        "abc",
    )
    unreachable = PostgresStorage("postgresql://postgres@127.0.0.1:1/test", schema="x")
    with pytest.raises(StorageError, match="cannot connect"):
        await unreachable.open()
    with pytest.raises(StorageError, match="not open"):
        await unreachable.latest_version("a")


async def test_two_storages_commit_in_order_and_watchers_wake(fresh_schema: str) -> None:
    """Two storages (as two processes would) integrate concurrently into one app: versions
    stay dense, every reader sees them in order, and each side's watcher hears the other."""
    one = PostgresStorage(DSN, schema=fresh_schema, poll_interval=0.5)
    two = PostgresStorage(DSN, schema=fresh_schema, poll_interval=0.5)
    async with one, two:
        await one.put_schemas("app", [TASK])
        writers = [Writer(f"w{i}") for i in range(10)]
        for w in writers:
            await one.register_client("app", w.origin, "u")
        woken = {"one": asyncio.Event(), "two": asyncio.Event()}
        unwatch_one = one.watch("app", woken["one"].set)
        unwatch_two = two.watch("app", woken["two"].set)
        await asyncio.sleep(1.2)  # the first poll records the starting point
        woken["one"].clear()
        woken["two"].clear()
        await two.integrate([batch("app", writers[0].cs(writers[0].create("first")))])
        await asyncio.wait_for(woken["one"].wait(), 5)  # the NOTIFY (or the poll) arrived
        assert not woken["two"].is_set()  # its own commit: the hub wakes itself

        async def upload(storage: PostgresStorage, w: Writer) -> list[int]:
            got: list[int] = []
            for i in range(8):
                (res,) = await storage.integrate([batch("app", w.cs(w.create(f"{w.origin}{i}")))])
                assert res.ok
                got += res.server_versions
            return got

        async def follow(storage: PostgresStorage) -> list[int]:
            cursor, seen = 0, []
            for _ in range(10_000):
                page = await storage.read_log("app", cursor, 200)
                seen += [e.server_version for e in page.entries]
                assert seen == list(range(1, len(seen) + 1))
                cursor = page.cursor
                if cursor == total:
                    return seen
                await asyncio.sleep(0.005)
            raise AssertionError("the reader did not catch up")

        total = 1 + 8 * (len(writers) - 1)
        readers = [asyncio.create_task(follow(one)), asyncio.create_task(follow(two))]
        try:
            got = await asyncio.gather(
                *(upload(one if i % 2 else two, w) for i, w in enumerate(writers[1:], 1))
            )
            every = sorted(v for g in got for v in g)
            assert every == list(range(2, total + 1))
            assert (await asyncio.gather(*readers)) == [list(range(1, total + 1))] * 2
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        unwatch_one()
        unwatch_two()


async def test_group_commit_and_jsonb_values(fresh_schema: str) -> None:
    async with PostgresStorage(DSN, schema=fresh_schema) as storage:
        await storage.put_schemas("app", [TASK])
        writers = [Writer(f"o{i}") for i in range(40)]
        for w in writers:
            await storage.register_client("app", w.origin, "u")
        before = storage.commits
        results = await asyncio.gather(
            *(
                storage.integrate([batch("app", w.cs(w.create(w.origin, title="t\x00é")))])
                for w in writers
            )
        )
        assert sorted(r.server_versions[0] for (r,) in results) == list(range(1, 41))
        assert storage.commits - before < 10  # queued calls shared transactions
        conn = await asyncpg.connect(DSN)
        try:
            titles = await conn.fetch(
                f"SELECT doc->>'title' AS t FROM {fresh_schema}.objects "
                "WHERE app = 'app' AND (doc->>'done')::bool = false"
            )
        finally:
            await conn.close()
        assert len(titles) == 40 and titles[0]["t"] == "t\ufffdé"
        assert (await storage.get_objects("app", "Task"))["o1"]["title"] == "t\x00é"
        await storage.check_ready()


async def test_objects_are_looked_up_by_key_whatever_the_statistics(fresh_schema: str) -> None:
    """Reading objects by primary key probes the primary key's index once per key, in the
    generic plan too, on a table never analyzed: ``pk = ANY($3)`` was planned as a filter
    over every object of the model there (a first push of 100,000 objects took minutes)."""
    async with PostgresStorage(DSN, schema=fresh_schema) as storage:
        await storage.put_schemas("app", [TASK])
        w = Writer("o1")
        await storage.register_client("app", w.origin, "u")
        creates = [w.create(f"t{i}", title=f"task {i}") for i in range(300)]
        (result,) = await storage.integrate([batch("app", w.cs(*creates))])
        assert result.error is None
        keys = [("Task", pack(f"t{i}")) for i in (5, 7, 7, 299)] + [("Task", pack("absent"))]
        states = await storage.get_states("app", keys)
        assert sorted(states) == sorted(set(keys[:4]))
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f'SET search_path = "{fresh_schema}"')
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(
                "PREPARE by_keys(text, text, bytea[]) AS " + _BY_KEYS.format("pk, state")
            )
            array = ",".join(f"'\\x{k.hex()}'::bytea" for _, k in keys)
            explained = await conn.fetch(f"EXPLAIN EXECUTE by_keys('app', 'Task', ARRAY[{array}])")
            plan = "\n".join(r[0] for r in explained)
        finally:
            await conn.close()
    assert "Nested Loop" in plan and "pk = u.key" in plan, plan
    assert "Seq Scan on objects" not in plan and "Hash" not in plan, plan


async def test_uploads_of_new_objects_end_as_the_general_path_makes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """New objects are taken for new without a lookup and COPYed in; where one is stored
    after all the group is rolled back and done again. Either way the answers, the objects
    and the log are what the general path (look up, merge, upsert) makes."""
    from tidesync.server.storage import postgres as module

    from .test_storage_sqlite import run_scenario, spy_on_new_creates

    schemas = ["ts_test_" + uuid.uuid4().hex[:12] for _ in range(2)]
    try:
        taken = spy_on_new_creates(monkeypatch, module)
        fast = await run_scenario(PostgresStorage(DSN, schema=schemas[0]))
        # the first pass of each upload that passed validation; the stored key is guessed
        # new, its INSERT fails, and its group is done again without guessing
        assert taken == [True, True, False, False, False, True, False, True]
        monkeypatch.setattr(module, "only_new_creates", lambda *args: None)
        general = await run_scenario(PostgresStorage(DSN, schema=schemas[1]))
        conn = await asyncpg.connect(DSN)
        try:
            columns = [
                await conn.fetch(
                    f'SELECT model, pk, vals, doc, alive FROM "{schema}".objects ORDER BY model, pk'
                )
                for schema in schemas
            ]
        finally:
            await conn.close()
        fast_rows, general_rows = ([tuple(r) for r in rows] for rows in columns)
        assert fast_rows == general_rows  # values, JSON documents, liveness
        assert len(fast_rows) >= 9
    finally:
        for schema in schemas:
            await _drop(schema)
    # new objects' states are stored in the compact form of a lone create (the general
    # path stores every state in full): the same states
    assert _decoded(fast) == _decoded(general)
    assert fast[5][1] == [7] and fast[5][2] == {}  # the stored key: merged, not created


def _decoded(seen: list[Any]) -> list[Any]:
    """``seen`` with its lists of (key, state bytes) as (key, full state bytes)."""

    def state_list(item: Any) -> bool:
        return isinstance(item, list) and all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], bytes) for x in item
        )

    return [
        [(k, ObjectState.from_bytes(b).to_bytes()) for k, b in item] if state_list(item) else item
        for item in seen
    ]


def test_to_json_renders_every_kind() -> None:
    import datetime as dt
    from decimal import Decimal

    from tidesync.objectid import ObjectId

    value = {
        "d": dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
        "n": Decimal("1.50"),
        "u": uuid.UUID(int=1),
        "o": ObjectId(b"\x01" * 12),
        "b": b"\x00\xff",
        "f": float("nan"),
        "s": {"b", "a"},
        "l": [1, None, True],
    }
    assert to_json(value) == {
        "d": "2024-01-02T00:00:00+00:00",
        "n": "1.50",
        "u": "00000000-0000-0000-0000-000000000001",
        "o": "010101010101010101010101",
        "b": "AP8=",
        "f": "NaN",
        "s": ["a", "b"],
        "l": [1, None, True],
    }
