"""Writes to objects that do not exist (yet, or any more) are checked by the write rule.

An attacker (a raw protocol client, :class:`~tests.rules_helpers.Hostile`) sends SETs and
ERASEs of ``profile-<victim's user id>`` with timestamps an hour ahead, before the victim
creates it, after, and after the victim erased it; the victim is a real device. Against a
``tidesync serve --config`` child process with the owner rules, on SQLite and on
PostgreSQL storage (``TIDESYNC_TEST_PG_DSN``): every one of the attacker's writes is
refused (ERROR 231), nothing of it is stored, the victim's objects are as the victim made
them and the attacker never receives them (docs/flexible-sync.md, "Compensating writes").
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.protocol.messages import refused_of
from tidesync.server.storage.base import ServerStorage
from tidesync.server.storage.sqlite import SQLiteStorage
from tidesync.testing import ServerProcess

from .flex_helpers import eventually
from .rules_helpers import HOUR_MS, Hostile, now_ms, rules_config, stored_log
from .test_flexsync_e2e import Device, Task, subscribe

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
OWNER_RULES = """
[apps.todo.rules.Task]
read = "owner_id == $user.id OR shared == true"
write = "owner_id == $user.id"
"""


class Deployment:
    """A rules server process on one kind of storage, and a way to read what it stored."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.kind = kind
        self.folder = tmp_path / "server"
        self.pg_url = ""
        args = ["--config", str(rules_config(tmp_path, OWNER_RULES))]
        if kind == "postgres":
            self.pg_url = f"{DSN}?schema=ts_orphan_{uuid.uuid4().hex[:12]}"
            args += ["--storage", self.pg_url]
        self.proc = ServerProcess(self.folder, extra_args=args)

    def storage(self) -> ServerStorage:
        """The server's storage (for SQLite: once the server stopped)."""
        if self.kind == "postgres":
            from tidesync.server.storage.postgres import PostgresStorage

            return PostgresStorage.from_url(self.pg_url)
        return SQLiteStorage.in_folder(self.folder)

    def drop(self) -> None:
        if not self.pg_url:
            return
        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(DSN)
            try:
                schema = self.pg_url.rsplit("schema=", 1)[1]
                from tidesync.server.storage.pgviews import drop_views_of_storage

                await drop_views_of_storage(conn, schema)  # the apps' SQL view schemas
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


@pytest.fixture(params=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    if request.param == "postgres":
        pytest.importorskip("asyncpg")
        if not DSN:
            pytest.skip("TIDESYNC_TEST_PG_DSN is not set")
    made = Deployment(tmp_path, request.param)
    made.proc.start()
    try:
        yield made
    finally:
        made.proc.kill()
        made.drop()


async def test_writes_to_missing_or_erased_objects_cannot_take_over(
    tmp_path: Path, deployment: Deployment
) -> None:
    url = deployment.proc.url
    victim = Device(tmp_path, "victim", url)
    attacker: Hostile | None = None
    try:
        await victim.open()
        await subscribe(victim, "TRUEPREDICATE")
        assert victim.db is not None and victim.user is not None
        db, vid = victim.db, victim.user.id
        attacker = await Hostile.connect(url, "todo", "attacker-file", [Task.__schema__.to_dict()])
        ahead = now_ms() + HOUR_MS  # later than anything the victim writes
        kinds = ("profile", "avatar", "card", "bio")
        first, erased, second, again = (f"{kind}-{vid}" for kind in kinds)

        def take_over(pk: str) -> list[Any]:
            return [
                attacker.set("Task", pk, "summary", "attacker's", ahead),
                attacker.set("Task", pk, "shared", True, ahead),
            ]

        # 1. SETs arrive before the CREATE, with a later HLC than the victim's
        await attacker.wait_acked(await attacker.send(take_over(first)))
        # 2. an ERASE arrives before the CREATE, with a later HLC
        await attacker.wait_acked(await attacker.send([attacker.erase("Task", erased, ahead)]))
        with db.write():
            db.add(Task(id=first, owner_id=vid, summary="mine"))
            db.add(Task(id=erased, owner_id=vid, summary="mine"))
            db.add(Task(id=second, owner_id=vid, summary="mine"))
            db.add(Task(id=again, owner_id=vid, summary="old"))
        await victim.settle()
        # 3. the other order: SETs after the CREATE
        await attacker.wait_acked(await attacker.send(take_over(second)))
        # 4. SETs after the victim erased it, then the victim creates it again
        with db.write():
            found = db.find(Task, again)
            assert found is not None
            db.delete(found)
        await victim.settle()
        await attacker.wait_acked(await attacker.send(take_over(again)))
        with db.write():
            db.add(Task(id=again, owner_id=vid, summary="mine"))
        await victim.settle()
        await victim.settle()

        mine: dict[str, Any] = {}
        for pk in (first, erased, second, again):
            obj = db.find(Task, pk)
            mine[pk] = None if obj is None else (obj.owner_id, obj.summary, obj.shared)
        assert mine == {pk: (vid, "mine", False) for pk in mine}
        await attacker.caught_up()
        assert attacker.received.isdisjoint({("Task", pk) for pk in mine})
        refused = {pk for message in attacker.refusals for _, pk, _ in refused_of(message)}
        assert refused == set(mine), attacker.refusals
        assert victim.errors == []
    finally:
        if attacker is not None:
            await attacker.close()
        victim.shutdown()
    deployment.proc.stop()
    storage = deployment.storage()
    async with storage:
        log = await stored_log(storage, "todo")
    assert [ins for origin, ins in log if origin == "attacker-file"] == []
    assert {ins.pk for _, ins in log} >= set(mine)


@pytest.mark.parametrize("deployment", ["sqlite"], indirect=True)
async def test_honest_creates_deletes_and_late_updates(
    tmp_path: Path, deployment: Deployment
) -> None:
    """A device's own create-then-delete (in one write or two) is not refused; an update
    that reaches the server after another device of the same user erased the object is
    (the erase wins: the update would only show through a later re-create)."""
    url = deployment.proc.url
    one, two = Device(tmp_path, "one", url), Device(tmp_path, "two", url)
    try:
        await one.app.email_password_auth.register_user("ann@x.io", "a password 1")
        for d in (one, two):
            d.user = await d.app.log_in(ts.Credentials.email_password("ann@x.io", "a password 1"))
            await d.open()
            await subscribe(d, "TRUEPREDICATE")
        assert one.db is not None and two.db is not None and one.user is not None
        me = one.user.id
        with one.db.write():
            one.db.delete(one.db.add(Task(id="brief", owner_id=me)))
        with one.db.write():
            one.db.add(Task(id="short", owner_id=me))
            one.db.add(Task(id="kept", owner_id=me, summary="v1"))
        with one.db.write():
            found = one.db.find(Task, "short")
            assert found is not None
            one.db.delete(found)
        await one.settle()
        await two.settle()
        assert one.ids() == two.ids() == {"kept"}
        assert one.errors == [] and two.errors == []

        two.db.sync_session.pause()
        with one.db.write():
            found = one.db.find(Task, "kept")
            assert found is not None
            one.db.delete(found)
        await one.settle()
        with two.db.write():
            found = two.db.find(Task, "kept")
            assert found is not None
            found.summary = "v2, offline, after the erase"
        two.db.sync_session.resume()
        await two.settle()
        await eventually(lambda: any(isinstance(e, ts.CompensatingWriteError) for e in two.errors))
        refused = {pk for e in two.errors for _, pk, _ in getattr(e, "refused", [])}
        assert refused == {"kept"}
        await eventually(lambda: two.ids() == set())
        assert one.ids() == set() and one.errors == []
    finally:
        one.shutdown()
        two.shutdown()
