"""Shared pieces of the Data API tests: the configuration, HTTP helpers and a device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

import tidesync as ts

from .flex_helpers import FAST

ADMIN_KEY = "admin-key-for-the-data-api-tests-0123456789"
#: Task: what devices sync (owner-only writes, shared objects readable by all);
#: Thing: every field type, no rules (no role: only admins reach it).
CONFIG = f"""
[server]
admin_keys = ["{ADMIN_KEY}"]

[limits]
max_api_body_bytes = 200000

[apps.todo]
auth = ["anonymous"]
auto_confirm = true

[apps.todo.rules.Task]
read = "owner_id == $user.id OR shared == true"
write = "owner_id == $user.id"

[apps.todo.schema.Task]
primary_key = "id"
fields = {{ id = "str", owner_id = "str", summary = "str", n = "int", shared = "bool" }}

[apps.todo.schema.Thing]
primary_key = "id"
[apps.todo.schema.Thing.fields]
id = "int"
flag = "bool"
big = "int"
ratio = "float"
name = "str | None"
blob = "bytes"
at = "datetime"
price = "decimal"
uid = "uuid"
oid = "objectid"
hits = "counter"
tags = "list[str]"
labels = "set[str]"
scores = "dict[str, float]"
task = "Task | None"

[apps.other]
auth = ["anonymous"]
auto_confirm = true
"""


def write_config(folder: Path) -> Path:
    """The tests' configuration file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tidesync.toml"
    path.write_text(CONFIG)
    return path


def admin(url: str) -> httpx.AsyncClient:
    """An HTTP client with the admin key."""
    return httpx.AsyncClient(
        base_url=url, timeout=20, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )


def as_user(url: str, token: str) -> httpx.AsyncClient:
    """An HTTP client with a user's access token."""
    return httpx.AsyncClient(base_url=url, timeout=20, headers={"Authorization": f"Bearer {token}"})


class Task(ts.Model):
    id: str = ts.primary_key()
    owner_id: str = ""
    summary: str = ""
    n: int = 0
    shared: bool = False


class Device:
    """A device: an app, an anonymous user and a flexible-sync database of ``Task``."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration("todo", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.user: ts.User | None = None
        self.db: ts.Database | None = None

    async def open(self, query: str = "TRUEPREDICATE") -> ts.Database:
        """Log in, open the database and subscribe to ``query``."""
        if self.user is None:
            self.user = await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(self.user, [Task])
        self.db = ts.Database(config)
        with self.db.subscriptions.update() as subs:
            subs.add(self.db.query(Task, query), name="all", update=True)
        await self.db.subscriptions.wait_for_synchronization(ts.TimeoutCancellationToken(20))
        return self.db

    @property
    def user_id(self) -> str:
        assert self.user is not None
        return self.user.id

    @property
    def token(self) -> str:
        assert self.user is not None and self.user.access_token is not None
        return self.user.access_token

    def tasks(self) -> dict[str, dict[str, Any]]:
        """The device's tasks by id (read again when the sync thread erases one of them
        while it is read: a live object of an erased row raises ObjectDeletedError)."""
        assert self.db is not None
        for _ in range(50):
            try:
                return {
                    t.id: {
                        "owner_id": t.owner_id,
                        "summary": t.summary,
                        "n": t.n,
                        "shared": t.shared,
                    }
                    for t in self.db.all(Task)
                }
            except ts.ObjectDeletedError:
                continue
        raise AssertionError("the device's tasks kept changing while they were read")

    async def settle(self) -> None:
        """Until uploads are acknowledged and downloads done."""
        assert self.db is not None
        await self.db.sync_session.wait_for_upload(ts.TimeoutCancellationToken(20))
        await self.db.sync_session.wait_for_download(ts.TimeoutCancellationToken(20))

    def shutdown(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self.app.close()
