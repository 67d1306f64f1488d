"""Every configurable limit, hit over loopback against a real in-process server: a clear
error for the offender, nothing stored, other connections untouched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

import tidesync as ts
from tidesync.errors import TooManyAttemptsError
from tidesync.protocol import messages as m
from tidesync.server.config import ServerConfig
from tidesync.server.limits import Limits, RateLimiter
from tidesync.server.runner import InProcessServer

from .security_helpers import Raw, login, note_schema, state_digest, valid_changeset

APP = "todo"
LIMITS = Limits(
    max_changeset_bytes=2000,
    max_sessions_per_connection=2,
    max_connections_per_user=2,
    max_query_length=100,
    login_attempts_per_account=3,
    login_attempts_per_address=8,
    max_request_body_bytes=4096,
)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    config = ServerConfig(limits=LIMITS, max_frame_size=64 * 1024)
    async with InProcessServer(tmp_path / "data", config=config) as srv:
        yield srv


async def bound(server: InProcessServer, token: str, session: int = 1, ident: str = "f1") -> Raw:
    raw = await Raw.open(server, APP)
    assert isinstance(await raw.hello(token), m.Welcome)
    await raw.send(m.Bind(session, ident, [note_schema()], 0, 0))
    assert isinstance(await raw.until(m.Bound), m.Bound)
    return raw


async def test_frame_size(server: InProcessServer) -> None:
    tokens = await login(server, APP)
    raw = await bound(server, tokens["access_token"])
    before = await state_digest(server, [APP])
    await raw.send_bytes(b"\x00" * (64 * 1024 + 10))
    error = await raw.until(m.Error)
    assert error.code == m.ErrorCode.FRAME_TOO_LARGE and "limit" in error.message
    assert await raw.recv() is None and raw.close_code == 1009
    assert await state_digest(server, [APP]) == before


async def test_changeset_size(server: InProcessServer) -> None:
    tokens = await login(server, APP)
    raw = await bound(server, tokens["access_token"])
    big = valid_changeset("f1", "big", "x" * 3000)
    await raw.send(m.Upload(1, [big], 0))
    error = await raw.until(m.Error)
    assert error.code == m.ErrorCode.BAD_CHANGESET and "limit exceeded" in error.message
    assert await server.storage.get_objects(APP, "Note") == {}
    # a session-level error: the connection stays usable for other sessions
    await raw.send(m.Bind(2, "f2", [note_schema()], 0, 0))
    assert isinstance(await raw.until(m.Bound), m.Bound)
    await raw.send(m.Upload(2, [valid_changeset("f2", "small", "ok")], 0))
    for _ in range(50):
        if await server.storage.get_objects(APP, "Note"):
            break
        await asyncio.sleep(0.1)
    assert set(await server.storage.get_objects(APP, "Note")) == {"small"}
    await raw.close()


async def test_sessions_per_connection(server: InProcessServer) -> None:
    tokens = await login(server, APP)
    raw = await bound(server, tokens["access_token"], 1, "f1")
    await raw.send(m.Bind(2, "f2", [note_schema()], 0, 0))
    assert isinstance(await raw.until(m.Bound), m.Bound)
    await raw.send(m.Bind(3, "f3", [note_schema()], 0, 0))
    error = await raw.until(m.Error)
    assert error.session == 3 and "at most 2 sessions per connection" in error.message
    await raw.close()


async def test_connections_per_user(server: InProcessServer) -> None:
    tokens = await login(server, APP)
    first = await bound(server, tokens["access_token"], 1, "a")
    second = await bound(server, tokens["access_token"], 1, "b")
    third = await Raw.open(server, APP)
    error = await third.hello(tokens["access_token"])
    assert isinstance(error, m.Error) and error.code == m.ErrorCode.LIMITS_EXCEEDED
    assert "at most 2 sync connections per user" in error.message
    assert await third.recv() is None
    # another user is not affected, and the first two still work
    other = await login(server, APP)
    await (await bound(server, other["access_token"], 1, "c")).close()
    await first.send(m.Ping(1))
    assert isinstance(await first.until(m.Pong), m.Pong)
    await first.close()
    await second.close()


async def test_subscription_query_length(server: InProcessServer) -> None:
    tokens = await login(server, APP)
    raw = await bound(server, tokens["access_token"])
    await raw.send(m.Query(1, 1, {"Note": ["text == 'x' OR " * 20 + "n > 0"]}))
    error = await raw.until(m.QueryError)
    assert error.query_version == 1 and "limit exceeded" in error.message
    await raw.send(m.Query(1, 2, {"Note": ["n > 0"]}))
    download = await raw.until(m.Download)
    assert download is not None
    await raw.close()


async def test_login_attempts_per_account_and_per_address(
    server: InProcessServer, tmp_path: Path
) -> None:
    app = ts.App(ts.AppConfiguration(APP, base_url=server.url, base_path=tmp_path / "c"))
    await app.email_password_auth.register_user("v@example.com", "right password")
    for _ in range(3):
        with pytest.raises(ts.AuthError) as info:
            await app.log_in(ts.Credentials.email_password("v@example.com", "wrong"))
        assert not isinstance(info.value, TooManyAttemptsError)
    with pytest.raises(TooManyAttemptsError, match="too many attempts for this account"):
        await app.log_in(ts.Credentials.email_password("v@example.com", "right password"))
    # other accounts still get in from this address until the address limit
    await app.email_password_auth.register_user("w@example.com", "right password")
    await app.log_in(ts.Credentials.email_password("w@example.com", "right password"))
    refused: TooManyAttemptsError | None = None
    for i in range(10):  # 8 per minute per address, registrations included
        try:
            await app.log_in(ts.Credentials.email_password(f"n{i}@example.com", "whatever"))
        except TooManyAttemptsError as exc:
            refused = exc
            break
        except ts.AuthError:
            pass
    assert refused is not None and "from this address" in str(refused)
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post(
            f"/api/v1/apps/{APP}/auth/email/login", json={"email": "x@y.z", "password": "p"}
        )
    assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
    assert answer.json()["code"] == "too_many_attempts"
    app.close()


def test_rate_limiter_window_and_memory_bound() -> None:
    now = [0.0]
    limiter = RateLimiter(2, window=60, max_keys=3, clock=lambda: now[0])
    assert limiter.hit("a") and limiter.hit("a") and not limiter.hit("a")
    assert 59 < limiter.retry_after("a") <= 60
    now[0] = 61
    assert limiter.hit("a")
    for key in "bcde":
        limiter.hit(key)
    assert len(limiter._hits) == 3


async def test_request_body_size(server: InProcessServer) -> None:
    path = f"/api/v1/apps/{APP}/auth/email/register"
    async with httpx.AsyncClient(base_url=server.url) as http:
        declared = await http.post(path, content=b"{" + b" " * 5000 + b"}")
        assert declared.status_code == 413 and "4096 bytes" in declared.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        streamed = await http.post(path, content=chunks())
        assert streamed.status_code == 413
        fine = await http.post(path, json={"email": "ok@example.com", "password": "long enough"})
        assert fine.status_code == 201
