"""``tidesync serve`` as a real process: the URL line, health, signals, restart on the data."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.test_server_sync import APP, RawClient, create_task
from tidesync.errors import SyncAction
from tidesync.protocol.client import DownloadReceived, ErrorReceived
from tidesync.protocol.messages import ErrorCode

URL_LINE = re.compile(r"^tidesync serving on (http://127\.0\.0\.1:(\d+))$")


@asynccontextmanager
async def serve(data: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Start ``tidesync serve --port 0``; yield the process and its URL; kill it if left."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidesync.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data",
        str(data),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().rstrip("\n")
        match = URL_LINE.match(line)
        assert match, f"unexpected first line {line!r}"
        assert int(match.group(2)) > 0
        yield proc, match.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def login(url: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post(f"/api/v1/apps/{APP}/auth/anonymous", json={})
    assert response.status_code == 200
    body: dict[str, str] = response.json()
    return body


async def test_serve_sigterm_and_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(data) as (proc, url):
        async with httpx.AsyncClient(base_url=url) as http:
            health = await http.get("/health")
        assert health.json() == {"status": "ok"}

        tokens = await login(url)
        client = await RawClient.connect("ws" + url[4:], tokens["access_token"])
        await client.welcome()
        await client.bind(1, "device-1")
        await client.upload(1, [(1, create_task("device-1", "t1", "survives"))])
        await client.wait_acked(1, 1)

        proc.send_signal(signal.SIGTERM)
        error = await client.expect(ErrorReceived, within=10)
        assert error.code == ErrorCode.GOING_AWAY and error.action is SyncAction.RETRY
        assert await client.closed_code() == 1001
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in await proc.stderr.read()

    async with serve(data) as (proc, url):
        async with httpx.AsyncClient(base_url=url) as http:  # the secret survived
            response = await http.post(
                f"/api/v1/apps/{APP}/auth/refresh",
                headers={"Authorization": f"Bearer {tokens['refresh_token']}"},
            )
        assert response.status_code == 200
        reader = await RawClient.connect("ws" + url[4:], response.json()["access_token"])
        await reader.welcome()
        await reader.bind(1, "device-2")
        got = await reader.expect(DownloadReceived, within=10)
        assert [(c.origin, c.client_version) for c in got.changesets] == [("device-1", 1)]
        await reader.close()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_cli_lists_serve() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidesync.cli",
        "--help",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert b"serve" in out
