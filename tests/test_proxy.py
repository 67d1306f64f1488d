"""FaultProxy: a plain TCP echo server behind it, then a real tidesync server and client."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import tidesync as ts
from tidesync.testing import FaultProxy, ServerProcess, TestServer

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def proxy(echo_port: int) -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", echo_port, seed=7)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def _connect(p: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port)


async def _roundtrip(p: FaultProxy, payload: bytes = b"hello", limit: float = 5) -> bytes:
    reader, writer = await _connect(p)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), limit)
    finally:
        writer.close()


async def test_passes_bytes_through(proxy: FaultProxy) -> None:
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    big = bytes(range(256)) * 4000
    assert await _roundtrip(proxy, big) == big
    assert proxy.stats.connections == 1
    assert proxy.stats.bytes_upstream == len(big) == proxy.stats.bytes_downstream


async def test_cut_closes_and_refuses_until_restore(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    proxy.cut()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    writer.close()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await _roundtrip(proxy)
    assert proxy.stats.refused >= 1 and proxy.stats.cuts == 1
    proxy.restore()
    assert await _roundtrip(proxy) == b"hello"


async def test_stall_holds_bytes_then_releases(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    proxy.stall()
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.5)
    assert proxy.open_connections == 1  # the sockets stay open
    proxy.restore()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
    writer.close()


async def test_stall_one_direction(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    proxy.stall("downstream")
    writer.write(b"abc")
    await writer.drain()
    for _ in range(50):  # the request reaches the server...
        if proxy.stats.bytes_upstream == 3:
            break
        await asyncio.sleep(0.05)
    assert proxy.stats.bytes_upstream == 3
    with pytest.raises(TimeoutError):  # ...but the answer does not come back
        await asyncio.wait_for(reader.readexactly(3), 0.5)
    proxy.restore()
    assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"
    writer.close()
    with pytest.raises(ValueError):
        proxy.stall("sideways")  # type: ignore[arg-type]


async def test_delay_and_throttle(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    started = time.monotonic()
    assert await _roundtrip(proxy) == b"hello"
    assert time.monotonic() - started >= 0.55  # held once each way
    proxy.delay(0)
    proxy.throttle(200_000)
    payload = b"z" * 100_000
    started = time.monotonic()
    assert await _roundtrip(proxy, payload, limit=30) == payload
    assert time.monotonic() - started >= 0.5
    proxy.restore()


async def test_drop_is_seeded(echo_port: int) -> None:
    async def run(seed: int) -> list[bool]:
        async with FaultProxy("127.0.0.1", echo_port, seed=seed) as p:
            p.drop(0.5)
            outcomes = []
            for _ in range(12):
                try:
                    outcomes.append(await _roundtrip(p, limit=2) == b"hello")
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    outcomes.append(False)
            return outcomes

    first = await run(3)
    assert first == await run(3)
    assert True in first and False in first


async def test_random_faults_happen_and_stop(proxy: FaultProxy) -> None:
    proxy.random_faults(rate=20, seed=1, max_duration=0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = proxy.stats
        if stats.cuts + stats.stalls + stats.disconnects >= 3:
            break
        await asyncio.sleep(0.05)
    assert proxy.stats.cuts + proxy.stats.stalls + proxy.stats.disconnects >= 3
    proxy.restore()
    assert await _roundtrip(proxy) == b"hello"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        FaultProxy("10.0.0.1", 80)
    with pytest.raises(ValueError):
        FaultProxy("127.0.0.1", 0)
    p = FaultProxy("127.0.0.1", 9)
    with pytest.raises(ValueError):
        p.drop(2)
    with pytest.raises(ValueError):
        p.throttle(0)
    with pytest.raises(RuntimeError):
        _ = p.url


@pytest.fixture
def thread_echo() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    listener.settimeout(10)

    import threading

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield port
    finally:
        listener.close()
        t.join(15)


def test_start_in_thread_for_sync_code(thread_echo: int) -> None:
    with FaultProxy("127.0.0.1", thread_echo) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            p.cut()  # from another thread: takes effect before it returns
            s.settimeout(5)
            assert s.recv(4) in (b"",)
        assert p.stats.cuts == 1


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


async def test_real_client_through_proxy(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    try:
        async with FaultProxy("127.0.0.1", server.port, seed=1) as proxy:
            app = ts.App(
                ts.AppConfiguration(
                    "notes", base_url=proxy.url, base_path=tmp_path / "a", sync_timeouts=FAST
                )
            )
            try:
                user = await app.log_in(ts.Credentials.anonymous())
                db = ts.Database(ts.Configuration.flexible_sync(user, [Note]))
                try:
                    session = db.sync_session
                    with db.write():
                        db.add(Note(id="1", text="before"))
                    await session.wait_for_upload(T(20))
                    proxy.cut()
                    with db.write():
                        db.add(Note(id="2", text="while cut"))
                    with pytest.raises(ts.TidesyncError):
                        await session.wait_for_upload(T(1.5))
                    proxy.restore()
                    await session.wait_for_upload(T(20))
                    proxy.stall()
                    with db.write():
                        db.add(Note(id="3", text="while stalled"))
                    await asyncio.sleep(0.5)
                    proxy.restore()
                    await session.wait_for_upload(T(20))
                    assert proxy.stats.connections >= 2
                finally:
                    db.close()
            finally:
                app.close()
    finally:
        server.kill()


def test_in_process_server_fixture(tmp_path: Path) -> None:
    with TestServer(tmp_path / "srv", faults=True, seed=2) as server:
        assert server.url == server.proxy.url != server.server_url

        async def body() -> None:
            app = ts.App(
                ts.AppConfiguration(
                    "notes", base_url=server.url, base_path=tmp_path / "a", sync_timeouts=FAST
                )
            )
            try:
                user = await app.log_in(ts.Credentials.anonymous())
                with ts.Database(ts.Configuration.flexible_sync(user, [Note])) as db:
                    server.proxy.cut()
                    with db.write():
                        db.add(Note(id="1", text="offline"))
                    server.proxy.restore()
                    await db.sync_session.wait_for_upload(T(20))
            finally:
                app.close()

        asyncio.run(body())
    with pytest.raises(RuntimeError):
        _ = TestServer(tmp_path / "srv2").proxy
