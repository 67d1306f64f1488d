"""Values at the edges of their types, end to end: real ``tidesync serve`` processes (on
SQLite and, with ``TIDESYNC_TEST_PG_DSN``, on PostgreSQL), real device files, WebSockets.

- counters wrap around at 64 bits (docs/merge.md "Counters at the bounds"): two offline
  devices each adding ``2**62`` converge on ``-2**63`` and keep syncing;
- a crafted upload carrying an int outside 64 bits is refused with a session error that
  names the field and the value, and the device's session goes on with its other writes;
- every float (NaN with its payload, ``±inf``, ``-0.0``) round-trips bit-exactly through
  the local file, the server's storage and a second device (docs/local-database.md).
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tidesync as ts
from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack_instructions, unpack_instructions
from tidesync.protocol import messages as m
from tidesync.protocol.codec import decode_frame, encode_frame
from tidesync.server.runner import InProcessServer
from tidesync.server.storage.conformance import edge_floats
from tidesync.testing import ServerProcess

from .security_helpers import Raw, login
from .test_sync_e2e import Device, settle

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")


class Tally(ts.Model):
    id: str = ts.primary_key()
    hits: ts.Counter
    n: int = 0


class Reading(ts.Model):
    id: str = ts.primary_key()
    value: float
    maybe: float | None = None
    series: list[float]
    bag: set[float]
    named: dict[str, float]


MODELS: list[type[ts.Model]] = [Tally, Reading]


def bits(value: float) -> str:
    """A float's IEEE 754 bits, so NaN payloads and the sign of zero compare too."""
    return struct.pack(">d", value).hex()


#: Every special float, NaNs with other payloads and signs among them.
SPECIALS = [
    float("nan"),
    -float("nan"),
    struct.unpack(">d", bytes.fromhex("7ff0000000000001"))[0],  # a signalling NaN's bits
    struct.unpack(">d", bytes.fromhex("fff8dead0000beef"))[0],
    float("inf"),
    float("-inf"),
    -0.0,
    0.0,
    5e-324,
    -1.5,
    1.7976931348623157e308,
    *edge_floats(24)[12:],  # random bit patterns
]
#: Any float: hypothesis's (NaN, inf, -0.0 included), any bit pattern, the specials.
FLOATS = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(0, 2**64 - 1).map(lambda b: struct.unpack(">d", b.to_bytes(8, "big"))[0])
    | st.sampled_from([-0.0, math.nan, -math.nan, math.inf, -math.inf])
)


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    """A ``tidesync serve`` on SQLite storage, or on PostgreSQL in a schema of its own."""
    schema = ""
    args: list[str] = []
    if request.param == "postgres":
        if not DSN:
            pytest.skip("TIDESYNC_TEST_PG_DSN is not set")
        schema = "ts_test_" + uuid.uuid4().hex[:12]
        sep = "&" if "?" in DSN else "?"
        args = ["--storage", f"{DSN}{sep}schema={schema}"]
    proc = ServerProcess(tmp_path / "server", extra_args=args).start()
    try:
        yield proc
    finally:
        proc.kill()
        if schema:
            asyncpg = pytest.importorskip("asyncpg")

            async def drop() -> None:
                conn = await asyncpg.connect(DSN)
                try:
                    from tidesync.server.storage.pgviews import drop_views_of_storage

                    await drop_views_of_storage(conn, schema)  # the apps' SQL view schemas
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                finally:
                    await conn.close()

            asyncio.run(drop())


@pytest.fixture
async def devices(tmp_path: Path, server: ServerProcess) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str) -> Device:
        d = Device(tmp_path, name, server.url, MODELS)
        await d.open()
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def _reading(pk: str, x: float) -> Reading:
    bag = {x, 2.5} if x == x else {2.5}  # NaN cannot be a set element
    return Reading(id=pk, value=x, maybe=x, series=[x, 1.0], bag=bag, named={"k": x})


def _read_bits(db: ts.Database) -> dict[str, tuple[Any, ...]]:
    return {
        r.id: (
            bits(r.value),
            bits(r.maybe),
            [bits(x) for x in r.series],
            sorted(bits(x) for x in r.bag),
            {k: bits(x) for k, x in r.named.items()},
        )
        for r in db.all(Reading)
    }


def _want_bits(x: float, later: float | None = None) -> tuple[Any, ...]:
    """What _read_bits shows for an object made by _reading(x), then changed to ``later``."""
    value = x if later is None else later
    bag = sorted(bits(v) for v in ({0.0 if x == 0 else x, 2.5} if x == x else {2.5}))
    named = {"k": bits(x)} if later is None else {"k": bits(x), "j": bits(later)}
    series = [bits(x), bits(1.0)] + ([] if later is None else [bits(later)])
    return (bits(value), bits(x), series, bag, named)


@settings(max_examples=60, deadline=None)
@given(st.lists(FLOATS, min_size=1, max_size=6), FLOATS)
def test_local_floats_round_trip_through_the_file_bit_exactly(xs: list[float], y: float) -> None:
    """Written locally (a new object's row, then a change through the merge), read in the
    same session and after reopening the file: the same bits; queries and sorts run."""
    with tempfile.TemporaryDirectory() as folder:
        config = ts.Configuration.local(MODELS, path=Path(folder) / "f.tidesync")
        want = {f"r{i}": _want_bits(x) for i, x in enumerate(xs)}
        with ts.Database(config) as db:
            with db.write():
                for i, x in enumerate(xs):
                    db.add(_reading(f"r{i}", x))
            assert _read_bits(db) == want
            with db.write():  # the row's state is rebuilt from its columns, then changed
                r = db.find(Reading, "r0")
                r.value = y
                r.series.append(y)
                r.named["j"] = y
            want["r0"] = _want_bits(xs[0], y)
            assert _read_bits(db) == want
        with ts.Database(config) as db:
            assert _read_bits(db) == want
            nulls = {r.id for r in db.query(Reading, "value == nil")}
            assert nulls == {pk for pk, w in want.items() if math.isnan(bytes_float(w[0]))}
            zeros = {r.id for r in db.query(Reading, "value == 0")}
            assert zeros == {pk for pk, w in want.items() if bytes_float(w[0]) == 0}
            ordered = [r.id for r in db.query(Reading, "TRUEPREDICATE SORT(value DESC)")]
            assert sorted(ordered) == sorted(want)


def bytes_float(hexbits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(hexbits))[0]
    return value


@settings(max_examples=200, deadline=None)
@given(st.lists(FLOATS, min_size=1, max_size=8))
def test_floats_cross_the_wire_bit_exactly(xs: list[float]) -> None:
    hlc = HLC(1_700_000_000_000, 0, "f1")
    made = [
        Instruction(Op.SET, "Reading", f"r{i}", hlc._replace(counter=i), "value", x)
        for i, x in enumerate(xs)
    ]
    made.append(Instruction(Op.SET, "Reading", "l", hlc._replace(counter=99), "series", xs))
    frame = encode_frame(m.Upload(1, [m.UploadChangeset(1, pack_instructions(made))], 0))
    got = decode_frame(frame, max_frame_size=1 << 24)
    assert isinstance(got, m.Upload)
    back = unpack_instructions(got.changesets[0].instructions, "f1")
    assert [bits(i.value) for i in back[:-1]] == [bits(x) for x in xs]
    assert [bits(v) for v in back[-1].value] == [bits(x) for x in xs]


def hits(d: Device) -> int:
    assert d.db is not None
    tally = d.db.find(Tally, "t")
    assert tally is not None
    return tally.hits.value


def active(d: Device) -> bool:
    assert d.db is not None
    return d.db.sync_session.state is ts.SessionState.ACTIVE


async def test_offline_increments_past_64_bits_wrap_and_sync_goes_on(devices: Any) -> None:
    a, b = await devices("a"), await devices("b")
    with a.db.write():
        a.db.add(Tally(id="t"))
    await settle(a, b)
    assert hits(b) == 0
    a.db.sync_session.pause()
    b.db.sync_session.pause()
    for d in (a, b):  # offline, each adds 2**62: the sum is 2**63, one past int64
        with d.db.write():
            d.db.find(Tally, "t").hits.increment(2**62)
        assert hits(d) == 2**62
    a.db.sync_session.resume()
    b.db.sync_session.resume()
    await settle(a, b)
    await settle(a, b)
    assert hits(a) == hits(b) == -(2**63)  # wrapped around, the same everywhere
    c = await devices("c")  # a fresh device downloads the wrapped value too
    await settle(c)
    assert hits(c) == -(2**63)
    with b.db.write():  # and every session goes on
        b.db.find(Tally, "t").hits.increment(-1)
        b.db.find(Tally, "t").n = 7
    await settle(b, a, c)
    assert [hits(d) for d in (a, b, c)] == [2**63 - 1] * 3
    assert all(active(d) for d in (a, b, c))
    assert [d.errors for d in (a, b, c)] == [[], [], []]


async def test_an_increment_outside_64_bits_is_refused_at_write_time(devices: Any) -> None:
    a = await devices("a")
    with a.db.write():
        a.db.add(Tally(id="t"))
    with pytest.raises(ts.ValueTypeError, match=r"Tally\.hits.*9223372036854775808"):
        with a.db.write():
            a.db.find(Tally, "t").hits.increment(2**63)
    with pytest.raises(ts.ValueTypeError, match=r"Tally\.n.*-9223372036854775809"):
        with a.db.write():
            a.db.find(Tally, "t").n = -(2**63) - 1
    with pytest.raises(ts.ValueTypeError, match=r"Reading\.value.*too large for a float"):
        with a.db.write():
            a.db.add(Reading(id="huge", value=10**400))
    assert hits(a) == 0 and a.db.find(Tally, "t").n == 0  # nothing was written
    assert a.db.find(Reading, "huge") is None
    await settle(a)
    assert active(a) and a.errors == []


def _upload(version: int, op: Op, field: str | None, value: Any) -> m.UploadChangeset:
    hlc = HLC(1_700_000_000_000 + version, 0, "f1")
    if op is Op.CREATE:
        ins = Instruction(op, "Tally", "t", hlc, None, {"id": "t", "n": value})
    else:
        ins = Instruction(op, "Tally", "t", hlc, field, value)
    return m.UploadChangeset(version, pack_instructions([ins]))


@pytest.mark.parametrize(
    ("op", "field", "value"),
    [
        (Op.CREATE, None, 2**63),
        (Op.SET, "n", 2**64 - 1),  # the largest int msgpack carries (uint64)
        (Op.ADD, "hits", 2**63),
        (Op.SET, "hits", 2**63 + 5),
    ],
)
async def test_a_crafted_upload_outside_64_bits_is_refused_naming_field_and_value(
    tmp_path: Path, op: Op, field: str | None, value: int
) -> None:
    async with InProcessServer(tmp_path / "data") as server:
        tokens = await login(server, "todo")
        raw = await Raw.open(server, "todo")
        try:
            assert isinstance(await raw.hello(tokens["access_token"]), m.Welcome)
            schema = Tally.__schema__.to_dict()  # type: ignore[attr-defined]
            await raw.send(m.Bind(1, "f1", [schema], 0, 0))
            assert isinstance(await raw.until(m.Bound), m.Bound)
            version = 1
            if op is not Op.CREATE:  # the object exists; the crafted change comes next
                await raw.send(m.Upload(1, [_upload(1, Op.CREATE, None, 0)], 0))
                for _ in range(100):
                    if await server.storage.get_objects("todo", "Tally"):
                        break
                    await asyncio.sleep(0.05)
                version = 2
            await raw.send(m.Upload(1, [_upload(version, op, field, value)], 0))
            error = await raw.until(m.Error)
            assert error is not None and error.session == 1
            assert error.code == m.ErrorCode.BAD_CHANGESET
            assert f"{field or 'n'}" in error.message
            assert f"{value} does not fit in 64 bits" in error.message
            # nothing out of range was stored; what is stored is in range
            for values in (await server.storage.get_objects("todo", "Tally")).values():
                assert -(2**63) <= values["n"] < 2**63 and -(2**63) <= values["hits"] < 2**63
        finally:
            await raw.close()


async def test_every_float_round_trips_bit_exactly(devices: Any) -> None:
    """Through the server's storage (SQLite, PostgreSQL) to a second device, and the first
    device's file reopened: every float, bit for bit."""
    a = await devices("a")
    with a.db.write():
        for i, v in enumerate(SPECIALS):
            a.db.add(_reading(f"r{i}", v))
    b = await devices("b")
    await settle(a, b)
    want = {f"r{i}": _want_bits(v) for i, v in enumerate(SPECIALS)}
    assert _read_bits(a.db) == want
    assert _read_bits(b.db) == want  # through the server's storage
    with b.db.write():  # back the other way, through the merge on every replica
        for i in range(len(SPECIALS)):
            r = b.db.find(Reading, f"r{i}")
            r.value = SPECIALS[-1 - i]
            r.series.append(SPECIALS[-1 - i])
            r.named["j"] = SPECIALS[-1 - i]
    await settle(b, a)
    want = {f"r{i}": _want_bits(v, SPECIALS[-1 - i]) for i, v in enumerate(SPECIALS)}
    assert _read_bits(b.db) == want
    assert _read_bits(a.db) == want
    a.db.close()  # reopen the file: what its columns hold
    await a.open()
    assert _read_bits(a.db) == want
    c = await devices("c")  # a new device's bootstrap
    await settle(c)
    assert _read_bits(c.db) == want
    assert all(active(d) for d in (a, b, c))
