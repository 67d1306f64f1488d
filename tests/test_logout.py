"""Logging out ends that login at once (issue 19, item 4): its refresh and access tokens are
refused for HELLO, REFRESH and every HTTP call, and its live sync connections are closed,
on every server process; the user's other logins keep working. Expired tokens are purged
on a schedule (item 7). Real servers: an in-process server on SQLite, and two ``tidesync
serve`` processes sharing PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tidesync.protocol import messages as m
from tidesync.protocol.codec import decode_frame, encode_frame
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer
from tidesync.testing import ServerProcess

from .security_helpers import note_schema

APP = "todo"
PASSWORD = "correct horse battery"


class Conn:
    """One raw sync WebSocket (no client logic), to any server URL."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, base_url: str) -> Conn:
        url = base_url.replace("http://", "ws://") + f"/api/v1/apps/{APP}/sync"
        return cls(await connect(url, max_size=None, ping_interval=None, compression=None))

    async def send(self, msg: Any) -> None:
        await self.ws.send(encode_frame(msg))

    async def recv(self, limit: float = 10.0) -> Any:
        try:
            frame = await asyncio.wait_for(self.ws.recv(decode=False), limit)
        except Exception:
            return None
        return decode_frame(frame, max_frame_size=1 << 30)

    async def until(self, kind: type, limit: float = 10.0) -> Any:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            msg = await self.recv(max(0.01, deadline - time.monotonic()))
            if msg is None or isinstance(msg, kind):
                return msg
        return None

    async def hello(self, token: str) -> Any:
        await self.send(m.Hello([2], token, False))
        return await self.recv()

    async def bound(self, token: str, ident: str) -> Conn:
        assert isinstance(await self.hello(token), m.Welcome)
        await self.send(m.Bind(1, ident, [note_schema()], 0, 0))
        assert isinstance(await self.until(m.Bound), m.Bound)
        return self

    async def pings(self) -> bool:
        await self.send(m.Ping(5))
        return isinstance(await self.until(m.Pong, 5), m.Pong)

    async def close(self) -> None:
        await self.ws.close()


async def two_logins(url: str) -> tuple[dict[str, str], dict[str, str]]:
    """One email user logged in twice (two logins, two token families)."""
    email = f"u{uuid.uuid4().hex[:8]}@example.com"
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        reg = await http.post(
            f"/api/v1/apps/{APP}/auth/email/register", json={"email": email, "password": PASSWORD}
        )
        assert reg.status_code == 201, reg.text
        logins = []
        for _ in range(2):
            answer = await http.post(
                f"/api/v1/apps/{APP}/auth/email/login", json={"email": email, "password": PASSWORD}
            )
            assert answer.status_code == 200, answer.text
            logins.append(answer.json())
    assert logins[0]["user_id"] == logins[1]["user_id"]
    return logins[0], logins[1]


async def call(url: str, method: str, path: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return await http.request(
            method, f"/api/v1/apps/{APP}/auth/{path}", headers={"Authorization": f"Bearer {token}"}
        )


async def check_logout(log_out_at: str, check_at: str) -> None:
    """Log out login one through ``log_out_at``; check everything through ``check_at``."""
    one, two = await two_logins(log_out_at)
    live_one = await (await Conn.open(check_at)).bound(one["access_token"], "file-one")
    live_two = await (await Conn.open(check_at)).bound(two["access_token"], "file-two")
    assert (await call(check_at, "GET", "me", one["access_token"])).status_code == 200

    out = await call(log_out_at, "POST", "logout", one["refresh_token"])
    assert out.status_code == 204, out.text

    # the live connection of that login is closed with an auth error, at once
    error = await live_one.until(m.Error, 10)
    assert isinstance(error, m.Error), error
    assert error.code == m.ErrorCode.BAD_TOKEN and "logged out" in error.message
    # a new HELLO with its access token is refused
    again = await Conn.open(check_at)
    refused = await again.hello(one["access_token"])
    assert isinstance(refused, m.Error) and refused.code == m.ErrorCode.BAD_TOKEN
    assert "logged out" in refused.message
    await again.close()
    # HTTP with its access token and refresh with its refresh token are refused
    me = await call(check_at, "GET", "me", one["access_token"])
    assert me.status_code == 401 and "logged out" in me.json()["error"]
    refresh = await call(check_at, "POST", "refresh", one["refresh_token"])
    assert refresh.status_code == 401
    # the user's other login is untouched
    assert await live_two.pings()
    assert (await call(check_at, "GET", "me", two["access_token"])).status_code == 200
    rotated = await call(check_at, "POST", "refresh", two["refresh_token"])
    assert rotated.status_code == 200
    fresh = await Conn.open(check_at)
    await fresh.bound(rotated.json()["access_token"], "file-three")
    await fresh.close()
    await live_two.close()
    await live_one.close()


# -- one process, SQLite ----------------------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(tmp_path / "data") as srv:
        yield srv


async def test_logout_ends_the_login_at_once(server: InProcessServer) -> None:
    await check_logout(server.url, server.url)


async def test_refresh_over_a_live_connection_with_a_logged_out_token_is_refused(
    server: InProcessServer,
) -> None:
    one, two = await two_logins(server.url)
    live = await (await Conn.open(server.url)).bound(two["access_token"], "f")
    assert (await call(server.url, "POST", "logout", one["refresh_token"])).status_code == 204
    await live.send(m.Refresh(one["access_token"]))  # another login's, now ended
    error = await live.until(m.Error)
    assert isinstance(error, m.Error) and "logged out" in error.message
    await live.close()


async def test_expired_tokens_are_purged_on_a_schedule(tmp_path: Path) -> None:
    config = ServerConfig(refresh_token_ttl=0.5, token_purge_interval=0.2)
    async with InProcessServer(tmp_path / "data", config=config) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            for _ in range(3):
                answer = await http.post(f"/api/v1/apps/{APP}/auth/anonymous", json={})
                assert answer.status_code == 200

        def stored() -> int:
            with sqlite3.connect(tmp_path / "data" / "users.sqlite3") as db:
                return int(db.execute("SELECT count(*) FROM refresh_tokens").fetchone()[0])

        assert stored() == 3
        for _ in range(100):  # at most 10 s
            if not stored():
                break
            await asyncio.sleep(0.1)
        assert stored() == 0


# -- two processes, PostgreSQL ----------------------------------------------------------------


@pytest.fixture
def pg_pair(tmp_path: Path, pg_url: str) -> Iterator[list[ServerProcess]]:
    """Two server processes on one PostgreSQL schema, each with its own data folder."""
    made = [
        ServerProcess(tmp_path / f"data-{name}", extra_args=["--storage", pg_url])
        for name in ("a", "b")
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(p.start) for p in made]:
                started.result()
        yield made
    finally:
        for proc in made:
            proc.kill()


async def test_logout_through_one_process_ends_the_login_on_the_other(
    pg_pair: list[ServerProcess],
) -> None:
    a, b = pg_pair
    await check_logout(a.url, b.url)
