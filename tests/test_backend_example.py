"""The worked example of docs/backend.md (``examples/order_backend.py``) against a real
``tidesync serve``: a device writes a new ``Order``, the server's webhook reaches the
example (a real uvicorn server on loopback), and the status the example writes back through
``AsyncAdminClient.update`` arrives on that device; duplicates are skipped, and the example
run from its command line refuses forged, stale and missing signatures."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from examples.order_backend import Settings, create_app

import tidesync as ts
from tidesync.testing import ServerProcess

from .flex_helpers import FAST, T, eventually

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "order_backend.py"
CONFIG = ROOT / "examples" / "order_backend.toml"
ADMIN_KEY = "order-backend-admin-key-change-me"
SECRET = "order-webhook-secret-change-me"


def config_for(hook_url: str) -> str:
    """The example's configuration (docs/backend.md shows it) with the backend's URL and
    short webhook timeouts for a test."""
    text = CONFIG.read_text()
    changes = {
        "http://127.0.0.1:8000/hooks/orders": hook_url,
        "timeout = 5\n": "timeout = 2\n",
        "retry_initial = 1\n": "retry_initial = 0.05\n",
        "retry_max = 60\n": "retry_max = 0.5\n",
    }
    for old, new in changes.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    assert f'admin_keys = ["{ADMIN_KEY}"]' in text and f'secret = "{SECRET}"' in text
    return text


class Order(ts.Model):
    """The device's model of the configuration's ``Order``."""

    id: str = ts.primary_key()
    owner_id: str = ""
    item: str = ""
    quantity: int = 0
    unit_price: Decimal = Decimal(0)
    status: str = "new"
    total: Decimal | None = None
    note: str = ""


class Backend:
    """The example's Starlette app under a real uvicorn server on its own thread, on a
    socket bound before the sync server starts (its URL goes into the configuration)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def start(self, sync_url: str) -> None:
        app = create_app(Settings(sync_url, "shop", ADMIN_KEY, SECRET))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the example did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
            assert not self.thread.is_alive()
        self.sock.close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.stop()


def signed(body: bytes, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    """The headers the sync server sends with ``body``."""
    timestamp = str(int(time.time() if at is None else at))
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return {
        "Content-Type": "application/json",
        "Tidesync-Timestamp": timestamp,
        "Tidesync-Signature": "sha256=" + mac.hexdigest(),
    }


def delivery(delivery_id: str, *pks: str) -> bytes:
    events = [
        {"version": 1, "model": "Order", "pk": pk, "op": "create", "fields": {}} for pk in pks
    ]
    return json.dumps({"hook": 0, "delivery": delivery_id, "events": events}).encode()


async def get_json(http: httpx.AsyncClient, path: str) -> dict[str, Any]:
    return dict((await http.get(path)).json())


async def until(
    fetch: Callable[[], Awaitable[dict[str, Any]]], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """``await fetch()`` until ``done`` holds for it (at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        value = await fetch()
        if done(value):
            return value
        assert time.monotonic() < deadline, value
        await asyncio.sleep(0.05)


async def test_a_new_order_on_a_device_gets_its_status_back(
    tmp_path: Path, backend: Backend
) -> None:
    config = tmp_path / "tidesync.toml"
    config.write_text(config_for(f"{backend.url}/hooks/orders"))
    with ServerProcess(tmp_path / "server", extra_args=["--config", str(config)]) as server:
        backend.start(server.url)
        app = ts.App(
            ts.AppConfiguration(
                "shop", base_url=server.url, base_path=tmp_path / "device", sync_timeouts=FAST
            )
        )
        db: ts.Database | None = None
        try:
            user = await app.log_in(ts.Credentials.anonymous())
            db = ts.Database(ts.Configuration.flexible_sync(user, [Order]))
            with db.subscriptions.update() as subs:
                subs.add(db.query(Order, "owner_id == $0", user.id), name="mine")
            await db.subscriptions.wait_for_synchronization(T(20))
            with db.write():
                db.add(
                    Order(
                        id="o-1",
                        owner_id=user.id,
                        item="tea",
                        quantity=3,
                        unit_price=Decimal("4.20"),
                    )
                )
                db.add(
                    Order(
                        id="o-2",
                        owner_id=user.id,
                        item="tea",
                        quantity=500,
                        unit_price=Decimal("4.20"),
                    )
                )

            def status(pk: str) -> str | None:
                assert db is not None
                order = db.find(Order, pk)
                return None if order is None else order.status

            began = time.monotonic()
            await eventually(lambda: status("o-1") == "accepted" and status("o-2") == "rejected")
            took = time.monotonic() - began
            accepted = db.find(Order, "o-1")
            assert accepted is not None
            assert accepted.total == Decimal("12.60") and accepted.note == "3 x tea"
            rejected = db.find(Order, "o-2")
            assert rejected is not None and rejected.total is None
            assert rejected.note == "quantity must be 1 to 100"
            assert took < 10, took

            async with httpx.AsyncClient(base_url=backend.url, timeout=10) as http:
                # The backend's own writes (status no longer "new") are hidden by the hook's
                # query: once the hook's cursor is past them, the device's one changeset is
                # still the only delivery the backend got.
                key = {"Authorization": f"Bearer {ADMIN_KEY}"}
                api = f"{server.url}/api/v1/apps/shop"
                latest = (await http.get(f"{api}/changes?since=now", headers=key)).json()["next"]

                async def hook() -> dict[str, Any]:
                    answer = await http.get(f"{api}/webhooks", headers=key)
                    return dict(answer.json()["webhooks"][0])

                await until(hook, lambda h: h["cursor"] == latest)
                status_now = await hook()
                assert status_now["state"] == "active" and status_now["failures"] == 0
                health = (await http.get("/health")).json()
                assert status_now["delivered"] == health["deliveries"] == 1
                assert health["written"] == 2 and health["refused"] == 0

                # A batch that comes again (at-least-once) is skipped by its id; an order
                # that is no longer new is not written again.
                body = delivery("again-1", "o-1")
                first = await http.post("/hooks/orders", content=body, headers=signed(body))
                assert first.status_code == 200 and first.json() == {"queued": 1}
                again = await http.post("/hooks/orders", content=body, headers=signed(body))
                assert again.status_code == 200 and again.json() == {"duplicate": True}
                health = await until(lambda: get_json(http, "/health"), lambda h: h["skipped"] >= 1)
                assert health["skipped"] == 1 and health["duplicates"] == 1
                assert health["written"] == 2
        finally:
            if db is not None:
                db.close()
            app.close()


def test_the_command_line_service_refuses_bad_signatures(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(EXAMPLE),
        "--server", "http://127.0.0.1:9",  # nothing there: only the webhook route is used
        "--app", "shop",
        "--admin-key", ADMIN_KEY,
        "--secret", SECRET,
        "--port", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("order backend listening on "), line
        url = line.split(" on ", 1)[1].strip()
        base = url.removesuffix("/hooks/orders")
        body = delivery("d-1", "o-1")
        forged = {
            "no signature": {"Content-Type": "application/json"},
            "another secret": signed(body, secret="not-the-webhook-secret-0123"),
            "too old": signed(body, at=time.time() - 3600),
            "garbage": {**signed(body), "Tidesync-Timestamp": "soon"},
        }
        with httpx.Client(timeout=10) as http:
            for why, headers in forged.items():
                answer = http.post(url, content=body, headers=headers)
                assert answer.status_code == 401, why
            tampered = delivery("d-1", "o-1", "o-2")
            assert http.post(url, content=tampered, headers=signed(body)).status_code == 401
            not_json = b"{oops"
            assert http.post(url, content=not_json, headers=signed(not_json)).status_code == 400
            health = http.get(f"{base}/health").json()
            assert health["refused"] == 5 and health["deliveries"] == 0
            assert health["queued"] == 0
    finally:
        proc.terminate()  # uvicorn stops gracefully, then re-raises SIGTERM
        output, _ = proc.communicate(timeout=15)
        assert proc.returncode in (0, -signal.SIGTERM), output
    assert "order backend stopped" in output, output
