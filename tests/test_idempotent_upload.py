"""Idempotent upload: the acknowledgement of a committed upload is lost, the device reconnects.

The device talks to a real ``tidesync serve`` through a :class:`FaultProxy`. For each round,
the proxy stalls server -> client bytes, the device increments a counter, a second device
(connected directly) sees the increment (so the server committed it), then the connection is
cut before the device ever read its acknowledgement. After reconnecting, the increment must
be applied exactly once: counters on both devices and in the server's storage prove it, and
the server's history holds each (origin, client version) once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import tidesync as ts
from tidesync.server.storage import SQLiteStorage
from tidesync.testing import FaultProxy, ServerProcess

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken
ROUNDS = 4


class Tally(ts.Model):
    id: str = ts.primary_key()
    hits: ts.Counter
    note: str = ""


async def _open(root: Path, name: str, url: str) -> tuple[ts.App, ts.Database]:
    app = ts.App(
        ts.AppConfiguration("tally", base_url=url, base_path=root / name, sync_timeouts=FAST)
    )
    user = await app.log_in(ts.Credentials.anonymous())
    return app, ts.Database(ts.Configuration.flexible_sync(user, [Tally]))


def _hits(db: ts.Database) -> int:
    obj = db.find(Tally, "t")
    return -1 if obj is None else int(obj.hits.value)


async def _wait_hits(db: ts.Database, want: int, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        await db.sync_session.wait_for_download(T(limit))
        if _hits(db) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"hits stayed {_hits(db)}, wanted {want}")


async def test_lost_ack_applies_upload_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    try:
        async with FaultProxy("127.0.0.1", server.port, seed=5) as proxy:
            app_a, a = await _open(tmp_path, "a", proxy.url)
            app_b, b = await _open(tmp_path, "b", server.url)
            try:
                with a.write():
                    a.add(Tally(id="t", note="start"))
                await a.sync_session.wait_for_upload(T(20))
                await _wait_hits(b, 0)
                for i in range(1, ROUNDS + 1):
                    proxy.stall("downstream")
                    with a.write():
                        obj = a.find(Tally, "t")
                        assert obj is not None
                        obj.hits.increment(1)
                        obj.note = f"round {i}"
                    await _wait_hits(b, i)  # the server committed round i
                    proxy.cut()  # ...and the device never read the acknowledgement
                    proxy.restore()
                    await a.sync_session.wait_for_upload(T(20))
                    await _wait_hits(a, i)
                await _wait_hits(b, ROUNDS)
                await _wait_hits(a, ROUNDS)
                assert proxy.stats.cuts == ROUNDS and proxy.stats.connections > ROUNDS
            finally:
                a.close()
                b.close()
                app_a.close()
                app_b.close()
    finally:
        server.stop()
    async with SQLiteStorage(tmp_path / "server" / "server.sqlite3") as storage:
        objects = await storage.get_objects("tally", "Tally")
        assert objects["t"]["hits"] == ROUNDS and objects["t"]["note"] == f"round {ROUNDS}"
        page = await storage.read_log("tally", 0, 1 << 30)
        ids = [(e.origin, e.client_version) for e in page.entries]
        assert len(ids) == len(set(ids)) >= ROUNDS + 1
