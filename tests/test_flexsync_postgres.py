"""Flexible sync on PostgreSQL: subscriptions and read rules evaluated in SQL.

- a property test: for random objects and queries, the SQL that ``storage.pgquery`` compiles
  (run by the PostgreSQL on ``TIDESYNC_TEST_PG_DSN``, over ``postgres.to_json`` documents)
  agrees with ``core.query.evaluate`` wherever it decides (TRUE/FALSE), and leaves only the
  documented cases to Python (NULL);
- ``PostgresStorage.read_matching`` pages, progress bytes and Python fallback;
- end to end: ``tidesync serve --storage postgresql://... --config`` with the owner_id rules.

Skipped when ``TIDESYNC_TEST_PG_DSN`` is unset.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidesync.core.packing import pack
from tidesync.core.query import BoundQuery, bind, evaluate, parse
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.objectid import ObjectId
from tidesync.server.storage.base import object_matches
from tidesync.server.storage.conformance import TASK, Writer, batch
from tidesync.server.storage.pgquery import compile_filter

asyncpg = pytest.importorskip("asyncpg")

from tidesync.server.storage.postgres import PostgresStorage, to_json  # noqa: E402

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
pytestmark = pytest.mark.skipif(not DSN, reason="TIDESYNC_TEST_PG_DSN is not set")
UTC = dt.UTC


def _f(name: str, kind: Kind, **kw: Any) -> FieldSchema:
    return FieldSchema(name, kind, **kw)


OBJ = ModelSchema(
    "Obj",
    (
        _f("id", Kind.INT, primary_key=True),
        _f("b", Kind.BOOL, optional=True),
        _f("i", Kind.INT, optional=True),
        _f("c", Kind.COUNTER),
        _f("f", Kind.FLOAT, optional=True),
        _f("s", Kind.STR, optional=True),
        _f("by", Kind.BYTES, optional=True),
        _f("t", Kind.DATETIME, optional=True),
        _f("d", Kind.DECIMAL, optional=True),
        _f("u", Kind.UUID, optional=True),
        _f("o", Kind.OBJECTID, optional=True),
        _f("ints", Kind.INT, collection=Collection.LIST, optional=True),
        _f("strs", Kind.STR, collection=Collection.SET),
        _f("dct", Kind.FLOAT, collection=Collection.DICT, optional=True),
        _f("link", Kind.LINK, target="Obj", optional=True),
    ),
    "id",
)
SCHEMAS = {"Obj": OBJ}

# values chosen to hit every exactness trap: int vs float, huge ints, NaN/inf, NUL and
# U+FFFD (doc is lossy there), case folding beyond ASCII, Decimal exponents, old datetimes
INTS = [-2, 0, 1, 3, 2**60 + 1]
FLOATS = [-1.5, 0.0, -0.0, 2.0, 0.1, 1e300, 2.0**60, float("inf"), float("-inf"), float("nan")]
STRS = ["", "a", "A", "ab", "aB", "Straße", "STRASSE", "b*", "%_'\\", "é", "É", "a\x00b", "\ufffd"]
BYTES = [b"", b"\x00", b"\x01\xff", b"a", b"ab"]
TIMES = [
    dt.datetime(2020, 1, 1, tzinfo=UTC),
    dt.datetime(2020, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    dt.datetime(1969, 7, 20, 20, 17, tzinfo=UTC),
    dt.datetime(1, 1, 1, tzinfo=UTC),
    dt.datetime(2020, 1, 1),  # naive: UTC
]
DECS = [Decimal("1"), Decimal("1.0"), Decimal("-2.5"), Decimal("10"), Decimal("1E+1")]
DECS += [Decimal("-0"), Decimal("0.10"), Decimal("NaN"), Decimal("Infinity")]
UUIDS = [uuid.UUID(int=1), uuid.UUID(int=2**127), uuid.UUID(int=0xABC << 64)]
OIDS = [ObjectId("00" * 12), ObjectId("ab" * 12), ObjectId("0f" + "00" * 11)]
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
#: Arguments: the field's domain plus values of another numeric type.
ARGS: dict[str, list[Any]] = {
    **DOMAIN,
    "i": [*INTS, 0.5, -2.0, 2.0**60, float("inf")],
    "c": [*INTS, 1.0, 2.5],
    "f": [v for v in FLOATS if v == v] + [2, 2**60 + 1],
    "d": [d for d in DECS if d.is_finite()] + [1, 2.5],
}
N_OBJECTS = 8


@st.composite
def objects(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for pk in range(N_OBJECTS):
        obj: dict[str, Any] = {"id": pk}
        for name, dom in DOMAIN.items():
            values = st.sampled_from(dom)
            obj[name] = draw(values if name == "c" else st.none() | values)
        obj["ints"] = draw(st.none() | st.lists(st.sampled_from(INTS), max_size=3))
        obj["strs"] = draw(st.sets(st.sampled_from(STRS), max_size=3))
        obj["dct"] = draw(
            st.none()
            | st.dictionaries(st.sampled_from(["k", "x\x00", "é"]), st.sampled_from(FLOATS))
        )
        obj["link"] = draw(st.none() | st.integers(0, N_OBJECTS))
        out.append(obj)
    return out


ORDERED = ["<", "<=", ">", ">="]


@st.composite
def leaves(draw: st.DrawFn, args: list[Any]) -> str:
    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args) - 1}"

    shape = draw(st.integers(0, 9))
    if shape <= 3:
        name = draw(st.sampled_from(sorted(DOMAIN)))
        dom = ARGS[name]
        op = draw(st.sampled_from(["==", "!=", *ORDERED, "between", "in"]))
        if name == "b" and op in [*ORDERED, "between"]:
            op = "=="
        if op == "between":
            lo, hi = arg(draw(st.sampled_from(dom))), arg(draw(st.sampled_from(dom)))
            return f"{name} BETWEEN {{{lo}, {hi}}}"
        if op == "in":
            items = draw(st.lists(st.none() | st.sampled_from(dom), max_size=3))
            return f"{name} IN {arg(items)}"
        value = draw(st.sampled_from(dom) if op in ORDERED else st.none() | st.sampled_from(dom))
        return f"{name} {op} {arg(value)}"
    if shape == 4:
        op = draw(st.sampled_from(["BEGINSWITH", "ENDSWITH", "CONTAINS", "LIKE", "==", "!="]))
        ci = draw(st.sampled_from(["", "[c]"]))
        pattern = draw(st.sampled_from([*STRS, "*", "?", "a*", "*b?", "s*e", "%", "_"]))
        return f"s {op}{ci} {arg(pattern)}"
    if shape == 5:
        path = draw(st.sampled_from(["ints.@count", "strs.@count", "dct.@count", "s.@size"]))
        path = draw(st.sampled_from([path, "by.@size"]))
        op = draw(st.sampled_from(["==", "!=", *ORDERED]))
        return f"{path} {op} {arg(draw(st.integers(0, 3)))}"
    quant = draw(st.sampled_from(["", "ANY ", "ALL ", "NONE "]))
    if shape == 6:
        op = draw(st.sampled_from(["==", "!=", *ORDERED, "in"]))
        if op == "in":
            return f"{quant}ints IN {arg(draw(st.lists(st.sampled_from(INTS), max_size=2)))}"
        value = draw(st.sampled_from(INTS) if op in ORDERED else st.none() | st.sampled_from(INTS))
        return f"{quant}ints {op} {arg(value)}"
    if shape == 7:
        op = draw(st.sampled_from(["==", "!=", "BEGINSWITH[c]", "LIKE", ">", "CONTAINS"]))
        return f"{quant}strs {op} {arg(draw(st.sampled_from(STRS)))}"
    if shape == 8:
        op = draw(st.sampled_from(["==", "!=", *ORDERED]))
        return f"{quant}dct {op} {arg(draw(st.sampled_from(ARGS['f'])))}"
    return draw(st.sampled_from(["TRUEPREDICATE", "FALSEPREDICATE", "link == null", "link.i > 0"]))


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


def _no_links(model: str, pk: Any) -> dict[str, Any] | None:
    return None


class _Pg:
    """One event loop and one connection for every hypothesis example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(
            asyncpg.connect(DSN, server_settings={"TimeZone": "UTC"})
        )
        self.undecided = 0
        self.decided = 0

    def verdicts(
        self, objs: list[dict[str, Any]], queries: list[BoundQuery] | None, rule: BoundQuery | None
    ) -> dict[int, bool | None]:
        flt = compile_filter(queries, rule, 3)
        docs = [json.dumps(to_json(o)) for o in objs]
        rows = self.loop.run_until_complete(
            self.conn.fetch(
                f"SELECT i, {flt.sql} AS v FROM unnest($1::int[], $2::jsonb[]) AS t(i, doc)",
                [o["id"] for o in objs],
                docs,
                *flt.params,
            )
        )
        return {r["i"]: r["v"] for r in rows}

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[_Pg]:
    p = _Pg()
    yield p
    p.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objs=objects(), query=queries(), rule=queries())
def test_sql_agrees_with_evaluate(
    pg: _Pg, objs: list[dict[str, Any]], query: tuple[str, list[Any]], rule: tuple[str, list[Any]]
) -> None:
    bq = bind(parse(query[0]), OBJ, SCHEMAS, query[1])
    br = bind(parse(rule[0]), OBJ, SCHEMAS, rule[1])
    for qs, r in (([bq], None), ([bq], br), (None, br), ([], None), ([bq, br], None)):
        got = pg.verdicts(objs, qs, r)
        for o in objs:
            expected = object_matches(qs, r, o)
            verdict = got[o["id"]]
            if verdict is None:
                pg.undecided += 1
            else:
                pg.decided += 1
                assert verdict == expected, (query, rule, o)
    # the single query alone, against evaluate itself
    single = pg.verdicts(objs, [bq], None)
    for o in objs:
        if single[o["id"]] is not None:
            assert single[o["id"]] == evaluate(bq, o, _no_links), (query, o)


def test_most_verdicts_are_decided_in_sql(pg: _Pg) -> None:
    """Python fallback is the exception: plain queries on plain values decide in SQL."""
    objs = [
        {"id": i, "s": f"n{i}", "i": i, "c": 0, "strs": {"x"}, "f": i / 2, "ints": [i]}
        for i in range(20)
    ]
    for text in ("i > 5 AND s BEGINSWITH[c] 'N1'", "ANY ints == 3 OR f < 2.5", "s LIKE 'n?'"):
        got = pg.verdicts(objs, [bind(parse(text), OBJ, SCHEMAS, [])], None)
        assert None not in got.values(), text
        b = bind(parse(text), OBJ, SCHEMAS, [])
        assert {i for i, v in got.items() if v} == {
            o["id"] for o in objs if evaluate(b, o, _no_links)
        }
    # a path through a link is left to Python (NULL), but a FALSE conjunct still decides
    link = bind(parse("link.i > 0"), OBJ, SCHEMAS, [])
    never = bind(parse("FALSEPREDICATE"), OBJ, SCHEMAS, [])
    assert set(pg.verdicts(objs, [link], None).values()) == {None}
    assert set(pg.verdicts(objs, [link], never).values()) == {False}


# -- PostgresStorage.read_matching --------------------------------------------------------


@pytest.fixture
async def storage() -> AsyncIterator[PostgresStorage]:
    schema = "ts_test_" + uuid.uuid4().hex[:12]
    s = PostgresStorage(DSN, schema=schema, poll_interval=0.5)
    await s.open()
    try:
        yield s
    finally:
        await s.drop_schema()
        await s.close()


async def test_read_matching_pages_filters_and_counts_progress(storage: PostgresStorage) -> None:
    app = "flex"
    await storage.put_schemas(app, [TASK])
    await storage.register_client(app, "A", "u")
    a = Writer("A")
    titles = {
        f"k{i:03d}": ("keep" if i % 3 == 0 else "drop") + ("\x00" if i % 7 == 0 else "")
        for i in range(100)
    }
    await storage.integrate(
        [batch(app, a.cs(*(a.create(pk, title=t) for pk, t in titles.items())))]
    )
    await storage.integrate([batch(app, a.cs(a.erase("k003")))])
    schema = (await storage.get_schemas(app))["Task"]
    subs = [bind(parse("title BEGINSWITH 'keep'"), schema, {"Task": schema}, [])]
    rule = bind(parse("title != $0"), schema, {"Task": schema}, ["keep\x00"])  # Python fallback
    expected = [pack(pk) for pk, t in sorted(titles.items()) if t == "keep" and pk != "k003"]
    count, total = await storage.objects_size(app, "Task")
    assert count == 99
    got: list[bytes] = []
    scanned, after, pages = 0, None, 0
    for _ in range(100):
        page = await storage.read_matching(app, "Task", subs, rule, after, 5)
        pages += 1
        assert len(page.objects) <= 5
        for obj in page.objects:
            assert obj.values is not None and obj.values["title"] == "keep"
        got += [o.pk for o in page.objects]
        scanned += page.scanned_bytes
        if page.done:
            break
        after = page.cursor
    assert got == expected and pages >= 6
    assert scanned == total  # every alive object counted once, matching or not
    # the Python default (read_objects + evaluate) gives the same objects
    base = await super(PostgresStorage, storage).read_matching(app, "Task", subs, rule, None, 500)
    assert [o.pk for o in base.objects] == expected and base.done
    # no subscriptions at all: nothing; None: everything alive
    none = await storage.read_matching(app, "Task", [], None, None, 1000)
    assert none.objects == [] and none.done and none.scanned_bytes == total
    every = await storage.read_matching(app, "Task", None, None, None, 1000)
    assert len(every.objects) == 99


# -- end to end: tidesync serve on PostgreSQL with the owner_id rules ------------------------

CONFIG = textwrap.dedent(
    """
    [apps.todo]
    auth = ["anonymous", "email_password"]

    [apps.todo.rules.Task]
    read = "owner_id == $user.id OR shared == true"
    write = "owner_id == $user.id"
    """
)


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[Any]:
    from tidesync.testing import ServerProcess

    schema = "ts_test_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in DSN else "?"
    config = tmp_path / "tidesync.toml"
    config.write_text(CONFIG)
    proc = ServerProcess(
        tmp_path / "server",
        extra_args=["--storage", f"{DSN}{sep}schema={schema}", "--config", str(config)],
    ).start()
    try:
        yield proc
    finally:
        proc.kill()

        async def drop() -> None:
            conn = await asyncpg.connect(DSN)
            try:
                from tidesync.server.storage.pgviews import drop_views_of_storage

                await drop_views_of_storage(conn, schema)  # the apps' SQL view schemas
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


async def test_each_device_gets_what_it_subscribed_to_and_may_read(
    tmp_path: Path, pg_server: Any
) -> None:
    from tests.test_flexsync_e2e import Device, Task, eventually, subscribe

    u1 = Device(tmp_path, "u1", pg_server.url)
    u2 = Device(tmp_path, "u2", pg_server.url)
    try:
        await u1.open()
        await u2.open()
        assert u1.user is not None and u2.user is not None and u1.db and u2.db
        me, other = u1.user.id, u2.user.id
        with u2.db.write():
            for i in range(30):
                u2.db.add(Task(id=f"p{i:02d}", owner_id=other, n=i, shared=i % 2 == 0))
        with u1.db.write():
            for i in range(10):
                u1.db.add(Task(id=f"m{i}", owner_id=me, n=i, summary="Mine"))
        await u2.settle()
        await u1.settle()

        await subscribe(u1, "TRUEPREDICATE")  # everything it may read
        assert u1.ids() == {f"m{i}" for i in range(10)} | {f"p{i:02d}" for i in range(0, 30, 2)}
        await subscribe(u1, "n >= $0 AND summary BEGINSWITH[c] 'mi'", 5)  # narrow
        assert u1.ids() == {f"m{i}" for i in range(5, 10)}
        await subscribe(u1, "n < 4 OR n IN {20, 21}")  # widen, across owners
        assert u1.ids() == {"m0", "m1", "m2", "m3", "p00", "p02", "p20"}
        await subscribe(u2, "TRUEPREDICATE")
        assert u2.ids() == {f"p{i:02d}" for i in range(30)}  # never u1's private tasks

        # u2 shares p21: it enters u1's view; unshares p20: it leaves (deleted nowhere)
        with u2.db.write():
            u2.db.find(Task, "p21").shared = True
            u2.db.find(Task, "p20").shared = False
        await u2.settle()
        await eventually(lambda: u1.ids() == {"m0", "m1", "m2", "m3", "p00", "p02", "p21"})
        assert u2.ids() == {f"p{i:02d}" for i in range(30)}
    finally:
        u1.shutdown()
        u2.shutdown()
