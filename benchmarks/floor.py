"""The floor: what the hardware and the libraries allow at best. Raw sqlite3 (WAL) inserting
the rows in one transaction, the same rows as msgpack messages in frames of 1,000 over one
loopback WebSocket (``websockets``), and the loopback WebSocket round trip."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import msgpack
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from .common import percentile, rows
from .harness import Context, Measurement

GROUP = "floor"
FRAME = 1000


def _sqlite(path: Path, data: list[tuple[int, str, str, int, float, bool]]) -> float:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE bench (id INTEGER PRIMARY KEY, owner TEXT, title TEXT, qty INTEGER, "
        "price REAL, done INTEGER)"
    )
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?)", data)
    conn.execute("COMMIT")
    took = time.perf_counter() - start
    conn.close()
    return took


async def _echo_count(ws: ServerConnection) -> None:
    """Server side: answer "ping" with "pong" (the round trip) and every data frame with
    the running count of the messages it decoded."""
    got = 0
    async for frame in ws:
        assert isinstance(frame, bytes)
        if frame == b"ping":
            await ws.send(b"pong")
            continue
        got += len(msgpack.unpackb(frame))
        await ws.send(msgpack.packb(got))


async def _transfer(
    data: list[tuple[int, str, str, int, float, bool]],
) -> tuple[float, list[float]]:
    async with serve(_echo_count, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as ws:
            rtts: list[float] = []
            for _ in range(1100):
                t0 = time.perf_counter()
                await ws.send(b"ping")
                await ws.recv()
                rtts.append(time.perf_counter() - t0)
            start = time.perf_counter()
            for s in range(0, len(data), FRAME):
                await ws.send(msgpack.packb([list(r) for r in data[s : s + FRAME]]))
            # the server answers each frame with its running count; wait for the last one
            total = 0
            while total < len(data):
                total = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
            return time.perf_counter() - start, rtts[100:]


def run(ctx: Context) -> None:
    """Record the floor."""
    work = ctx.workdir / "floor"
    work.mkdir(parents=True, exist_ok=True)
    rtt: list[float] = []
    for n in ctx.sizes:
        rtt = _floor(ctx, n, work)
    # the round trip of the largest size's runs
    ctx.record(Measurement(GROUP, "floor: websocket round trip p50", "s", rtt, note="1,000 pings"))


def _floor(ctx: Context, n: int, work: Path) -> list[float]:
    """The floor at size ``n``; returns each run's round trip p50."""
    data = rows(n)
    ctx.log(f"{GROUP}: N = {n:,}")
    sq: list[float] = []
    tr: list[float] = []
    rtt: list[float] = []
    for _r in range(ctx.repeats):
        sq.append(_sqlite(work / "floor.sqlite", data))
        t, rt = asyncio.run(_transfer(data))
        tr.append(t)
        rtt.append(percentile(rt, 50))
        ctx.log(
            f"  sqlite {sq[-1]:.3f} s, websocket {tr[-1]:.3f} s, rtt p50 {rtt[-1] * 1e6:.0f} µs"
        )
    ctx.record(Measurement(GROUP, f"floor: sqlite3 insert {n:,} rows, 1 transaction", "s", sq))
    ctx.record(
        Measurement(GROUP, f"floor: websocket transfer {n:,} rows", "s", tr, note="1,000 per frame")
    )
    ctx.record(
        Measurement(
            GROUP,
            f"floor: sqlite3 insert + websocket transfer {n:,}",
            "s",
            [a + b for a, b in zip(sq, tr, strict=True)],
        )
    )
    return rtt
