"""Several ``tidesync serve`` processes on one PostgreSQL database.

Real server processes (sharing a data folder for the token secret and users, and one
PostgreSQL schema for the sync data), real client databases, real WebSockets. Skipped unless
``TIDESYNC_TEST_PG_DSN`` names a PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tidesync as ts
from tidesync.protocol.client import DownloadReceived
from tidesync.testing import ServerProcess

from .test_server_sync import RawClient, create_task
from .test_sync_e2e import Device, Item, settle, snapshot

asyncpg = pytest.importorskip("asyncpg")

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
pytestmark = pytest.mark.skipif(not DSN, reason="TIDESYNC_TEST_PG_DSN is not set")
T = ts.TimeoutCancellationToken


class RoundRobinProxy:
    """A tiny TCP proxy on 127.0.0.1: each new connection goes to the next backend that
    accepts (a stand-in for the load balancer in front of several server processes)."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.port = 0
        self.opened: list[int] = []  # backend port of every connection, in order
        self.active: dict[int, int] = {}  # connection number -> backend port
        self._next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RoundRobinProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            for _ in range(len(self.backends)):
                port = self.backends[self._next % len(self.backends)]
                self._next += 1
                try:
                    up_r, up_w = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), 2
                    )
                except (OSError, TimeoutError):
                    continue
                number = len(self.opened)
                self.opened.append(port)
                self.active[number] = port
                try:
                    await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
                finally:
                    self.active.pop(number, None)
                    up_w.close()
                return
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


@pytest.fixture
def servers(tmp_path: Path, pg_url: str) -> Iterator[list[ServerProcess]]:
    """Two server processes on one database (one data folder for secret and users)."""
    made = [ServerProcess(tmp_path / "server", extra_args=["--storage", pg_url]) for _ in range(2)]
    try:
        for proc in made:  # one at a time: the first creates the secret
            proc.start()
        yield made
    finally:
        for proc in made:
            proc.kill()


async def _until(check: Any, limit: float = 20.0) -> float:
    """Poll ``check()`` until true; returns the seconds it took."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > limit:
            raise AssertionError(f"condition not met within {limit} s")
        await asyncio.sleep(0.005)
    return time.perf_counter() - start


@pytest.fixture
async def devices(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str, url: str) -> Device:
        d = Device(tmp_path, name, url, [Item])
        await d.open()
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


async def test_writes_through_two_processes_converge(
    servers: list[ServerProcess], devices: Any
) -> None:
    one, two = servers
    a, b = await devices("a", one.url), await devices("b", two.url)
    await settle(a, b)
    # a change through one process reaches a device of the other within moments
    latencies = []
    for i in range(5):
        with a.db.write():
            a.db.add(Item(id=f"ping{i}", n=i))
        latencies.append(await _until(lambda i=i: b.db.find(Item, f"ping{i}") is not None))
    assert sorted(latencies)[2] < 1.0, latencies  # median: the NOTIFY, not the 1 s poll

    async def write(d: Device, tag: str) -> None:
        for i in range(30):
            with d.db.write():
                d.db.add(Item(id=f"{tag}{i}", text=tag, n=i))
                shared = d.db.find(Item, "shared")
                if shared is None:
                    d.db.add(Item(id="shared", text=tag))
                else:
                    shared.hits.increment(1)
                    shared.tags.append(f"{tag}{i}")
            await asyncio.sleep(0.005)

    await asyncio.gather(write(a, "a"), write(b, "b"))
    await settle(a, b, limit=30)
    await settle(a, b, limit=30)
    sa, sb = snapshot(a.db), snapshot(b.db)
    assert sa == sb and len(sa) == 5 + 60 + 1
    assert not a.errors and not b.errors
    async with httpx.AsyncClient(timeout=5) as http:
        metrics = (await http.get(f"{one.url}/metrics")).text
        ready = (await http.get(f"{two.url}/ready")).status_code
    assert "tidesync_remote_wakeups_total" in metrics
    assert int(_sample(metrics, "tidesync_remote_wakeups_total")) >= 1
    assert int(_sample(metrics, "tidesync_uploads_total")) >= 5
    assert ready == 200


def _sample(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return line.split()[1]
    raise AssertionError(f"{name} not in the metrics")


async def test_kill_9_and_drain_move_devices_to_the_other_process(
    servers: list[ServerProcess], devices: Any
) -> None:
    one, two = servers
    async with RoundRobinProxy([one.port, two.port]) as proxy:
        a = await devices("a", proxy.url)
        watcher = await devices("w", two.url)
        acked: list[str] = []

        async def write_batch(tag: str, n: int) -> None:
            for i in range(n):
                with a.db.write():
                    a.db.add(Item(id=f"{tag}{i}", n=i))
                if i % 5 == 4:
                    await a.db.sync_session.wait_for_upload(T(30))
                    acked.extend(f"{tag}{j}" for j in range(i - 4, i + 1))

        await write_batch("before", 20)
        # kill -9 the process holding a's sync connection (the newest one through the proxy)
        newest = max(proxy.active)
        victim = one if proxy.active[newest] == one.port else two
        survivor = two if victim is one else one
        opened_before = len(proxy.opened)
        victim.kill()
        await write_batch("after-kill", 20)  # reconnects through the proxy to the survivor
        assert proxy.opened[opened_before:] and set(proxy.opened[opened_before:]) == {survivor.port}
        # bring the victim back, then drain the survivor with SIGTERM: a moves again
        victim.start()
        opened_before = len(proxy.opened)
        assert survivor.stop() == 0
        await write_batch("after-drain", 20)
        assert victim.port in proxy.opened[opened_before:]
        # only transient, retried errors: connection lost (100) and going away (115)
        assert all(str(e).startswith(("[100]", "[115]")) for e in a.errors), a.errors
        survivor.start()
        await settle(a, watcher, limit=40)
        have = snapshot(watcher.db)
        assert [k for k in acked if k not in have] == []  # no acknowledged write was lost
        assert len(acked) == 60 and snapshot(a.db) == have


async def _login(url: str, app_id: str = "todo") -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.post(f"/api/v1/apps/{app_id}/auth/anonymous", json={})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def test_every_device_sees_every_version_once_in_order(
    servers: list[ServerProcess],
) -> None:
    writers_per_process, changesets = 5, 12
    clients: list[tuple[RawClient, str]] = []
    try:
        for p, proc in enumerate(servers):
            ws_url = "ws" + proc.url[len("http") :]
            for i in range(writers_per_process + 1):  # the last one only reads
                token = await _login(proc.url)
                client = await RawClient.connect(ws_url, token)
                await client.welcome()
                ident = f"p{p}-{'reader' if i == writers_per_process else f'w{i}'}"
                await client.bind(1, ident)
                clients.append((client, ident))
        total = 2 * writers_per_process * changesets
        seen: dict[str, list[tuple[int, str]]] = {ident: [] for _, ident in clients}

        async def run(client: RawClient, ident: str) -> None:
            if "reader" not in ident:
                for v in range(1, changesets + 1):
                    await client.upload(1, [(v, create_task(ident, f"{ident}-{v}", "x"))])
                    await asyncio.sleep(0)
            deadline = time.monotonic() + 60
            while client.proto.progress(1).download_cursor < total:
                left = deadline - time.monotonic()
                assert left > 0, f"{ident} stuck at {client.proto.progress(1).download_cursor}"
                event = await client.expect(DownloadReceived, left)
                seen[ident] += [(cs.server_version, cs.origin) for cs in event.changesets]

        await asyncio.gather(*(run(c, ident) for c, ident in clients))
        for _, ident in clients:
            if "reader" in ident:
                assert [v for v, _ in seen[ident]] == list(range(1, total + 1)), ident
        origin_of = dict(seen["p0-reader"])
        assert origin_of == dict(seen["p1-reader"])
        for _, ident in clients:
            expected = [v for v in range(1, total + 1) if origin_of[v] != ident]
            assert [v for v, _ in seen[ident]] == expected, ident
    finally:
        for client, _ in clients:
            await client.ws.close()
