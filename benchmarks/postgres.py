"""PostgreSQL storage next to SQLite: push, pull and latency through ``tidesync serve``, and
server ingest throughput with one and with two server processes on one PostgreSQL database.

Needs ``TIDESYNC_TEST_PG_DSN`` (e.g. ``postgresql://postgres@127.0.0.1:5432/test``); each run
uses its own PostgreSQL schema and drops it afterwards. Skipped (with a note) when unset.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import websockets

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack_instructions
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.protocol.client import ClientProtocol, ClientState, ErrorReceived, SessionBound
from tidesync.protocol.messages import UploadChangeset
from tidesync.testing import ServerProcess

from .common import Bench, Device, percentile, rows, write_objects
from .harness import Context, Measurement

GROUP = "postgres"
LIMIT = 600.0
DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")

TASK = ModelSchema(
    "Task",
    (FieldSchema("id", Kind.STR, primary_key=True), FieldSchema("title", Kind.STR)),
    "id",
)


def _drop_schema(schema: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


class _Backend:
    """One or two server processes on SQLite (one only) or on a fresh PostgreSQL schema."""

    def __init__(self, root: Path, kind: str, processes: int = 1) -> None:
        self.schema = "ts_bench_" + uuid.uuid4().hex[:10] if kind == "postgres" else ""
        args = ["--storage", f"{DSN}?schema={self.schema}"] if self.schema else []
        shutil.rmtree(root, ignore_errors=True)
        self.procs = [ServerProcess(root / "server", extra_args=args) for _ in range(processes)]
        for proc in self.procs:
            proc.start(timeout=60)

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        if self.schema:
            _drop_schema(self.schema)


def _push_pull(ctx: Context, kind: str, n: int, run: int) -> tuple[float, float]:
    backend = _Backend(ctx.workdir / f"pg-pushpull-{kind}-{run}", kind)
    root = ctx.workdir / f"pg-pushpull-{kind}-{run}"
    a, b = Device(root, "a", backend.urls[0]), Device(root, "b", backend.urls[0])
    try:
        db = a.open()
        a.wait_upload(60)
        db.sync_session.pause()
        write_objects(db, rows(n), min(n, 10_000))  # the server refuses changesets over 4 MiB
        start = time.perf_counter()
        db.sync_session.resume()
        a.wait_upload(LIMIT)
        push = time.perf_counter() - start
        b.log_in()
        start = time.perf_counter()
        b.open()
        b.wait_count(n, LIMIT)
        pull = time.perf_counter() - start
        if a.errors or b.errors:
            raise RuntimeError(f"sync errors: {a.errors + b.errors}")
        return push, pull
    finally:
        a.close()
        b.close()
        backend.close()


def _latency(ctx: Context, kind: str, processes: int, count: int) -> list[float]:
    """A (on process 1) writes one object at a time; until B (on the last process) is told."""
    root = ctx.workdir / f"pg-latency-{kind}-{processes}"
    backend = _Backend(root, kind, processes)
    a, b = Device(root, "a", backend.urls[0]), Device(root, "b", backend.urls[-1])
    arrived = threading.Event()
    seen = {"at": 0.0}
    try:
        adb, bdb = a.open(), b.open()
        a.wait_upload(60)
        b.wait_count(0, 60)

        def on_change(change: Any) -> None:
            if change.inserted:
                seen["at"] = time.perf_counter()
                arrived.set()

        token = bdb.all(Bench).add_listener(on_change)
        time.sleep(0.5)
        lat: list[float] = []
        for k, (i, owner, title, qty, price, done) in enumerate(rows(count + 20)):
            arrived.clear()
            start = time.perf_counter()
            with adb.write():
                adb.add(Bench(id=i, owner=owner, title=title, qty=qty, price=price, done=done))
            if not arrived.wait(30):
                raise TimeoutError(f"object {i} did not reach B within 30 s")
            if k >= 20:
                lat.append(seen["at"] - start)
        token.cancel()
        return lat
    finally:
        a.close()
        b.close()
        backend.close()


async def _uploader(url: str, ident: str, uploads: int, per_upload: int) -> None:
    """A raw protocol client: bind, send ``uploads`` changesets, wait for every ack."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        reply = await http.post("/api/v1/apps/bench/auth/anonymous", json={})
        reply.raise_for_status()
        token = reply.json()["access_token"]
    ws_url = "ws" + url[len("http") :] + "/api/v1/apps/bench/sync"
    async with websockets.connect(ws_url, max_size=None) as ws:
        proto = ClientProtocol()
        deadline = time.monotonic() + LIMIT
        bound = [False]

        async def exchange(done: Any) -> None:
            while True:
                for frame in proto.data_to_send():
                    await ws.send(frame)
                if done():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{ident}: no answer from the server")
                frame = await asyncio.wait_for(ws.recv(), left)
                assert isinstance(frame, bytes)
                for event in proto.receive_data(frame):
                    if isinstance(event, ErrorReceived):
                        raise RuntimeError(f"{ident}: {event}")
                    bound[0] = bound[0] or isinstance(event, SessionBound)

        proto.start(token)
        await exchange(lambda: proto.state is ClientState.OPEN)
        proto.bind(1, ident, [TASK.to_dict()], 0, 0)
        await exchange(lambda: bound[0])
        for v in range(1, uploads + 1):
            ins = [
                Instruction(
                    Op.CREATE,
                    "Task",
                    f"{ident}-{v}-{k}",
                    HLC(1000 + v, k, ident),
                    value={"id": f"{ident}-{v}-{k}", "title": "x" * 20},
                )
                for k in range(per_upload)
            ]
            proto.upload(1, [UploadChangeset(v, pack_instructions(ins))], 0)
        await exchange(lambda: proto.progress(1).upload_acked >= uploads)


def _ingest(ctx: Context, processes: int, clients: int, uploads: int, per_upload: int) -> float:
    """Instructions per second the server side integrates, clients spread over the processes."""
    backend = _Backend(ctx.workdir / f"pg-ingest-{processes}", "postgres", processes)
    try:
        urls = backend.urls

        async def main() -> float:
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    _uploader(urls[c % len(urls)], f"c{c}", uploads, per_upload)
                    for c in range(clients)
                )
            )
            return time.perf_counter() - start

        took = asyncio.run(main())
        return clients * uploads * per_upload / took
    finally:
        backend.close()


def run(ctx: Context) -> None:
    """Record the PostgreSQL benchmarks (or a note that they were skipped)."""
    if not DSN:
        ctx.log(f"{GROUP}: TIDESYNC_TEST_PG_DSN is not set; skipped")
        return
    n = 10_000 if ctx.quick else 100_000
    for kind in ("sqlite", "postgres"):
        push: list[float] = []
        pull: list[float] = []
        for r in range(ctx.repeats):
            p, q = _push_pull(ctx, kind, n, r)
            ctx.log(f"  {kind}: push {p:.3f} s, pull {q:.3f} s")
            push.append(p)
            pull.append(q)
        ref = None if kind == "sqlite" else "sqlite"
        ctx.record(
            Measurement(
                GROUP, f"{kind} push {n:,}", "s", push, ref and f"{ref} push {n:,}", "until acked"
            )
        )
        ctx.record(
            Measurement(
                GROUP, f"{kind} pull {n:,}", "s", pull, ref and f"{ref} pull {n:,}", "fresh device"
            )
        )
    count = 100 if ctx.quick else 500
    for kind, processes in (("sqlite", 1), ("postgres", 1), ("postgres", 2)):
        lat = _latency(ctx, kind, processes, count)
        label = f"{kind} latency p50" + (" across 2 processes" if processes == 2 else "")
        chunks = [lat[i::3] for i in range(3)]
        ctx.record(
            Measurement(
                GROUP,
                label,
                "s",
                [percentile(c, 50) for c in chunks],
                None if kind == "sqlite" else "sqlite latency p50",
                f"{len(lat)} writes; p95 {percentile(lat, 95) * 1e3:.1f} ms",
            )
        )
    clients, uploads, per_upload = (8, 20, 50) if ctx.quick else (16, 50, 100)
    for processes in (1, 2):
        ctx.measure(
            GROUP,
            f"postgres ingest, {processes} server process{'es' if processes == 2 else ''}",
            lambda _run, p=processes: _ingest(ctx, p, clients, uploads, per_upload),
            unit="instructions/s",
            reference="postgres ingest, 1 server process" if processes == 2 else None,
            note=f"{clients} clients x {uploads} uploads x {per_upload} creates",
        )
