"""Helpers for the change feed and webhook tests: a real HTTP webhook receiver on its own
thread, a device that writes ``Task`` objects, SSE reading, and polling with a deadline."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

import tidesync as ts

from .flex_helpers import FAST
from .test_flexsync_e2e import Task

ADMIN_KEY = "feed-admin-key-0123456789"
SECRET = "webhook-secret-0123456789"
T = ts.TimeoutCancellationToken


class Writer:
    """An app, an anonymous user and a flexible-sync database that writes ``Task``."""

    def __init__(self, root: Path, name: str, url: str, app_id: str = "todo") -> None:
        self.app = ts.App(
            ts.AppConfiguration(app_id, base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.user: ts.User | None = None
        self.db: ts.Database | None = None

    async def open(self) -> ts.Database:
        if self.user is None:
            self.user = await self.app.log_in(ts.Credentials.anonymous())
        self.db = ts.Database(ts.Configuration.flexible_sync(self.user, [Task]))
        return self.db

    @property
    def token(self) -> str:
        assert self.user is not None
        return self.user.access_token

    async def settle(self) -> None:
        assert self.db is not None
        await self.db.sync_session.wait_for_upload(T(20))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self.app.close()


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


async def eventually_async(
    check: Callable[[], Awaitable[bool]], limit: float = 20.0, step: float = 0.05
) -> None:
    """Wait until ``await check()`` holds (AssertionError after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {limit} s")


async def read_all(
    client: httpx.AsyncClient, url: str, since: str = "0", headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Every event of the feed after ``since`` (pages until one is empty)."""
    events: list[dict[str, Any]] = []
    for _ in range(1000):
        answer = await client.get(url, params={"since": since}, headers=headers or admin())
        assert answer.status_code == 200, answer.text
        body = answer.json()
        events += body["events"]
        if not body["events"] and body["next"] == since:
            return events, since
        since = body["next"]
    raise AssertionError("the feed did not end")


class SSEReader:
    """Reads Server-Sent Events from an open streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()
        self.last_id: str | None = None

    async def next_event(self, limit: float = 10.0) -> dict[str, Any]:
        """The next event with data (``id:`` lines update :attr:`last_id`)."""
        data: list[str] = []
        async with asyncio.timeout(limit):
            async for line in self.lines:
                if line.startswith("id:"):
                    self.last_id = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    return dict(json.loads("\n".join(data)))
        raise AssertionError("the stream ended")


class Receiver:
    """A webhook receiver on 127.0.0.1 (a real HTTP server on its own thread).

    ``mode`` decides each answer: "ok" (200), "fail" (500), "slow" (answers 200 after
    ``slow_seconds``, past the hook's timeout). Every request is kept in ``requests`` as
    ``(delivery id, parsed body, headers, raw body, status answered)``."""

    def __init__(self, port: int = 0) -> None:
        self.mode = "ok"
        self.slow_seconds = 1.0
        self.requests: list[tuple[str, dict[str, Any], dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()
        self.active = 0  # requests being handled right now
        self.max_active = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                with outer.lock:
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                    mode = outer.mode
                try:
                    if mode == "slow":
                        time.sleep(outer.slow_seconds)
                    status = 500 if mode == "fail" else 200
                    with outer.lock:
                        outer.requests.append(
                            (
                                self.headers.get("Tidesync-Delivery", ""),
                                json.loads(raw),
                                dict(self.headers.items()),
                                raw,
                                status,
                            )
                        )
                    try:
                        self.send_response(status)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    except OSError:
                        pass  # the sender gave up (timeout)
                finally:
                    with outer.lock:
                        outer.active -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def accepted(self) -> list[tuple[str, dict[str, Any]]]:
        """``(delivery id, body)`` of each request answered 200, in arrival order."""
        with self.lock:
            return [(d, b) for d, b, _, _, s in self.requests if s == 200]

    def all(self) -> list[tuple[str, dict[str, Any], dict[str, str], bytes, int]]:
        with self.lock:
            return list(self.requests)


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's signature check, as docs/backend.md shows it."""
    timestamp = headers["Tidesync-Timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + expected.hexdigest(), headers["Tidesync-Signature"])


def delivered_events(receiver: Receiver) -> list[dict[str, Any]]:
    """The events of every accepted delivery, each delivery id once (the at-least-once
    duplicates dropped: a duplicate must carry the same id and the same events)."""
    seen: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    for delivery, body in receiver.accepted():
        if delivery in seen:
            assert seen[delivery] == body["events"], "a retry carried other events"
            continue
        seen[delivery] = body["events"]
        out += body["events"]
    return out


def webhook_toml(url: str, **extra: Any) -> str:
    """One ``[[apps.todo.webhooks]]`` table for ``url`` (short timeouts for tests)."""
    options = {
        "url": url,
        "models": ["Task"],
        "secret": SECRET,
        "timeout": 0.5,
        "retry_initial": 0.05,
        "retry_max": 0.2,
        "max_failures": 1000,
        "start": "beginning",
        **extra,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    return f"[[apps.todo.webhooks]]\n{body}\n"
