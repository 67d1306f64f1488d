"""Upload and download progress, and ``Database.open(on_progress=...)``, against a real server."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import FaultProxy, ServerProcess

from .test_session_state import Item, T, device, server, wait_connected, wait_until

__all__ = ["device", "server"]  # fixtures used here

UP, DOWN = ts.ProgressDirection.UPLOAD, ts.ProgressDirection.DOWNLOAD
OUTSTANDING = ts.ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK
FOREVER = ts.ProgressMode.REPORT_INDEFINITELY


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", server.port)
    p.start_in_thread()
    try:
        yield p
    finally:
        p.stop_thread()


def write_items(db: ts.Database, prefix: str, count: int, size: int, per_tx: int = 10) -> None:
    # random text: frames are compressed on the wire, so repeated characters would shrink
    # to almost nothing and throttling the proxy would not slow them down
    for start in range(0, count, per_tx):
        with db.write():
            for i in range(start, min(count, start + per_tx)):
                text = base64.b64encode(os.urandom(size * 3 // 4 + 1)).decode()[:size]
                db.add(Item(id=f"{prefix}{i}", text=text, n=i))


def estimates(values: list[ts.SyncProgress]) -> list[float]:
    return [p.progress_estimate for p in values]


async def collect(stream: Any, limit: float = 20) -> list[ts.SyncProgress]:
    got: list[ts.SyncProgress] = []

    async def run() -> None:
        async for p in stream:
            got.append(p)

    await asyncio.wait_for(run(), limit)
    return got


async def test_nothing_outstanding_gives_one_value_and_ends(device: Any) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    await s.wait_for_download(T(10))
    for direction in (UP, DOWN):
        got = await collect(s.get_progress_stream(direction, OUTSTANDING), 5)
        assert estimates(got) == [1.0]


async def test_upload_progress_counts_acknowledged_bytes(device: Any, proxy: FaultProxy) -> None:
    d = device("a", url=proxy.url)
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    proxy.stall("downstream")  # bytes go up, no acknowledgement comes back
    await asyncio.sleep(0.2)
    write_items(db, "u", 40, 5000)
    got: list[ts.SyncProgress] = []
    stream = s.get_progress_stream(UP, OUTSTANDING)
    first = await asyncio.wait_for(anext(stream), 5)
    got.append(first)
    assert first.progress_estimate == 0.0 and first.transferable_bytes > 200_000
    await asyncio.sleep(1.0)  # sent, not acknowledged: still nothing done
    proxy.restore()
    got += await collect(stream)
    values = estimates(got)
    assert values[-1] == 1.0
    assert values == sorted(values)  # never decreases
    assert all(v == 0.0 for v in values[:1])


async def test_upload_progress_rises_in_steps(device: Any, proxy: FaultProxy) -> None:
    d = device("a", url=proxy.url)
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    s.pause()
    write_items(db, "s", 100, 10_000)  # ~1 MB, sent in 256 KiB UPLOADs
    proxy.throttle(200_000)  # ~5 s on the wire, so acknowledgements come in several steps
    stream = s.get_progress_stream(UP, OUTSTANDING)
    s.resume()
    got = await collect(stream, 30)
    values = estimates(got)
    assert values[0] == 0.0 and values[-1] == 1.0
    assert values == sorted(values)
    assert len([v for v in values if 0.0 < v < 1.0]) >= 1, values  # acks are group-committed
    assert got[-1].transferred_bytes == got[-1].transferable_bytes > 900_000


async def test_report_indefinitely_restarts_and_needs_a_break(device: Any) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    stream = s.get_progress_stream(UP, FOREVER)
    values: list[float] = [(await asyncio.wait_for(anext(stream), 5)).progress_estimate]
    assert values == [1.0]  # nothing to upload yet

    async def until_one() -> None:
        async for p in stream:
            values.append(p.progress_estimate)
            if p.progress_estimate == 1.0:
                return

    for batch in range(2):
        write_items(db, f"b{batch}-", 5, 1000)
        await asyncio.wait_for(until_one(), 20)
    # each batch restarts the count: 1.0, then below 1.0 for the new work, then 1.0 again
    ones = [i for i, v in enumerate(values) if v == 1.0]
    assert len(ones) >= 3
    assert any(v < 1.0 for v in values[ones[0] : ones[1]])
    assert any(v < 1.0 for v in values[ones[1] : ones[2]])
    # it does not end by itself
    extra = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.5)
    assert not extra.done()
    extra.cancel()
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_callback_form_and_cancel(device: Any) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    got: list[float] = []
    lock = threading.Lock()

    def cb(p: ts.SyncProgress) -> None:
        with lock:
            got.append(p.progress_estimate)

    token = s.add_progress_listener(cb, UP, FOREVER)
    assert got == [1.0]  # first value during registration
    write_items(db, "c", 5, 1000)
    await s.wait_for_upload(T(10))
    await wait_until(lambda: got[-1] == 1.0 and len(got) >= 3, 5, "progress calls")
    token.cancel()
    await asyncio.sleep(0.1)
    n = len(got)
    write_items(db, "d", 5, 1000)
    await s.wait_for_upload(T(10))
    await asyncio.sleep(0.2)
    assert len(got) == n


async def test_open_reports_download_progress_in_steps(device: Any) -> None:
    a = device("a")
    dba = await a.open()
    write_items(dba, "big", 150, 10_000, per_tx=5)  # ~1.5 MB: the server pages it by 256 KiB
    await dba.sync_session.wait_for_upload(T(30))

    b = device("b")
    b.user = await b.app.log_in(ts.Credentials.anonymous())
    seen: list[ts.SyncProgress] = []
    db = await ts.Database.open(b.config(), on_progress=seen.append)
    b.dbs.append(db)
    values = estimates(seen)
    assert values[-1] == 1.0
    assert values == sorted(values) and len(set(values)) == len(values)
    assert len([v for v in values if 0.0 < v < 1.0]) >= 3, values
    assert len(db.all(Item)) == 150
    # and a download stream sees the next batch from the other device
    stream = db.sync_session.get_progress_stream(DOWN, FOREVER)
    assert (await asyncio.wait_for(anext(stream), 5)).progress_estimate == 1.0
    write_items(dba, "more", 5, 1000)
    nxt = await asyncio.wait_for(anext(stream), 10)  # the batch arrived: counted, complete
    assert nxt.progress_estimate == 1.0 and nxt.transferred_bytes > 5000
    await wait_until(lambda: len(db.all(Item)) == 155, 10, "the next batch")


async def test_open_cancel_raises_and_closes(device: Any, server: ServerProcess) -> None:
    a = device("a")
    dba = await a.open()
    write_items(dba, "big", 60, 10_000, per_tx=5)
    await dba.sync_session.wait_for_upload(T(30))

    b = device("b")
    b.user = await b.app.log_in(ts.Credentials.anonymous())
    token = ts.CancellationToken()
    seen: list[float] = []

    def on_progress(p: ts.SyncProgress) -> None:
        seen.append(p.progress_estimate)
        token.cancel()  # cancel as soon as the download starts

    with pytest.raises(ts.OperationCancelledError):
        await ts.Database.open(b.config(), on_progress=on_progress, cancellation_token=token)
    assert seen
    conn = b.app._sync_client._connections[b.user.id]
    await wait_until(lambda: not conn.workers, 5, "session closed")

    # offline: a deadline ends the open, which does not hang
    server.kill()
    with pytest.raises(ts.OperationCancelledError):
        await ts.Database.open(b.config("other.tidesync"), cancellation_token=T(1))
    await wait_until(lambda: not conn.workers, 5, "session closed")
