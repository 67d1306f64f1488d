"""Client worker processes for the fan-out and scale benchmarks (driven over stdin/stdout).

``python -m benchmarks.worker fanout URL ROOT COUNT``: COUNT users, one synced database each
(subscribed to all Bench objects), all in one App (one sync thread, one WebSocket per
user). Prints ``ready``; then for each ``round`` line read, waits until every database was
notified of a new object and prints ``done T`` (T: ``time.perf_counter()`` when the last
one was notified; CLOCK_MONOTONIC, so comparable across processes).

``python -m benchmarks.worker listen URL ROOT``: one device (subscribed to all Bench objects).
Prints ``ready``, then ``seen T`` each time a notification shows new objects (T as above),
until stdin closes. B of the latency benchmark in a process of its own.

``python -m benchmarks.worker scale URL COUNT``: logs in COUNT anonymous users, prints
``ready``; on ``go`` opens one WebSocket per user and binds one session on each (the
protocol client only: no local database), prints ``connected T``, then keeps them idle
until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

import tidesync as ts
from tidesync.protocol import client as pc

from .common import TIMEOUTS, Bench

LIMIT = 60.0


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def fanout(url: str, root: Path, count: int) -> None:
    """The fan-out worker."""
    app = ts.App(ts.AppConfiguration("bench", base_url=url, base_path=root, sync_timeouts=TIMEOUTS))
    dbs: list[ts.Database] = []
    tokens: list[Any] = []
    lock = threading.Lock()
    state: dict[str, Any] = {"seen": set(), "last": 0.0}
    everyone = threading.Event()
    try:

        def initial(db: ts.Database) -> None:  # every device subscribes, as apps do
            with db.subscriptions.update() as subs:
                subs.add(db.all(Bench), name="all")

        for _ in range(count):
            user = asyncio.run(app.log_in(ts.Credentials.anonymous()))
            config = ts.Configuration.flexible_sync(user, [Bench], initial_subscriptions=initial)
            dbs.append(ts.Database(config))
        for db in dbs:
            token = ts.TimeoutCancellationToken(LIMIT)
            asyncio.run(db.subscriptions.wait_for_synchronization(token))

        def listener(k: int) -> Any:
            def on_change(change: Any) -> None:
                if not change.inserted:
                    return
                now = time.perf_counter()
                with lock:
                    state["seen"].add(k)
                    state["last"] = max(state["last"], now)
                    if len(state["seen"]) == count:
                        everyone.set()

            return on_change

        for k, db in enumerate(dbs):
            tokens.append(db.all(Bench).add_listener(listener(k)))
        time.sleep(1.0)  # initial notifications
        with lock:
            state["seen"] = set()
        _say("ready")
        for line in sys.stdin:
            if line.strip() != "round":
                break
            if not everyone.wait(LIMIT):
                _say(f"error only {len(state['seen'])} of {count} devices were notified")
                return
            with lock:
                last = state["last"]
                state["seen"] = set()
                state["last"] = 0.0
                everyone.clear()
            _say(f"done {last!r}")
    finally:
        for t in tokens:
            t.cancel()
        for db in dbs:
            db.close()
        app.close()


async def _one(url: str, app_id: str, token: str, schema: list[dict[str, Any]]) -> ClientConnection:
    ws = await connect(
        f"{url.replace('http://', 'ws://')}/api/v1/apps/{app_id}/sync",
        max_size=None,
        ping_interval=None,
        compression=None,
        open_timeout=LIMIT,
    )
    proto = pc.ClientProtocol()
    proto.start(token)
    for frame in proto.data_to_send():
        await ws.send(frame)
    bound = False
    welcomed = False
    while not bound:
        for ev in proto.receive_data(await asyncio.wait_for(ws.recv(decode=False), LIMIT)):
            if isinstance(ev, pc.ErrorReceived):
                raise RuntimeError(f"server error {ev.code}: {ev.message}")
            if isinstance(ev, pc.Welcomed) and not welcomed:
                welcomed = True
                proto.bind(1, uuid.uuid4().hex, schema, 0, 0)
            if isinstance(ev, pc.SessionBound):
                bound = True
        for frame in proto.data_to_send():
            await ws.send(frame)
    return ws


async def _scale(url: str, count: int) -> None:
    app_id = "bench"
    schema = [Bench.__schema__.to_dict()]
    tokens: list[str] = []
    async with httpx.AsyncClient(timeout=LIMIT) as http:
        sem = asyncio.Semaphore(20)

        async def login() -> str:
            async with sem:
                r = await http.post(f"{url}/api/v1/apps/{app_id}/auth/anonymous", json={})
                r.raise_for_status()
                return str(r.json()["access_token"])

        tokens = list(await asyncio.gather(*(login() for _ in range(count))))
    _say("ready")
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    sem = asyncio.Semaphore(50)

    async def one(token: str) -> ClientConnection:
        async with sem:
            return await _one(url, app_id, token, schema)

    conns = await asyncio.gather(*(one(t) for t in tokens))
    _say(f"connected {time.perf_counter()!r}")
    # idle until the parent closes stdin (the server keeps them alive; we answer nothing)
    await loop.run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def listen(url: str, root: Path) -> None:
    """The latency benchmark's B in a process of its own."""
    app = ts.App(ts.AppConfiguration("bench", base_url=url, base_path=root, sync_timeouts=TIMEOUTS))
    token: Any = None
    db: ts.Database | None = None
    try:

        def initial(db: ts.Database) -> None:
            with db.subscriptions.update() as subs:
                subs.add(db.all(Bench), name="all")

        user = asyncio.run(app.log_in(ts.Credentials.anonymous()))
        config = ts.Configuration.flexible_sync(user, [Bench], initial_subscriptions=initial)
        db = ts.Database(config)
        asyncio.run(db.subscriptions.wait_for_synchronization(ts.TimeoutCancellationToken(LIMIT)))
        ready = threading.Event()

        def on_change(change: Any) -> None:
            if change.inserted and ready.is_set():
                _say(f"seen {time.perf_counter()!r}")  # the time first, then the report

        token = db.all(Bench).add_listener(on_change)
        time.sleep(1.0)  # the initial notification
        ready.set()
        _say("ready")
        sys.stdin.read()  # until the driver closes stdin
    finally:
        if token is not None:
            token.cancel()
        if db is not None:
            db.close()
        app.close()


def main(argv: list[str]) -> int:
    """Dispatch on the mode."""
    if argv[0] == "fanout":
        fanout(argv[1], Path(argv[2]), int(argv[3]))
    elif argv[0] == "listen":
        listen(argv[1], Path(argv[2]))
    elif argv[0] == "scale":
        asyncio.run(_scale(argv[1], int(argv[2])))
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
