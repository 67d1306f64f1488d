"""An order backend for tidesync: a small Starlette service that receives a webhook for
each new ``Order`` a device writes, and writes the order's status back through the Data
API; the status then syncs to that device like any other change
(docs/backend.md, "Worked example: an order backend").

Run it next to a ``tidesync serve`` whose configuration declares the ``Order`` model and
a webhook pointing here (``[[apps.shop.webhooks]] url = "http://127.0.0.1:8000/hooks/orders"``)::

    python examples/order_backend.py --server http://127.0.0.1:8765 --app shop \\
        --admin-key "$ADMIN_KEY" --secret "$WEBHOOK_SECRET" --port 8000

or under uvicorn, configured by the environment (``ORDER_BACKEND_SERVER``,
``ORDER_BACKEND_APP``, ``ORDER_BACKEND_ADMIN_KEY``, ``ORDER_BACKEND_SECRET``)::

    uvicorn --factory --app-dir examples order_backend:from_environment --port 8000

What it does with each delivery, in order:

1. checks the signature over the raw body (401 when it is missing, wrong or too old);
2. skips a delivery id it has seen (the webhook is at-least-once: a batch whose answer was
   lost comes again under the same ``Tidesync-Delivery``);
3. queues the primary key of every ``Order`` the batch creates and answers 200 at once,
   so the server never waits for the work (nor times out and sends the batch again);
4. a worker task takes the queue one order at a time: reads the order, and if it is still
   ``"new"`` writes ``status``, ``total`` and ``note`` with one ``AsyncAdminClient.update``.

Step 4 is idempotent: an order that is no longer ``"new"`` is left alone, so an order that
comes twice (a duplicate the id check missed, a restart) is written once. Orders queued but
not written when the service stops are still ``"new"`` in the database: at start, the worker
first sweeps every ``"new"`` order, so nothing acknowledged is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tidesync.admin import AdminAPIError, AsyncAdminClient

log = logging.getLogger("order_backend")

MODEL = "Order"
#: Orders above this quantity are rejected (the "business rule" of the example).
MAX_QUANTITY = 100


@dataclass(frozen=True)
class Settings:
    """Where the tidesync server is and the secrets shared with it."""

    server: str  # the sync server's base URL, e.g. http://127.0.0.1:8765
    app_id: str
    admin_key: str  # one of the server's [server] admin_keys
    secret: str  # the webhook's secret
    tolerance: float = 300.0  # seconds a signature's timestamp may be off (replays)
    remembered: int = 10_000  # delivery ids kept for spotting duplicates


def verified(secret: str, headers: Mapping[str, str], body: bytes, tolerance: float) -> bool:
    """True when ``body`` carries a valid, recent ``Tidesync-Signature``."""
    timestamp = headers.get("tidesync-timestamp", "")
    signature = headers.get("tidesync-signature", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + mac.hexdigest(), signature)


def decide(order: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the backend writes back on a new order."""
    quantity = int(order["quantity"])
    if not 1 <= quantity <= MAX_QUANTITY:
        return {"status": "rejected", "note": f"quantity must be 1 to {MAX_QUANTITY}"}
    total = (Decimal(order["unit_price"]) * quantity).quantize(Decimal("0.01"))
    return {"status": "accepted", "total": total, "note": f"{quantity} x {order['item']}"}


@dataclass
class Stats:
    """What the service did since it started (``GET /health``)."""

    deliveries: int = 0
    duplicates: int = 0
    refused: int = 0
    written: int = 0
    skipped: int = 0  # orders that were no longer "new"
    failed: int = 0


@dataclass
class OrderBackend:
    """The service's state: the admin client, the delivery ids seen and the work queue."""

    settings: Settings
    admin: AsyncAdminClient
    stats: Stats = field(default_factory=Stats)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None

    async def webhook(self, request: Request) -> JSONResponse:
        """``POST /hooks/orders``: verify, drop duplicates, queue the new orders."""
        body = await request.body()
        if not verified(self.settings.secret, request.headers, body, self.settings.tolerance):
            self.stats.refused += 1
            return JSONResponse({"error": "bad or missing signature"}, status_code=401)
        delivery = request.headers.get("tidesync-delivery", "")
        if delivery in self.seen:
            self.stats.duplicates += 1
            return JSONResponse({"duplicate": True})
        try:
            events = json.loads(body)["events"]
            new = [e["pk"] for e in events if e["model"] == MODEL and e["op"] == "create"]
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"not a tidesync delivery: {exc}"}, status_code=400)
        self.seen[delivery] = None
        while len(self.seen) > self.settings.remembered:
            self.seen.popitem(last=False)
        self.stats.deliveries += 1
        for pk in new:
            self.queue.put_nowait(pk)
        return JSONResponse({"queued": len(new)})

    async def health(self, request: Request) -> JSONResponse:
        """``GET /health``: the counters and the queue's length."""
        return JSONResponse({**self.stats.__dict__, "queued": self.queue.qsize()})

    async def process(self, pk: str) -> None:
        """Write the status of one order, unless it is no longer new."""
        order = await self.admin.get(MODEL, pk)
        if order is None or order["status"] != "new":
            self.stats.skipped += 1
            return
        changes = decide(order)
        try:
            await self.admin.update(MODEL, pk, changes)
        except AdminAPIError as exc:
            if exc.code != "not_found":
                raise
            self.stats.skipped += 1  # erased since we read it
            return
        self.stats.written += 1
        log.info("order %s: %s", pk, changes["status"])

    async def work(self) -> None:
        """The worker: the orders left "new" by an earlier run, then the queue."""
        with contextlib.suppress(AdminAPIError):  # unreachable: the webhooks still come
            async for order in self.admin.query(MODEL, "status == 'new'"):
                self.queue.put_nowait(order["id"])
        while True:
            await self.attempt(await self.queue.get())

    async def attempt(self, pk: str) -> None:
        """:meth:`process`, retried a few times while the server does not answer."""
        for attempt in range(3):
            try:
                await self.process(pk)
                return
            except AdminAPIError as exc:
                log.warning("order %s: %s (attempt %d)", pk, exc, attempt + 1)
                if exc.status not in (0, 503):
                    break  # refused: retrying would not help
                await asyncio.sleep(0.2 * 2**attempt)
            except (KeyError, TypeError, ValueError, ArithmeticError):
                log.exception("order %s cannot be processed", pk)
                break
        self.stats.failed += 1  # still "new": the next start's sweep tries again

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start the worker with the server; stop it and close the client at shutdown."""
        self.worker = asyncio.create_task(self.work())
        try:
            yield
        finally:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
            await self.admin.close()
            log.info("order backend stopped: %s", self.stats)


def create_app(settings: Settings) -> Starlette:
    """The Starlette application (``app.state.backend`` is its :class:`OrderBackend`)."""
    admin = AsyncAdminClient(settings.server, settings.app_id, api_key=settings.admin_key)
    backend = OrderBackend(settings, admin)
    routes = [
        Route("/hooks/orders", backend.webhook, methods=["POST"]),
        Route("/health", backend.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=backend.lifespan)
    app.state.backend = backend
    return app


def from_environment() -> Starlette:
    """The application configured by ``ORDER_BACKEND_*`` variables (``uvicorn --factory``)."""
    env = os.environ
    return create_app(
        Settings(
            server=env["ORDER_BACKEND_SERVER"],
            app_id=env["ORDER_BACKEND_APP"],
            admin_key=env["ORDER_BACKEND_ADMIN_KEY"],
            secret=env["ORDER_BACKEND_SECRET"],
        )
    )


def main(argv: list[str] | None = None) -> None:
    """``python examples/order_backend.py --server URL --app APP ...``; ``--port 0`` picks a
    free port (the line ``order backend listening on URL`` says which)."""
    parser = argparse.ArgumentParser(description="An order backend for tidesync.")
    parser.add_argument("--server", required=True, help="the tidesync server's URL")
    parser.add_argument("--app", required=True, help="the app id")
    parser.add_argument("--admin-key", required=True, help="an admin key of the server")
    parser.add_argument("--secret", required=True, help="the webhook's secret")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per call
    settings = Settings(args.server, args.app, args.admin_key, args.secret)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    print(f"order backend listening on http://{host}:{port}/hooks/orders", flush=True)
    config = uvicorn.Config(create_app(settings), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
