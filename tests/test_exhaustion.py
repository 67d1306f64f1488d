"""Exhaustion without logging in (issue 19, item 5), against a real ``tidesync serve``
process on loopback: slow-loris sockets, connections that send 16 MiB frames before HELLO,
idle sockets. Each attack comes from its own loopback address (127.0.0.3, 127.0.0.4, ...),
and a normal client on 127.0.0.1 logs in and syncs while it runs. Every loop is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

import tidesync as ts
from tidesync.server.gate import ConnectionGate
from tidesync.testing import ServerProcess

APP = "todo"
PER_ADDRESS = 40
T = ts.TimeoutCancellationToken


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "tidesync.toml"
    config.write_text(
        "[server]\ndevelopment_mode = true\nrequest_head_timeout = 1.0\nhello_timeout = 3.0\n"
        f"[limits]\nmax_connections_per_address = {PER_ADDRESS}\n"
    )
    proc = ServerProcess(tmp_path / "data", extra_args=["--config", str(config)])
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


def peak_rss_mb(server: ServerProcess) -> float:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def normal_client_syncs(url: str, root: Path, name: str) -> float:
    """Log in, open a synced file, write, wait for the upload; returns the seconds it took."""
    started = time.monotonic()
    app = ts.App(ts.AppConfiguration(APP, base_url=url, base_path=root / name))
    try:
        user = await app.log_in(ts.Credentials.anonymous())
        db = await ts.Database.open(
            ts.Configuration.flexible_sync(user, [Note], path=root / f"{name}.tidesync")
        )
        try:
            with db.write():
                db.add(Note(id=name, text="hello"))
            await db.sync_session.wait_for_upload(T(20))
        finally:
            db.close()
    finally:
        app.close()
    return time.monotonic() - started


async def slow_loris(port: int, source: str, count: int, seconds: float) -> tuple[int, int]:
    """``count`` sockets from ``source`` sending one byte of a request head every 0.5 s;
    returns (closed at once: refused at the door, closed later: the head deadline)."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    refused = timed_out = 0

    async def one() -> None:
        nonlocal refused, timed_out
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            refused += 1
            return
        opened = time.monotonic()
        try:
            for i in range(int(seconds / 0.5)):
                writer.write(head[i % len(head) : i % len(head) + 1])
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        break  # the server closed it
            else:
                return
            if time.monotonic() - opened < 0.3:
                refused += 1
            else:
                timed_out += 1
        except OSError:
            refused += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return refused, timed_out


async def test_slow_loris_from_one_address_does_not_stop_normal_clients(
    server: ServerProcess, tmp_path: Path
) -> None:
    attack = asyncio.create_task(slow_loris(server.port, "127.0.0.3", 300, 6.0))
    await asyncio.sleep(0.5)
    took = [await normal_client_syncs(server.url, tmp_path, f"n{i}") for i in range(3)]
    refused, timed_out = await attack
    assert max(took) < 10, took
    # at most PER_ADDRESS got in, each was closed by the head deadline; the rest at once
    assert refused >= 300 - PER_ADDRESS and timed_out <= PER_ADDRESS
    assert refused + timed_out == 300, (refused, timed_out)
    print(
        f"slow-loris: 300 sockets, {refused} refused at once, {timed_out} closed by the "
        f"head deadline; normal clients synced in {max(took):.2f} s at most"
    )


async def test_big_frames_before_hello_do_not_cost_memory(
    server: ServerProcess, tmp_path: Path
) -> None:
    before = peak_rss_mb(server)
    payload = b"\x00" * (16 * 1024 * 1024)
    url = f"ws://127.0.0.1:{server.port}/api/v1/apps/{APP}/sync"
    closes: list[int | None] = []

    async def one() -> None:
        ws = await connect(
            url, max_size=None, ping_interval=None, compression=None, local_addr=("127.0.0.4", 0)
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.send(payload), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.recv(), 10)
        closes.append(ws.close_code)
        await ws.close()

    attack = asyncio.gather(*(one() for _ in range(30)), return_exceptions=True)
    took = await normal_client_syncs(server.url, tmp_path, "during")
    await attack
    grew = peak_rss_mb(server) - before
    assert took < 10
    assert closes.count(1009) >= 25, closes  # refused by the frame header: message too big
    assert grew < 150, f"the server's peak memory grew by {grew:.0f} MB"
    print(
        f"30 x 16 MiB frames before HELLO: peak RSS +{grew:.0f} MB; client synced in {took:.2f} s"
    )


async def test_a_silent_socket_and_a_half_head_are_closed_by_the_deadline(
    server: ServerProcess,
) -> None:
    for greeting in (b"", b"GET /health HTTP/1.1\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(greeting)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert 0.8 < time.monotonic() - started < 5
        writer.close()


def test_open_files_limit_is_raised() -> None:
    """``tidesync serve`` lifts its soft open-files limit to the hard one (a process started
    with a soft limit of 512, as many systems have 1,024)."""
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))\n"
        "from tidesync.server.runner import raise_open_files_limit\n"
        "raise_open_files_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    soft, hard = done.stdout.split()
    assert soft == hard, done.stdout


def test_gate_counts_per_address_and_exempts_trusted_proxies() -> None:
    gate = ConnectionGate(2, trusted=("10.0.0.0/8",))
    a, b, c, d = object(), object(), object(), object()
    assert gate.admit(a, "192.0.2.1") and gate.admit(b, "192.0.2.1")
    assert not gate.admit(c, "192.0.2.1") and gate.refused == 1
    assert gate.admit(c, "192.0.2.2")
    gate.release(a)
    gate.release(a)  # idempotent
    assert gate.open_from("192.0.2.1") == 1 and gate.admit(d, "192.0.2.1")
    many = [object() for _ in range(10)]
    assert all(gate.admit(t, "10.1.2.3") for t in many)  # the load balancer is exempt
