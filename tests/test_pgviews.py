"""The per-app read-only SQL views of the PostgreSQL storage (``storage/pgviews.py``).

Changesets are integrated through the storage API, then read back with asyncpg through the
views, typed. Real PostgreSQL (``TIDESYNC_TEST_PG_DSN``); each test has its own storage
schema, dropped (with its view schemas) afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.objectid import ObjectId
from tidesync.server.storage.base import UploadBatch

asyncpg = pytest.importorskip("asyncpg")

from tidesync.server.storage import pgviews  # noqa: E402
from tidesync.server.storage.pgviews import (  # noqa: E402
    LOG_VIEW,
    pg_identifier,
    quote_ident,
    quote_literal,
    views_schema_name,
)
from tidesync.server.storage.postgres import PostgresStorage  # noqa: E402

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
pytestmark = pytest.mark.skipif(not DSN, reason="TIDESYNC_TEST_PG_DSN is not set")

OTHER = ModelSchema(
    "Other", (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("n", Kind.STR)), "id"
)
ITEM = ModelSchema(
    "Item",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("b", Kind.BOOL),
        FieldSchema("i", Kind.INT),
        FieldSchema("c", Kind.COUNTER),
        FieldSchema("f", Kind.FLOAT),
        FieldSchema("s", Kind.STR),
        FieldSchema("by", Kind.BYTES),
        FieldSchema("at", Kind.DATETIME),
        FieldSchema("d", Kind.DECIMAL),
        FieldSchema("u", Kind.UUID),
        FieldSchema("oid", Kind.OBJECTID),
        FieldSchema("other", Kind.LINK, optional=True, target="Other"),
        FieldSchema("opt", Kind.STR, optional=True),
        FieldSchema("tags", Kind.STR, Collection.LIST),
        FieldSchema("nums", Kind.INT, Collection.SET),
        FieldSchema("meta", Kind.FLOAT, Collection.DICT),
        FieldSchema("whens", Kind.DATETIME, Collection.LIST),
    ),
    "id",
)
AT = dt.datetime(2026, 12, 8, 4, 30, 15, 123456, tzinfo=dt.UTC)
U = uuid.UUID("5f0c3c1e-7d1b-4c7e-9a55-0123456789ab")
OID = ObjectId("65a1b2c3d4e5f60718293a4b")


class Writer:
    """The changesets of one client: dense versions, rising HLCs."""

    def __init__(self, origin: str) -> None:
        self.origin, self.version, self.tick = origin, 0, 0

    def hlc(self) -> HLC:
        self.tick += 1
        return HLC(1_000_000 + self.tick, 0, self.origin)

    def create(self, model: str, pk: Any, **values: Any) -> Instruction:
        return Instruction(Op.CREATE, model, pk, self.hlc(), value=values)

    def set(self, model: str, pk: Any, field: str, value: Any) -> Instruction:
        return Instruction(Op.SET, model, pk, self.hlc(), field=field, value=value)

    def erase(self, model: str, pk: Any) -> Instruction:
        return Instruction(Op.ERASE, model, pk, self.hlc())

    def cs(self, *instructions: Instruction) -> Changeset:
        self.version += 1
        return Changeset(self.origin, self.version, tuple(instructions))


def item(pk: str, **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": pk,
        "b": True,
        "i": 2**63 - 1,
        "c": 0,
        "f": 1.5,
        "s": 'it\'s "quoted" \\ and ünïcode',
        "by": b"\x00\xffbytes",
        "at": AT,
        "d": Decimal("12.50"),
        "u": U,
        "oid": OID,
        "other": 7,
        "opt": None,
        "tags": ["a", "b"],
        "nums": {3, 1, 2},
        "meta": {"x": 0.25},
        "whens": [AT],
    }
    values.update(over)
    return values


async def push(storage: PostgresStorage, app: str, writer: Writer, *ins: Instruction) -> None:
    [result] = await storage.integrate([UploadBatch(app, writer.origin, [writer.cs(*ins)])])
    assert result.error is None, result.error


@pytest.fixture
async def storage() -> AsyncIterator[PostgresStorage]:
    schema = "ts_v_" + uuid.uuid4().hex[:12]
    s = PostgresStorage(DSN, schema=schema, poll_interval=0.5)
    await s.open()
    try:
        yield s
    finally:
        await s.drop_schema()
        await s.close()
        conn = await asyncpg.connect(DSN)
        try:  # nothing left behind: the storage's schema nor any app's view schema
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE starts_with(nspname, $1)", schema
            )
        finally:
            await conn.close()
        assert left == 0


@pytest.fixture
async def sql() -> AsyncIterator[Any]:
    """A plain connection, as a reporting tool has (its own session time zone)."""
    conn = await asyncpg.connect(DSN, server_settings={"TimeZone": "America/New_York"})
    try:
        yield conn
    finally:
        await conn.close()


async def setup_app(storage: PostgresStorage, app: str = "shop") -> Writer:
    await storage.put_schemas(app, [OTHER, ITEM])
    await storage.register_client(app, "dev1", "alice")
    return Writer("dev1")


def view(storage: PostgresStorage, app: str, model: str) -> str:
    return f"{quote_ident(storage.views_schema(app))}.{quote_ident(model)}"


async def test_every_field_type_reads_back_typed(storage: PostgresStorage, sql: Any) -> None:
    w = await setup_app(storage)
    await push(
        storage,
        "shop",
        w,
        w.create("Other", 7, id=7, n="seven"),
        w.create("Item", "a", **item("a")),
        w.create(
            "Item",
            "edge",
            **item(
                "edge",
                b=False,
                i=-(2**63),
                f=math.nan,
                d=Decimal("1E+5"),
                other=None,
                opt="x",
                tags=[],
                nums=set(),
                meta={},
                whens=[],
            ),
        ),
        w.create("Item", "inf", **item("inf", f=-math.inf, d=Decimal("NaN"))),
        w.create("Item", "huge", **item("huge", d=Decimal("1E+5000"))),
    )
    await push(storage, "shop", w, Instruction(Op.ADD, "Item", "a", w.hlc(), field="c", value=5))
    assert storage.views_schema("shop") == f"{storage.schema}_app_shop"
    rows = {r["id"]: r for r in await sql.fetch(f"SELECT * FROM {view(storage, 'shop', 'Item')}")}
    assert set(rows) == {"a", "edge", "inf", "huge"}
    a = rows["a"]
    assert list(a.keys()) == [f.name for f in ITEM.fields]
    assert a["b"] is True and a["i"] == 2**63 - 1 and a["c"] == 5
    assert a["f"] == 1.5 and a["s"] == item("a")["s"] and a["by"] == b"\x00\xffbytes"
    assert a["at"] == AT  # timestamptz: the same instant whatever the session's time zone
    assert a["d"] == Decimal("12.50") and a["u"] == U and a["oid"] == str(OID)
    assert a["other"] == 7 and a["opt"] is None
    assert a["tags"] == '["a", "b"]' and a["nums"] == "[1, 2, 3]" and a["meta"] == '{"x": 0.25}'
    assert a["whens"] == '["2026-12-08T04:30:15.123456+00:00"]'
    edge = rows["edge"]
    assert edge["b"] is False and edge["i"] == -(2**63) and math.isnan(edge["f"])
    assert edge["d"] == Decimal("1E+5") and edge["other"] is None and edge["opt"] == "x"
    assert (edge["tags"], edge["nums"], edge["meta"]) == ("[]", "[]", "{}")
    assert rows["inf"]["f"] == -math.inf and rows["inf"]["d"].is_nan()
    assert rows["huge"]["d"] is None  # beyond numeric: NULL, not an error for the whole view
    types = dict(
        await sql.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'Item'",
            storage.views_schema("shop"),
        )
    )
    assert types == {
        "id": "text",
        "b": "boolean",
        "i": "bigint",
        "c": "bigint",
        "f": "double precision",
        "s": "text",
        "by": "bytea",
        "at": "timestamp with time zone",
        "d": "numeric",
        "u": "uuid",
        "oid": "text",
        "other": "bigint",
        "opt": "text",
        "tags": "jsonb",
        "nums": "jsonb",
        "meta": "jsonb",
        "whens": "jsonb",
    }
    # typed columns join and aggregate like tables
    joined = await sql.fetch(
        f"SELECT i.id, o.n FROM {view(storage, 'shop', 'Item')} AS i "
        f"JOIN {view(storage, 'shop', 'Other')} AS o ON o.id = i.other ORDER BY i.id"
    )
    assert [tuple(r) for r in joined] == [("a", "seven"), ("huge", "seven"), ("inf", "seven")]
    comment = await sql.fetchval(
        "SELECT col_description(to_regclass($1), 14)", view(storage, "shop", "Item")
    )
    assert comment == "tidesync list[str]"


async def test_the_log_view_has_each_version_with_its_user(
    storage: PostgresStorage, sql: Any
) -> None:
    w = await setup_app(storage)
    await push(storage, "shop", w, w.create("Other", 1, id=1, n="one"))
    await push(storage, "shop", w, w.set("Other", 1, "n", "uno"), w.set("Other", 1, "n", "eins"))
    rows = await sql.fetch(
        f"SELECT * FROM {view(storage, 'shop', LOG_VIEW)} ORDER BY server_version"
    )
    assert [r["server_version"] for r in rows] == [1, 2]
    assert [(r["origin"], r["client_version"], r["user_id"]) for r in rows] == [
        ("dev1", 1, "alice"),
        ("dev1", 2, "alice"),
    ]
    assert all(r["size"] == len(r["instructions"]) > 0 for r in rows)


async def test_erased_objects_vanish(storage: PostgresStorage, sql: Any) -> None:
    w = await setup_app(storage)
    await push(
        storage, "shop", w, w.create("Other", 1, id=1, n="a"), w.create("Other", 2, id=2, n="b")
    )
    await push(storage, "shop", w, w.erase("Other", 1))
    rows = await sql.fetch(f"SELECT id FROM {view(storage, 'shop', 'Other')}")
    assert [r["id"] for r in rows] == [2]
    await push(storage, "shop", w, w.set("Other", 2, "n", "b2"))
    assert await sql.fetchval(f"SELECT n FROM {view(storage, 'shop', 'Other')}") == "b2"


async def test_new_fields_and_models_appear_after_put_schemas(
    storage: PostgresStorage, sql: Any
) -> None:
    w = await setup_app(storage)
    await push(storage, "shop", w, w.create("Other", 1, id=1, n="a"))
    wider = ModelSchema(
        "Other",
        (
            *OTHER.fields,
            FieldSchema("price", Kind.DECIMAL, optional=True),
            FieldSchema("labels", Kind.STR, Collection.SET),
        ),
        "id",
    )
    extra = ModelSchema(
        "Extra", (FieldSchema("id", Kind.UUID, primary_key=True), FieldSchema("x", Kind.INT)), "id"
    )
    await storage.put_schemas("shop", [wider, extra])
    row = await sql.fetchrow(f"SELECT * FROM {view(storage, 'shop', 'Other')}")
    assert dict(row) == {"id": 1, "n": "a", "price": None, "labels": "[]"}
    await push(
        storage,
        "shop",
        w,
        w.create("Extra", U, id=U, x=3),
        w.set("Other", 1, "price", Decimal("9.99")),
    )
    assert await sql.fetchval(f"SELECT price FROM {view(storage, 'shop', 'Other')}") == Decimal(
        "9.99"
    )
    assert await sql.fetchval(f"SELECT id FROM {view(storage, 'shop', 'Extra')}") == U


async def test_writes_through_the_views_fail(storage: PostgresStorage, sql: Any) -> None:
    w = await setup_app(storage)
    await push(storage, "shop", w, w.create("Other", 1, id=1, n="a"))
    other, log_view = view(storage, "shop", "Other"), view(storage, "shop", LOG_VIEW)
    statements = [
        f"INSERT INTO {other} (id, n) VALUES (2, 'b')",
        f"UPDATE {other} SET n = 'x'",
        f"DELETE FROM {other}",
        f"DELETE FROM {other} WHERE id = 12345",  # no row: still refused
        f"DELETE FROM {log_view}",
        f"UPDATE {log_view} SET size = 0",
    ]
    for statement in statements:  # as the owner (a superuser here), not just for lesser roles
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="cannot"):
            await sql.execute(statement)
    assert await sql.fetchval(f"SELECT n FROM {other}") == "a"
    assert (await storage.get_objects("shop", "Other")) == {1: {"id": 1, "n": "a"}}
    updatable = await sql.fetch(
        "SELECT is_updatable, is_insertable_into FROM information_schema.views "
        "WHERE table_schema = $1",
        storage.views_schema("shop"),
    )
    assert len(updatable) == 3 and {tuple(r) for r in updatable} == {("NO", "NO")}


HOSTILE_APP = "x'); DROP TABLE objects; --\"\\ Ünï"


async def test_hostile_app_model_and_field_names_are_only_names(
    storage: PostgresStorage, sql: Any
) -> None:
    long_a, long_b = "f" * 70 + "a", "f" * 70 + "b"
    hostile = ModelSchema(
        'M"; DROP TABLE objects; --',
        (
            FieldSchema("id", Kind.STR, primary_key=True),
            FieldSchema("a\"b'c\\d", Kind.INT),
            FieldSchema(long_a, Kind.STR),
            FieldSchema(long_b, Kind.STR),
        ),
        "id",
    )
    log_named = ModelSchema("_log", (FieldSchema("id", Kind.INT, primary_key=True),), "id")
    apps = [HOSTILE_APP, "a" * 200, "Shop", "shop"]
    for app in apps:
        await storage.put_schemas(app, [hostile, log_named])
        await storage.register_client(app, "d", "u")
        w = Writer("d")
        await push(
            storage,
            app,
            w,
            w.create(hostile.name, "k", id="k", **{"a\"b'c\\d": 1, long_a: "A", long_b: "B"}),
            w.create("_log", 1, id=1),
        )
    names = {storage.views_schema(app) for app in apps}
    assert len(names) == 4 and all(len(n.encode()) <= 63 for n in names)
    assert storage.views_schema("Shop") != storage.views_schema("shop")
    for app in apps:
        row = await sql.fetchrow(f"SELECT * FROM {view(storage, app, hostile.name)}")
        assert list(row.values()) == ["k", 1, "A", "B"]
        assert list(row.keys())[:2] == ["id", "a\"b'c\\d"]
        assert list(row.keys())[2:] == [pg_identifier(long_a), pg_identifier(long_b)]
        # the model named like the log view got no view: _log is still the log
        log_row = await sql.fetchrow(f"SELECT * FROM {view(storage, app, LOG_VIEW)}")
        assert log_row["origin"] == "d" and log_row["user_id"] == "u"
    # the storage's tables are all there and still work
    assert await sql.fetchval(f"SELECT count(*) FROM {quote_ident(storage.schema)}.objects") == 8
    assert (await storage.get_objects(HOSTILE_APP, "_log")) == {1: {"id": 1}}
    # the app id is in the schema's comment, exactly
    comment = await sql.fetchval(
        "SELECT obj_description(to_regnamespace($1), 'pg_namespace')",
        quote_ident(storage.views_schema(HOSTILE_APP)),
    )
    assert HOSTILE_APP in comment
    await storage.wipe_app(HOSTILE_APP)
    assert (
        await sql.fetchval(
            "SELECT to_regnamespace($1)", quote_ident(storage.views_schema(HOSTILE_APP))
        )
        is None
    )


def test_quoting_and_names_are_injective() -> None:
    assert quote_ident('a"b') == '"a""b"'
    assert quote_literal("it's \\") == "E'it''s \\\\'"
    with pytest.raises(ValueError, match="U\\+0000"):
        quote_ident("a\x00")
    assert views_schema_name("tidesync", "shop") == "tidesync_app_shop"
    odd = {views_schema_name("tidesync", a) for a in ["Shop", "sh-op", "sh op", "shop!", "a" * 60]}
    assert len(odd) == 5 and all("-" in n and len(n) <= 63 for n in odd)
    assert pg_identifier("x" * 63) == "x" * 63
    assert len(pg_identifier("é" * 40).encode()) <= 63


async def test_a_reporting_role_reads_the_views_and_nothing_else(
    storage: PostgresStorage, sql: Any
) -> None:
    """The recipe of docs/storage.md: USAGE on the view schema, SELECT on its views, and
    default privileges for the views tidesync makes later."""
    w = await setup_app(storage)
    await push(storage, "shop", w, w.create("Other", 1, id=1, n="a"))
    role = "ts_reporter_" + uuid.uuid4().hex[:8]
    owner = await sql.fetchval("SELECT current_user")
    schema = quote_ident(storage.views_schema("shop"))
    await sql.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        await sql.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        await sql.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
        await sql.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {quote_ident(owner)} IN SCHEMA {schema} "
            f"GRANT SELECT ON TABLES TO {role}"
        )
        wider = ModelSchema(
            "Other", (*OTHER.fields, FieldSchema("m", Kind.INT, optional=True)), "id"
        )
        extra = ModelSchema("Extra", (FieldSchema("id", Kind.INT, primary_key=True),), "id")
        await storage.put_schemas("shop", [wider, extra])  # replaced and new views
        async with sql.transaction():
            await sql.execute(f"SET LOCAL ROLE {role}")
            row = await sql.fetchrow(f"SELECT * FROM {view(storage, 'shop', 'Other')}")
            assert dict(row) == {"id": 1, "n": "a", "m": None}
            assert await sql.fetchval(f"SELECT count(*) FROM {view(storage, 'shop', 'Extra')}") == 0
            assert (
                await sql.fetchval(f"SELECT count(*) FROM {view(storage, 'shop', LOG_VIEW)}") == 1
            )
        for statement in (
            f"SELECT * FROM {quote_ident(storage.schema)}.objects",
            f"DELETE FROM {view(storage, 'shop', 'Other')}",
        ):
            with pytest.raises(asyncpg.PostgresError):
                async with sql.transaction():
                    await sql.execute(f"SET LOCAL ROLE {role}")
                    await sql.execute(statement)
    finally:
        await sql.execute(f"DROP OWNED BY {role}")
        await sql.execute(f"DROP ROLE {role}")


async def test_two_storages_on_one_database_keep_the_views_consistent(
    storage: PostgresStorage, sql: Any
) -> None:
    other = PostgresStorage(DSN, schema=storage.schema, poll_interval=0.5)
    await other.open()
    try:
        w = await setup_app(storage)
        wide = [
            ModelSchema(
                "Other", (*OTHER.fields, FieldSchema(f"x{n}", Kind.INT, optional=True)), "id"
            )
            for n in range(6)
        ]
        # both processes widen the same model at once, and make apps of their own
        await asyncio.gather(
            *(s.put_schemas("shop", [m]) for s, m in zip([storage, other] * 3, wide)),
            other.put_schemas("two", [OTHER]),
            storage.put_schemas("one", [OTHER]),
        )
        columns = await sql.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 "
            "AND table_name = 'Other' ORDER BY ordinal_position",
            storage.views_schema("shop"),
        )
        merged = await other.get_schemas("shop")
        assert [r[0] for r in columns] == [f.name for f in merged["Other"].fields]
        assert len(columns) == 8
        await other.register_client("shop", "dev2", "bob")
        w2 = Writer("dev2")
        await push(other, "shop", w2, w2.create("Other", 1, id=1, n="from B", x3=3))
        w.tick = 100  # after B's create
        await push(storage, "shop", w, w.set("Other", 1, "x5", 5))
        row = await sql.fetchrow(f"SELECT n, x3, x5 FROM {view(storage, 'shop', 'Other')}")
        assert tuple(row) == ("from B", 3, 5)
        users = await sql.fetch(
            f"SELECT user_id FROM {view(storage, 'shop', LOG_VIEW)} ORDER BY server_version"
        )
        assert [r[0] for r in users] == ["bob", "alice"]
        for app in ("one", "two"):
            assert await sql.fetchval(f"SELECT count(*) FROM {view(storage, app, 'Other')}") == 0
    finally:
        await other.close()


async def test_open_makes_missing_or_outdated_views(storage: PostgresStorage, sql: Any) -> None:
    w = await setup_app(storage)
    await push(storage, "shop", w, w.create("Other", 1, id=1, n="a"))
    schema = storage.views_schema("shop")
    # as a database of before the views (migration 2) looks, and one of an older format
    await sql.execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE")
    await sql.execute(f"DELETE FROM {quote_ident(storage.schema)}.sql_views")
    again = PostgresStorage(DSN, schema=storage.schema, poll_interval=0.5)
    await again.open()
    await again.close()
    assert await sql.fetchval(f"SELECT n FROM {view(storage, 'shop', 'Other')}") == "a"
    other = view(storage, "shop", "Other")
    role = "ts_reader_" + uuid.uuid4().hex[:8]
    await sql.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        await sql.execute(f"GRANT SELECT ON {other} TO {role} WITH GRANT OPTION")
        await sql.execute(f"GRANT SELECT ON {other} TO PUBLIC")
        # a view PostgreSQL cannot replace (a column less), and one user view built on it
        await sql.execute(
            f"CREATE OR REPLACE VIEW {other} AS SELECT 1::bigint AS id, 'x'::text AS n, 2 AS old"
        )
        user_view = f"{quote_ident(schema)}.mine"
        await sql.execute(f"CREATE VIEW {user_view} AS SELECT old FROM {other}")
        await sql.execute(f"UPDATE {quote_ident(storage.schema)}.sql_views SET format = 0")
        again = PostgresStorage(DSN, schema=storage.schema, poll_interval=0.5)
        await again.open()  # cannot drop it (the user's view needs it): logged, not fatal
        await push(again, "shop", w, w.set("Other", 1, "n", "b"))
        await again.close()
        assert await sql.fetchval(f"SELECT old FROM {user_view}") == 2
        await sql.execute(f"DROP VIEW {user_view}")
        again = PostgresStorage(DSN, schema=storage.schema, poll_interval=0.5)
        await again.open()
        await again.close()
        row = await sql.fetchrow(f"SELECT * FROM {other}")
        assert dict(row) == {"id": 1, "n": "b"}  # dropped and made again, with its grants:
        grants = await sql.fetchval(
            "SELECT array_agg(grantee || ':' || is_grantable ORDER BY grantee) "
            "FROM information_schema.role_table_grants WHERE table_schema = $1 "
            "AND table_name = 'Other' AND privilege_type = 'SELECT' AND grantee <> current_user",
            schema,
        )
        assert grants == ["PUBLIC:NO", f"{role}:YES"]
    finally:
        await sql.execute(f"DROP OWNED BY {role}")
        await sql.execute(f"DROP ROLE {role}")


async def test_a_long_reporting_query_does_not_hold_up_sync(
    storage: PostgresStorage, sql: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgviews, "VIEW_LOCK_TIMEOUT", 0.2)
    w = await setup_app(storage)
    await push(storage, "shop", w, w.create("Other", 1, id=1, n="a"))
    other = view(storage, "shop", "Other")
    wider = ModelSchema("Other", (*OTHER.fields, FieldSchema("m", Kind.INT, optional=True)), "id")
    async with sql.transaction():  # a report's transaction holds the view's lock meanwhile
        assert len(await sql.fetch(f"SELECT * FROM {other}")) == 1
        await asyncio.wait_for(storage.put_schemas("shop", [wider]), 5)
        await asyncio.wait_for(push(storage, "shop", w, w.set("Other", 1, "m", 1)), 5)
    assert list((await sql.fetchrow(f"SELECT * FROM {other}")).keys()) == ["id", "n"]
    # the next schema change (of another model) makes every view of the app again
    extra = ModelSchema("Extra", (FieldSchema("id", Kind.INT, primary_key=True),), "id")
    await storage.put_schemas("shop", [extra])
    assert dict(await sql.fetchrow(f"SELECT * FROM {other}")) == {"id": 1, "n": "a", "m": 1}


E2E_CONFIG = """
[apps.todo]
auth = ["anonymous"]
"""


async def test_a_device_writes_and_sql_reads_it_through_a_real_server(
    tmp_path: Path, sql: Any
) -> None:
    """``tidesync serve --storage postgresql://...``: a device's model becomes a view (its
    schema arrives with the device), its writes rows, its user the log's."""
    from tests.test_flexsync_e2e import Device, Task
    from tidesync.testing import ServerProcess

    schema = "ts_v_" + uuid.uuid4().hex[:12]
    config = tmp_path / "tidesync.toml"
    config.write_text(E2E_CONFIG)
    sep = "&" if "?" in DSN else "?"
    proc = ServerProcess(
        tmp_path / "server",
        extra_args=["--storage", f"{DSN}{sep}schema={schema}", "--config", str(config)],
    ).start()
    device = Device(tmp_path, "d1", proc.url)
    try:
        db = await device.open()
        assert device.user is not None
        with db.write():
            for i in range(3):
                db.add(Task(id=f"t{i}", owner_id=device.user.id, summary=f"task {i}", n=i))
        await device.settle()
        with db.write():
            db.find(Task, "t1").n = 10
            db.delete(db.find(Task, "t2"))
        await device.settle()
        views = views_schema_name(schema, "todo")
        rows = await sql.fetch(f'SELECT * FROM {quote_ident(views)}."Task" ORDER BY id')
        assert [dict(r) for r in rows] == [
            {"id": "t0", "owner_id": device.user.id, "summary": "task 0", "n": 0, "shared": False},
            {"id": "t1", "owner_id": device.user.id, "summary": "task 1", "n": 10, "shared": False},
        ]
        users = await sql.fetch(f"SELECT DISTINCT user_id FROM {quote_ident(views)}._log")
        assert [r[0] for r in users] == [device.user.id]
    finally:
        device.shutdown()
        proc.kill()
        await pgviews.drop_views_of_storage(sql, schema)
        await sql.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")


def doc_sql(after: str) -> list[str]:
    """The statements of the first ```sql block after ``after`` in docs/storage.md."""
    text = (Path(__file__).parent.parent / "docs" / "storage.md").read_text()
    block = text[text.index(after) :].split("```sql\n", 1)[1].split("```", 1)[0]
    lines = [line.split("--", 1)[0] for line in block.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def test_the_documented_queries_run(storage: PostgresStorage, sql: Any) -> None:
    customer = ModelSchema(
        "Customer",
        (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("name", Kind.STR)),
        "id",
    )
    order = ModelSchema(
        "Order",
        (
            FieldSchema("id", Kind.STR, primary_key=True),
            FieldSchema("total", Kind.DECIMAL),
            FieldSchema("created_at", Kind.DATETIME),
            FieldSchema("status", Kind.STR),
            FieldSchema("customer", Kind.LINK, optional=True, target="Customer"),
            FieldSchema("tags", Kind.STR, Collection.SET),
            FieldSchema("attrs", Kind.FLOAT, Collection.DICT),
        ),
        "id",
    )
    await storage.put_schemas("shop", [customer, order])
    await storage.register_client("shop", "dev1", "alice")
    w = Writer("dev1")
    now = dt.datetime.now(dt.UTC)
    await push(
        storage,
        "shop",
        w,
        w.create("Customer", 1, id=1, name="Ada"),
        *(
            w.create(
                "Order",
                f"o{i}",
                id=f"o{i}",
                total=Decimal(f"{i}.10"),
                created_at=now - dt.timedelta(days=i),
                status="open" if i % 2 else "paid",
                customer=1,
                tags={"gift"} if i == 1 else set(),
                attrs={"weight": 1.5},
            )
            for i in range(1, 4)
        ),
    )
    schema = storage.views_schema("shop")
    results = [
        await sql.fetch(statement.replace("tidesync_app_shop", quote_ident(schema)))
        for statement in doc_sql("Examples (app `shop`")
    ]
    open_orders, per_day, gifts, tags, weights, writers = results
    assert [(r["id"], r["name"]) for r in open_orders] == [("o1", "Ada"), ("o3", "Ada")]
    assert sum(r["sum"] for r in per_day) == Decimal("6.30")
    assert [r["id"] for r in gifts] == ["o1"] and [tuple(r) for r in tags] == [("o1", "gift")]
    assert {r[1] for r in weights} == {Decimal("1.5")}
    assert [(r["user_id"], r["changesets"]) for r in writers] == [("alice", 1)]
    listed = doc_sql("name; each schema's comment names its app exactly")
    [found] = await sql.fetch(listed[0].replace("tidesync_app_", f"{storage.schema}_app_"))
    assert found["nspname"] == schema and "app shop " in found["obj_description"]


async def test_dropping_the_storage_drops_only_its_view_schemas(
    storage: PostgresStorage, sql: Any
) -> None:
    await setup_app(storage)
    lookalike = storage.views_schema("shop") + "x"  # a schema of someone else's, alike
    await sql.execute(f"CREATE SCHEMA {quote_ident(lookalike)}")
    try:
        await storage.drop_schema()
        gone = await sql.fetchval(
            "SELECT to_regnamespace($1)", quote_ident(storage.views_schema("shop"))
        )
        assert gone is None
        assert await sql.fetchval("SELECT to_regnamespace($1)", quote_ident(lookalike))
    finally:
        await sql.execute(f"DROP SCHEMA {quote_ident(lookalike)}")
