"""The backend API (issue 20): an API write until a subscribed device is notified, 10,000
objects in one ``POST`` against PouchDB's ``_bulk_docs`` of the same documents, and the
change feed's throughput read as Server-Sent Events. Every measurement goes through HTTP
on loopback to a real ``tidesync serve`` (and a real express-pouchdb) process."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tidesync.testing import ServerProcess

from .common import Device, peak_mib, percentile
from .harness import Context, Measurement
from .local import Bench, rows
from .pouchdb import PouchServer, install

GROUP = "api"
ADMIN_KEY = "benchmark-admin-key-0123456789"
BULK = 10_000
#: Objects per POST when filling the log for the feed benchmark (changesets of this size).
FEED_BATCH = 1_000


def _server(root: Path) -> ServerProcess:
    """A development-mode server that also takes an admin key."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "tidesync.toml"
    config.write_text(f'[server]\ndevelopment_mode = true\nadmin_keys = ["{ADMIN_KEY}"]\n')
    return ServerProcess(root / "data", extra_args=["--config", str(config)]).start(timeout=60)


def _schema(root: Path, url: str) -> None:
    """A device opens the app once: development mode learns the ``Bench`` model from it
    (the Data API writes only models the server knows)."""
    device = Device(root, "schema", url)
    try:
        device.open()
    finally:
        device.close()


def _docs(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": i, "owner": o, "title": t, "qty": q, "price": p, "done": d}
        for i, o, t, q, p, d in rows(start + n)[start:]
    ]


def _http(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{url}/api/v1/apps/bench",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=120,
    )


def _latency(ctx: Context, count: int, warmup: int) -> tuple[list[float], float]:
    """One object per ``POST``; the time until the device's change notification fires."""
    root = ctx.workdir / "api-latency"
    shutil.rmtree(root, ignore_errors=True)
    server = _server(root)
    device = Device(root, "b", server.url)
    arrived = threading.Event()
    seen = {"at": 0.0}
    try:
        db = device.open()
        results = db.all(Bench)

        def on_change(change: Any) -> None:
            if change.inserted:
                seen["at"] = time.perf_counter()
                arrived.set()

        token = results.add_listener(on_change)
        time.sleep(0.5)  # the initial notification
        lat: list[float] = []
        with _http(server.url) as http:
            for k, doc in enumerate(_docs(count + warmup)):
                arrived.clear()
                start = time.perf_counter()
                answer = http.post("/data/Bench", json=doc)
                if answer.status_code != 200:
                    raise RuntimeError(f"POST answered {answer.status_code}: {answer.text}")
                if not arrived.wait(30):
                    raise TimeoutError(f"object {doc['id']} did not reach the device in 30 s")
                if k >= warmup:
                    lat.append(seen["at"] - start)
        token.cancel()
        return lat, peak_mib(server)
    finally:
        device.close()
        server.kill()


def _bulk(ctx: Context) -> list[float]:
    """10,000 objects in one ``POST``, each run against a fresh server."""
    out: list[float] = []
    body = json.dumps(_docs(BULK)).encode()
    for r in range(ctx.repeats):
        root = ctx.workdir / f"api-bulk-{r}"
        shutil.rmtree(root, ignore_errors=True)
        server = _server(root)
        try:
            _schema(root, server.url)
            with _http(server.url) as http:
                http.post("/data/Bench", json=_docs(1, BULK)).raise_for_status()  # warm
                start = time.perf_counter()
                answer = http.post(
                    "/data/Bench", content=body, headers={"Content-Type": "application/json"}
                )
                out.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    raise RuntimeError(f"POST answered {answer.status_code}: {answer.text[:500]}")
                got = http.get("/data/Bench", params={"limit": 1, "query": f"id == {BULK - 1}"})
                if not got.json()["objects"]:
                    raise RuntimeError("the bulk POST's last object is not stored")
        finally:
            server.kill()
        ctx.log(f"  tidesync POST of {BULK:,}: {out[-1]:.3f} s")
    return out


def _pouch_bulk(ctx: Context) -> list[float]:
    """PouchDB's ``_bulk_docs`` of the same 10,000 documents over HTTP (express-pouchdb)."""
    modules = install(ctx)
    out: list[float] = []
    docs = [
        {"_id": str(d["id"]).zfill(8), **{k: v for k, v in d.items() if k != "id"}}
        for d in _docs(BULK)
    ]
    body = json.dumps({"docs": docs}).encode()
    for r in range(ctx.repeats):
        root = ctx.workdir / f"pouch-bulk-{r}"
        shutil.rmtree(root, ignore_errors=True)
        server = PouchServer(modules, root / "server")
        try:
            with httpx.Client(base_url=server.url, timeout=300) as http:
                http.put("/bulk").raise_for_status()
                start = time.perf_counter()
                answer = http.post(
                    "/bulk/_bulk_docs", content=body, headers={"Content-Type": "application/json"}
                )
                out.append(time.perf_counter() - start)
                answer.raise_for_status()
                if any("error" in row for row in answer.json()):
                    raise RuntimeError("PouchDB _bulk_docs refused documents")
        finally:
            server.close()
        ctx.log(f"  PouchDB _bulk_docs of {BULK:,}: {out[-1]:.3f} s")
    return out


def _feed(ctx: Context, n: int) -> list[float]:
    """Events per second read from the change feed as Server-Sent Events (``n`` objects
    written beforehand through the API, then the whole feed read from the start)."""
    root = ctx.workdir / "api-feed"
    shutil.rmtree(root, ignore_errors=True)
    server = _server(root)
    out: list[float] = []
    try:
        _schema(root, server.url)
        with _http(server.url) as http:
            for start in range(0, n, FEED_BATCH):
                batch = _docs(min(FEED_BATCH, n - start), start)
                http.post("/data/Bench", json=batch).raise_for_status()
            for _ in range(ctx.repeats):
                got = 0
                began = time.perf_counter()
                with http.stream(
                    "GET",
                    "/changes",
                    params={"since": "0"},
                    headers={"Accept": "text/event-stream"},
                ) as stream:
                    for line in stream.iter_lines():
                        if line.startswith("event: error"):
                            raise RuntimeError(f"the feed ended with an error: {line}")
                        if line.startswith("data: "):  # one event per SSE message
                            got += _event_count(line[6:])
                            if got >= n:
                                break
                out.append(got / (time.perf_counter() - began))
                ctx.log(f"  change feed: {got:,} events, {out[-1]:,.0f}/s")
    finally:
        server.kill()
    return out


def _event_count(data: str) -> int:
    """1 for an SSE ``data:`` line holding one change event (anything else is an error:
    changes.py frames one event per message)."""
    event = json.loads(data)
    if not isinstance(event, dict) or "version" not in event or "pk" not in event:
        raise RuntimeError(f"not a change event: {data[:200]}")
    return 1


def run(ctx: Context) -> None:
    """Record API latency, bulk POST against PouchDB, and feed throughput."""
    count = 200 if ctx.quick else 1000
    lat, mem = _latency(ctx, count, 50)
    for p in (50, 99):
        ctx.record(
            Measurement(
                GROUP,
                f"API write to device, p{p}",
                "s",
                [percentile(lat, p)],
                note=f"one object per POST, {count} writes; goal p50 <= 3 ms",
            )
        )
    ctx.log(
        f"  API latency p50 {percentile(lat, 50) * 1e3:.2f} ms, p99 "
        f"{percentile(lat, 99) * 1e3:.2f} ms, server {mem:.0f} MiB"
    )
    ctx.record(Measurement(GROUP, f"PouchDB _bulk_docs {BULK:,}", "s", _pouch_bulk(ctx)))
    ctx.record(
        Measurement(
            GROUP,
            f"API POST of {BULK:,}",
            "s",
            _bulk(ctx),
            reference=f"PouchDB _bulk_docs {BULK:,}",
            note="goal: at least 10x faster",
        )
    )
    n = 20_000 if ctx.quick else 100_000
    ctx.record(
        Measurement(
            GROUP,
            f"change feed over SSE, {n:,} events",
            "events/s",
            _feed(ctx, n),
            note="goal >= 50,000/s",
        )
    )
