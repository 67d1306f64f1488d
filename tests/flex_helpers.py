"""A flexible-sync device for integration tests that records what its DOWNLOADs carried."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tidesync as ts

FAST = ts.SyncTimeoutOptions(
    connect_timeout=5,
    reconnect_initial_delay=0.1,
    reconnect_max_delay=0.5,
    ping_keep_alive_period=2,
    pong_keep_alive_timeout=4,
    connection_linger_time=1,
)
T = ts.TimeoutCancellationToken


class FlexDevice:
    """An app, a user and a synced database; ``objects`` lists every whole object its
    DOWNLOADs carried as ``(model, pk, evicted)``, ``pages`` their bootstrap flags."""

    def __init__(self, root: Path, name: str, url: str, app_id: str, models: list[Any]) -> None:
        self.app = ts.App(
            ts.AppConfiguration(app_id, base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.models = models
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None
        self.objects: list[tuple[str, Any, bool]] = []
        self.pages: list[int] = []

    async def open(self, queries: dict[str, tuple[Any, str]]) -> ts.Database:
        """Open the database and subscribe: ``{name: (Model, query)}`` (none: keep the set
        the file has)."""
        user = self.app.current_user or await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, self.models, sync_error_handler=lambda s, e: self.errors.append(e)
        )
        db = self.db = ts.Database(config)
        worker = db.sync_session._worker
        original = worker.on_download

        def record(ev: Any) -> None:
            self.objects += [(o.model, o.pk, o.state is None) for o in ev.objects]
            if ev.bootstrap:
                self.pages.append(ev.bootstrap)
            original(ev)

        worker.on_download = record  # type: ignore[method-assign]
        if queries:
            with db.subscriptions.update() as subs:
                for name, (model, query) in queries.items():
                    subs.add(db.query(model, query), name=name, update=True)
        await db.subscriptions.wait_for_synchronization(T(20))
        return db

    async def settle(self) -> None:
        """Until everything is uploaded and downloaded."""
        assert self.db is not None
        await self.db.sync_session.wait_for_upload(T(20))
        await self.db.sync_session.wait_for_download(T(20))

    def read(self, model: Any, row: Callable[[Any], Any]) -> dict[Any, Any]:
        """``{pk: row(obj)}`` of every object of ``model`` (retried when the sync thread
        drops an object while it is being read)."""
        assert self.db is not None
        for _ in range(50):
            try:
                return {obj._pk: row(obj) for obj in self.db.all(model)}
            except ts.ObjectDeletedError:
                continue
        raise AssertionError("the objects kept changing while being read")

    def shutdown(self) -> None:
        """Close the database and the app."""
        if self.db is not None:
            self.db.close()
        self.app.close()


async def eventually(check: Callable[[], bool], limit: float = 20) -> None:
    """Poll ``check`` until it holds (AssertionError after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
