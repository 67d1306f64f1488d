"""Small hostile inputs against a real in-process server (issue 19, item 7): each gets a clear
4xx or a query error naming the limit, no traceback in the server's log, and the connection
or server keeps serving."""

from __future__ import annotations

import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tidesync.core.query import MAX_QUERY_NESTING
from tidesync.protocol import messages as m
from tidesync.server.runner import InProcessServer

from .security_helpers import Raw, login, note_schema

APP = "todo"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(tmp_path / "data") as srv:
        yield srv


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_json_body_nested_30000_deep_is_a_400(
    server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = b"[" * 30_000 + b"]" * 30_000
    path = f"/api/v1/apps/{APP}/auth/email/register"
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post(path, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert answer.json()["code"] == "bad_request"
        assert "nested too deeply" in answer.json()["error"]
        nested_object = b'{"a":' * 30_000 + b"1" + b"}" * 30_000
        answer = await http.post(path, content=nested_object)
        assert answer.status_code in (400, 413), answer.text
        fine = await http.post(path, json={"email": "ok@example.com", "password": "long enough"})
        assert fine.status_code == 201
    assert _tracebacks(caplog) == []


@pytest.mark.parametrize(
    "query",
    ["(" * 2000 + "n > 0" + ")" * 2000, "NOT " * 1000 + "n > 0", "!" * 1000 + "(n > 0)"],
    ids=["parentheses", "nots", "bangs"],
)
async def test_deeply_nested_subscription_query_is_a_query_error(
    server: InProcessServer, caplog: pytest.LogCaptureFixture, query: str
) -> None:
    tokens = await login(server, APP)
    raw = await Raw.open(server, APP)
    assert isinstance(await raw.hello(tokens["access_token"]), m.Welcome)
    await raw.send(m.Bind(1, "f1", [note_schema()], 0, 0))
    assert isinstance(await raw.until(m.Bound), m.Bound)
    await raw.send(m.Query(1, 1, {"Note": [query]}))
    error = await raw.until(m.QueryError)
    assert error is not None and error.query_version == 1
    assert f"more than {MAX_QUERY_NESTING} deep" in error.message
    # the connection and the session stay: a good query is served
    await raw.send(m.Query(1, 2, {"Note": ["(" * 50 + "n > 0" + ")" * 50]}))
    assert await raw.until(m.Download) is not None
    await raw.send(m.Ping(7))
    assert isinstance(await raw.until(m.Pong), m.Pong)
    await raw.close()
    assert _tracebacks(caplog) == []


async def test_server_database_is_owner_only(server: InProcessServer) -> None:
    data = server.data_dir
    path = data / "server.sqlite3"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for other in data.iterdir():
        if other.name.startswith(("server.sqlite3", "users.sqlite3", "secret.key")):
            assert stat.S_IMODE(other.stat().st_mode) & 0o077 == 0, other.name
