"""``tidesync status``, ``sessions`` and ``users list|show|disable|enable|delete`` as real
processes against a real server with a real device: ``--json`` parsed, tables shown,
disabling ends the device's connection, every mistake one ``error:`` line with exit
status 2 (1 for a server that cannot be reached); the user list on PostgreSQL too."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.server.settings import load_config
from tidesync.testing import TestServer

from .api_helpers import ADMIN_KEY, Device, write_config
from .test_cli import one_error_line


def tidesync(
    url: str, *args: str, key: str = ADMIN_KEY, app: str = "todo"
) -> subprocess.CompletedProcess[str]:
    """``tidesync ARGS`` with the server, app and key in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDESYNC_")}
    env.update(TIDESYNC_SERVER=url, TIDESYNC_APP=app, TIDESYNC_ADMIN_KEY=key)
    cmd = [sys.executable, "-m", "tidesync.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


async def run(url: str, *args: str, **kw: str) -> subprocess.CompletedProcess[str]:
    """:func:`tidesync` off the event loop (the device keeps syncing meanwhile)."""
    return await asyncio.to_thread(tidesync, url, *args, **kw)


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ok_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TestServer]:
    srv = TestServer(tmp_path / "server", config=load_config(write_config(tmp_path)))
    await asyncio.to_thread(srv.start)
    try:
        yield srv
    finally:
        await asyncio.to_thread(srv.stop)


async def _live_sessions(url: str, user: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        answer = await http.get(
            "/api/v1/admin/sessions",
            params={"user": user},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    assert answer.status_code == 200, answer.text
    return [r for r in answer.json()["sessions"] if r["live"]]


async def test_every_command_against_a_device(server: TestServer, tmp_path: Path) -> None:
    url = server.url
    device = Device(tmp_path, "phone", url)
    await device.open()
    try:
        me = device.user_id
        # status: this process, the declared apps, the device's session
        view = ok_json(await run(url, "status", "--json"))
        assert view["mode"] in ("development", "production") and view["version"]
        assert view["storage"] == "SQLiteStorage" and view["uptime_seconds"] >= 0
        assert view["connections"] >= 1 and view["sessions"] >= 1
        apps = {a["app_id"]: a for a in view["apps"]}
        assert set(apps) >= {"todo", "other"} and apps["todo"]["sessions"] == 1
        table = await run(url, "status")
        assert table.returncode == 0 and "SQLiteStorage" in table.stdout

        # sessions: the device's row, filtered by user and app
        rows = ok_lines(await run(url, "sessions", "--json", "--user", me[:8]))
        assert [r["state"] for r in rows if r["live"]] == ["active"]
        assert rows[0]["user_id"] == me and rows[0]["file_ident"]
        assert rows[0]["subscriptions"] and rows[0]["download_cursor"] >= 0
        assert ok_lines(await run(url, "sessions", "--json", app="other")) == []
        shown = await run(url, "sessions", "--live")
        assert shown.returncode == 0 and me[:8] in shown.stdout and "1 session(s)" in shown.stdout

        # users: list, search, show
        listed = ok_lines(await run(url, "users", "list", "--json"))
        mine = [u for u in listed if u["user_id"] == me]
        assert len(mine) == 1 and mine[0]["devices"] == 1 and mine[0]["provider"] == "anonymous"
        assert mine[0]["disabled"] is False and mine[0]["last_login"] >= mine[0]["created_at"]
        assert [u["user_id"] for u in ok_lines(await run(url, "users", "list", me, "--json"))] == [
            me
        ]
        assert ok_lines(await run(url, "users", "list", "zz-nobody", "--json")) == []
        assert me[:8] in (await run(url, "users", "list")).stdout
        one = ok_json(await run(url, "users", "show", me, "--json"))
        assert one["user_id"] == me and one["devices"] == 1 and one["connections"] == 1
        assert one["api_keys"] == []
        assert "last login" in (await run(url, "users", "show", me)).stdout

        # a user's own token is no admin key
        line = one_error_line(await run(url, "users", "list", key=device.token))
        assert "needs an admin key" in line
        assert "admin key" in one_error_line(await run(url, "status", key=device.token))

        # disable: the device's connection ends; enable: the user may log in again
        started = time.monotonic()
        done = ok_json(await run(url, "users", "disable", me, "--json"))
        assert done == {"app_id": "todo", "user_id": me, "done": "disabled"}
        deadline = time.monotonic() + 15
        while await _live_sessions(url, me):
            assert time.monotonic() < deadline, "the disabled user's session stayed live"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started < 15
        assert ok_json(await run(url, "users", "show", me, "--json"))["disabled"] is True
        enabled = await run(url, "users", "enable", me)
        assert enabled.returncode == 0 and "enabled user" in enabled.stdout
        assert ok_json(await run(url, "users", "show", me, "--json"))["disabled"] is False

        # delete asks for --yes when not on a terminal
        assert "--yes" in one_error_line(await run(url, "users", "delete", me))
        gone = ok_json(await run(url, "users", "delete", me, "--yes", "--json"))
        assert gone["done"] == "deleted"
        assert "no user" in one_error_line(await run(url, "users", "show", me))
    finally:
        device.shutdown()


async def test_mistakes_are_one_line(server: TestServer) -> None:
    url, wrong = server.url, "wrong-key-0123456789abcdef"
    cases: list[tuple[str, list[str], dict[str, str], int, tuple[str, ...]]] = [
        *(
            (url, args, {"key": wrong}, 2, ("not an admin key", "access refused"))
            for args in (["status"], ["sessions"], ["users", "list"], ["users", "show", "x"])
        ),
        (url, ["users", "disable", "nobody"], {}, 2, ("no such user",)),
        (url, ["users", "enable", "nobody"], {}, 2, ("no such user",)),
        (url, ["users", "delete", "nobody", "--yes"], {}, 2, ("no such user",)),
        (url, ["users", "show", "nobody"], {}, 2, ("no user",)),
        (url, ["users", "list"], {"app": "nope"}, 2, ("'nope'",)),
        (url, ["users", "list", "--limit", "0"], {}, 2, ("--limit",)),
        (url, ["users", "list", "--limit", "501"], {}, 2, ("--limit",)),
        (url, ["status", "--bogus"], {}, 2, ("--bogus",)),
        ("ftp://x", ["status"], {}, 2, ("--server",)),
        (url, ["users", "list"], {"app": ""}, 2, ("--app",)),
        ("", ["sessions"], {}, 2, ("--server",)),
        ("http://127.0.0.1:9", ["status"], {}, 1, ("could not be reached",)),
    ]
    gate = asyncio.Semaphore(4)  # a few processes at a time

    async def check(case: tuple[str, list[str], dict[str, str], int, tuple[str, ...]]) -> None:
        where, args, kw, status, needles = case
        async with gate:
            line = one_error_line(await run(where, *args, **kw), status=status)
        assert any(n in line for n in needles), (args, line)

    await asyncio.gather(*(check(c) for c in cases))


async def test_users_list_pages_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    config = dataclasses.replace(load_config(write_config(tmp_path)), storage_url=pg_url)
    srv = TestServer(tmp_path / "server", config=config)
    await asyncio.to_thread(srv.start)
    try:
        made = []
        async with httpx.AsyncClient(base_url=srv.url, timeout=20) as http:
            for _ in range(5):
                answer = await http.post("/api/v1/apps/todo/auth/anonymous")
                assert answer.status_code in (200, 201), answer.text
                made.append(answer.json()["user_id"])
        first = await run(srv.url, "users", "list", "--limit", "3", "--json")
        page = ok_lines(first)
        assert len(page) == 3 and f"more: --after {page[-1]['user_id']}" in first.stderr
        rest = ok_lines(
            await run(srv.url, "users", "list", "--after", page[-1]["user_id"], "--json")
        )
        assert [u["user_id"] for u in page + rest] == sorted(made)
        status = ok_json(await run(srv.url, "status", "--json"))
        assert status["storage"] == "PostgresStorage"
    finally:
        await asyncio.to_thread(srv.stop)
