"""Sync: push, pull (bootstrap), end to end and latency, each against a fresh
``tidesync serve`` process on loopback, with the server's peak memory."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

from .common import (
    Bench,
    Device,
    median,
    peak_mib,
    percentile,
    read_line,
    rows,
    start_server,
    stop_workers,
    worker_process,
    write_objects,
)
from .harness import Context, Measurement

GROUP = "sync"

#: Seconds any one phase may take before the benchmark fails (bounded runs).
LIMIT = 600.0


def _push_pull(
    ctx: Context, n: int, run: int, subscribe: bool = True
) -> tuple[float, float, float]:
    """One run: A writes n objects while paused; time to acknowledgement; then a fresh B
    pulls them all (subscribing to all of them, or in whole-app mode without
    subscriptions). Returns (push s, pull s, server peak MiB)."""
    root = ctx.workdir / f"pushpull-{run}-{'sub' if subscribe else 'all'}"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(root, "server")
    a = Device(root, "a", server.url)
    b = Device(root, "b", server.url)
    try:
        db = a.open(subscribe)
        a.wait_upload(60)  # connected and bound, nothing to upload yet
        db.sync_session.pause()
        # changesets are capped at 4 MiB by the server: 10,000 objects per transaction
        write_objects(db, rows(n), min(n, 10_000))
        start = time.perf_counter()
        db.sync_session.resume()
        a.wait_upload(LIMIT)
        push = time.perf_counter() - start
        b.log_in()
        start = time.perf_counter()
        b.open(subscribe)
        b.wait_count(n, LIMIT)
        pull = time.perf_counter() - start
        if a.errors or b.errors:
            raise RuntimeError(f"sync errors: {a.errors + b.errors}")
        return push, pull, peak_mib(server)
    finally:
        a.close()
        b.close()
        server.kill()


def _end_to_end(ctx: Context, n: int, run: int, per_tx: int = 100) -> tuple[float, float]:
    """A writes n objects in n/per_tx transactions while B is connected; until B holds all."""
    root = ctx.workdir / f"e2e-{run}"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(root, "server")
    a = Device(root, "a", server.url)
    b = Device(root, "b", server.url)
    try:
        a.open()
        b.open()
        a.wait_upload(60)
        b.wait_count(0, 60)
        assert a.db is not None
        start = time.perf_counter()
        write_objects(a.db, rows(n), per_tx)
        b.wait_count(n, LIMIT)
        took = time.perf_counter() - start
        if a.errors or b.errors:
            raise RuntimeError(f"sync errors: {a.errors + b.errors}")
        return took, peak_mib(server)
    finally:
        a.close()
        b.close()
        server.kill()


def _latency(ctx: Context, count: int, warmup: int) -> tuple[list[float], float]:
    """A writes one object at a time; the time until B's change notification fires."""
    root = ctx.workdir / "latency"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(root, "server")
    a = Device(root, "a", server.url)
    b = Device(root, "b", server.url)
    arrived = threading.Event()
    seen: dict[str, Any] = {"at": 0.0, "len": 0}
    try:
        adb, bdb = a.open(), b.open()
        a.wait_upload(60)
        b.wait_count(0, 60)
        results = bdb.all(Bench)

        def on_change(change: Any) -> None:
            if change.inserted:
                seen["at"] = time.perf_counter()
                arrived.set()

        token = results.add_listener(on_change)
        time.sleep(0.5)  # the initial notification
        data = rows(count + warmup)
        lat: list[float] = []
        for k, (i, owner, title, qty, price, done) in enumerate(data):
            arrived.clear()
            start = time.perf_counter()
            with adb.write():
                adb.add(Bench(id=i, owner=owner, title=title, qty=qty, price=price, done=done))
            if not arrived.wait(30):
                raise TimeoutError(f"object {i} did not reach B within 30 s")
            if k >= warmup:
                lat.append(seen["at"] - start)
            if k % 200 == 0:
                ctx.log(f"  latency: {k}/{len(data)}")
        token.cancel()
        return lat, peak_mib(server)
    finally:
        a.close()
        b.close()
        server.kill()


def _latency_apart(ctx: Context, count: int, warmup: int) -> list[float]:
    """As :func:`_latency`, with B in a process of its own (as devices are deployed: A, B
    and the server do not share an interpreter). B reports the ``time.perf_counter()`` of
    its notification (CLOCK_MONOTONIC: comparable across processes)."""
    root = ctx.workdir / "latency-apart"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(root, "server")
    a = Device(root, "a", server.url)
    b = worker_process("listen", server.url, str(root / "b"))
    try:
        adb = a.open()
        a.wait_upload(60)
        read_line(b, "ready", 120)
        lat: list[float] = []
        for k, (i, owner, title, qty, price, done) in enumerate(rows(count + warmup)):
            start = time.perf_counter()
            with adb.write():
                adb.add(Bench(id=i, owner=owner, title=title, qty=qty, price=price, done=done))
            seen = float(read_line(b, "seen", 30).split()[1])
            if k >= warmup:
                lat.append(seen - start)
            if k % 200 == 0:
                ctx.log(f"  latency, B apart: {k}/{count + warmup}")
        return lat
    finally:
        stop_workers([b])
        a.close()
        server.kill()


def _record_latency(ctx: Context, lat: list[float], tag: str, note: str) -> None:
    for p in (50, 95, 99):
        chunks = [lat[i::3] for i in range(3)]  # three interleaved sub-samples: min/max spread
        ctx.record(
            Measurement(
                GROUP,
                f"tidesync latency p{p}{tag}",
                "s",
                [percentile(c, p) for c in chunks],
                f"PouchDB latency p{p}",
                f"{len(lat)} writes, A write to B notified; {note}",
                extra={"all": percentile(lat, p)},
            )
        )
    ctx.log(f"  latency{tag} median {median(lat) * 1e3:.2f} ms")


def _transfers(ctx: Context, n: int) -> None:
    """Push and pull (subscribed and in whole-app mode), and end to end, at size ``n``."""
    ctx.log(f"{GROUP}: N = {n:,}")
    floor = f"floor: sqlite3 insert + websocket transfer {n:,}"
    for subscribe in (True, False):
        push: list[float] = []
        pull: list[float] = []
        mem: list[float] = []
        for r in range(ctx.repeats):
            p, q, m = _push_pull(ctx, n, r, subscribe)
            mode = "subscribed" if subscribe else "whole-app mode"
            ctx.log(f"  {mode}: push {p:.3f} s, pull {q:.3f} s, server peak {m:.1f} MiB")
            push.append(p)
            pull.append(q)
            mem.append(m)
        # the headline figures: devices subscribe, as a flexible-sync app does
        tag = "" if subscribe else ", whole-app mode"
        how = "subscribed to all" if subscribe else "no subscription: syncs everything"
        pouch_push, pouch_pull = f"PouchDB push {n:,}", f"PouchDB pull {n:,}"
        ctx.record(
            Measurement(GROUP, f"tidesync push {n:,}{tag}", "s", push, floor, f"{how}; acked")
        )
        ctx.record(
            Measurement(GROUP, f"tidesync push {n:,}{tag} vs PouchDB", "s", push, pouch_push)
        )
        ctx.record(Measurement(GROUP, f"tidesync pull {n:,}{tag}", "s", pull, floor, how))
        ctx.record(
            Measurement(GROUP, f"tidesync pull {n:,}{tag} vs PouchDB", "s", pull, pouch_pull)
        )
        ctx.record(Measurement(GROUP, f"server peak RSS, push + pull {n:,}{tag}", "MiB", mem))
    e2e: list[float] = []
    mem = []
    for r in range(ctx.repeats):
        t, m = _end_to_end(ctx, n, r)
        ctx.log(f"  end to end {t:.3f} s, server peak {m:.1f} MiB")
        e2e.append(t)
        mem.append(m)
    ctx.record(
        Measurement(
            GROUP, f"tidesync end to end {n:,}", "s", e2e, None, f"{n // 100:,} transactions"
        )
    )
    ctx.record(Measurement(GROUP, f"server peak RSS, end to end {n:,}", "MiB", mem))


def run(ctx: Context) -> None:
    """Record the sync benchmarks."""
    for n in ctx.sizes:
        _transfers(ctx, n)
    count = 200 if ctx.quick else 1000
    lat, m = _latency(ctx, count, 50)
    _record_latency(ctx, lat, "", "A and B in one process (as PouchDB's A and B)")
    apart = _latency_apart(ctx, count, 50)
    _record_latency(ctx, apart, ", B apart", "B in a process of its own")
    ctx.record(Measurement(GROUP, "server peak RSS, latency", "MiB", [m]))
