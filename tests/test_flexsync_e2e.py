"""Flexible sync end to end: subscriptions, bootstraps, permissions and compensating writes,
against real servers (in-process for development mode, a ``tidesync serve --config`` child
process for the rules), real SQLite files and real WebSockets."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.protocol.messages import BOOTSTRAP_NONE
from tidesync.testing import ServerProcess, TestServer

from .flex_helpers import FAST, eventually

T = ts.TimeoutCancellationToken
S = ts.SubscriptionSetState


class Task(ts.Model):
    id: str = ts.primary_key()
    owner_id: str = ""
    summary: str = ""
    n: int = 0
    shared: bool = False


class Device:
    """An app, a user and a synced database, as one device would have them."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.root, self.name = root, name
        self.app = ts.App(
            ts.AppConfiguration("todo", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.errors: list[Exception] = []
        self.user: ts.User | None = None
        self.db: ts.Database | None = None

    async def open(self, **kw: Any) -> ts.Database:
        if self.user is None:
            self.user = await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            self.user, [Task], sync_error_handler=lambda s, e: self.errors.append(e), **kw
        )
        self.db = ts.Database(config)
        return self.db

    def ids(self) -> set[str]:
        assert self.db is not None
        return {t.id for t in self.db.all(Task)}

    async def settle(self) -> None:
        assert self.db is not None
        await self.db.sync_session.wait_for_upload(T(20))
        await self.db.sync_session.wait_for_download(T(20))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def shutdown(self) -> None:
        self.close()
        self.app.close()


async def subscribe(d: Device, query: str, *args: Any, name: str = "main") -> None:
    assert d.db is not None
    with d.db.subscriptions.update() as subs:
        subs.add(d.db.query(Task, query, *args), name=name, update=True)
    await d.db.subscriptions.wait_for_synchronization(T(20))


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[TestServer]:
    with TestServer(tmp_path / "server") as server:
        yield server


@pytest.fixture
async def devices(tmp_path: Path, dev_server: TestServer) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str) -> Device:
        d = Device(tmp_path, name, dev_server.url)
        await d.open()
        made.append(d)
        return d

    yield make
    for d in made:
        d.shutdown()


async def test_subscribe_narrow_widen_remove_and_view_changes(devices: Any) -> None:
    a, b = await devices("a"), await devices("b")
    with a.db.write():
        for i in range(10):
            a.db.add(Task(id=f"t{i}", n=i))
    await a.settle()
    await b.settle()
    assert len(b.db.subscriptions) == 0 and b.db.subscriptions.state is S.COMPLETE

    await subscribe(b, "n < $0", 3)
    assert b.ids() == {"t0", "t1", "t2"}
    sub = b.db.subscriptions.find_by_name("main")
    assert sub is not None and sub.query == "n < $0" and sub.args == (3,)
    assert b.db.subscriptions.find(b.db.query(Task, "n < $0", 3)) == sub
    assert b.db.subscriptions.state is S.COMPLETE

    await subscribe(b, "n < 6")  # widen
    assert b.ids() == {f"t{i}" for i in range(6)}
    await subscribe(b, "n >= 8")  # narrow
    assert b.ids() == {"t8", "t9"}

    # edited elsewhere: t1 enters the view, t8 leaves it (never deleted anywhere)
    with a.db.write():
        a.db.find(Task, "t1").n = 9
        a.db.find(Task, "t8").n = 0
    await a.settle()
    await b.settle()
    assert b.ids() == {"t1", "t9"}
    assert a.ids() == {f"t{i}" for i in range(10)}

    # a second subscription, then removals
    with b.db.subscriptions.update() as subs:
        subs.add(b.db.query(Task, "n == 4"), name="four")
        with pytest.raises(ts.SubscriptionError):
            subs.add(b.db.query(Task, "n == 5"), name="four")
    await b.db.subscriptions.wait_for_synchronization(T(20))
    assert b.ids() == {"t1", "t4", "t9"}
    with b.db.subscriptions.update() as subs:
        assert subs.remove_by_name("main")
    await b.db.subscriptions.wait_for_synchronization(T(20))
    assert b.ids() == {"t4"}
    with b.db.subscriptions.update() as subs:
        assert subs.remove_by_type(Task) == 1
    await b.db.subscriptions.wait_for_synchronization(T(20))
    assert b.ids() == set()
    assert a.ids() == {f"t{i}" for i in range(10)}  # nothing was deleted


async def test_invalid_query_errors_and_old_set_keeps_syncing(devices: Any) -> None:
    a, b = await devices("a"), await devices("b")
    with a.db.write():
        a.db.add(Task(id="x", n=1))
        a.db.add(Task(id="y", n=50))
    await a.settle()
    await subscribe(b, "n < 10")
    assert b.ids() == {"x"}
    old_version = b.db.subscriptions.version
    with b.db.subscriptions.update() as subs:
        subs.add(b.db.query(Task, "n > 0 LIMIT(2)"), name="main", update=True)
    with pytest.raises(ts.SubscriptionError, match="LIMIT"):
        await b.db.subscriptions.wait_for_synchronization(T(20))
    assert b.db.subscriptions.state is S.ERROR
    assert "LIMIT" in (b.db.subscriptions.error or "")
    # the previous set (n < 10) keeps syncing
    with a.db.write():
        a.db.add(Task(id="z", n=2))
        a.db.find(Task, "x").summary = "edited"
    await a.settle()
    await eventually(lambda: b.ids() == {"x", "z"} and b.db.find(Task, "x").summary == "edited")
    assert b.db.subscriptions.version == old_version + 1


async def test_subscriptions_persist_across_restarts(
    tmp_path: Path, dev_server: TestServer
) -> None:
    a = Device(tmp_path, "a", dev_server.url)
    b = Device(tmp_path, "b", dev_server.url)
    try:
        await a.open()
        with a.db.write():
            for i in range(5):
                a.db.add(Task(id=f"p{i}", n=i))
        await a.settle()
        calls: list[int] = []

        def initial(db: ts.Database) -> None:
            calls.append(1)
            with db.subscriptions.update() as subs:
                subs.add(db.query(Task, "n >= 3"), name="big")

        await b.open(initial_subscriptions=initial)
        await b.db.subscriptions.wait_for_synchronization(T(20))
        assert b.ids() == {"p3", "p4"} and calls == [1]
        b.close()
        with a.db.write():
            a.db.add(Task(id="p9", n=9))
            a.db.add(Task(id="p0b", n=0))
        await a.settle()
        await b.open(initial_subscriptions=initial)  # not rerun: the set exists
        assert calls == [1]
        assert len(b.db.subscriptions) == 1
        assert b.db.subscriptions.find_by_name("big") is not None
        await b.db.subscriptions.wait_for_synchronization(T(20))
        await eventually(lambda: b.ids() == {"p3", "p4", "p9"})
    finally:
        a.shutdown()
        b.shutdown()


async def test_bootstrap_of_10000_objects_reports_progress(devices: Any) -> None:
    a, b = await devices("a"), await devices("b")
    with a.db.write():
        for i in range(10_000):
            a.db.add(Task(id=f"o{i:05d}", summary="x" * 40, n=i))
    await a.db.sync_session.wait_for_upload(T(60))
    worker = b.db.sync_session._worker
    seen: list[tuple[int, int]] = []  # (bootstrap flag, downloadable_bytes)
    original = worker.on_download

    def record(ev: Any) -> None:
        if ev.bootstrap != BOOTSTRAP_NONE:
            seen.append((ev.bootstrap, ev.downloadable_bytes))
        original(ev)

    worker.on_download = record
    with b.db.subscriptions.update() as subs:
        subs.add(b.db.all(Task))
    await b.db.subscriptions.wait_for_synchronization(T(60))
    assert len(b.db.all(Task)) == 10_000
    remaining = [r for _, r in seen]
    assert len(remaining) >= 4, remaining
    assert remaining == sorted(remaining, reverse=True)  # only ever goes down
    assert remaining[-1] == 0 and remaining[0] > 0
    total = remaining[0] + 1
    progress = [1 - r / total for r in remaining]
    assert progress[-1] == 1.0 and len(set(progress)) >= 4


# -- permissions (production mode, the example file) --------------------------------

CONFIG = textwrap.dedent(
    """
    [apps.todo]
    auth = ["anonymous", "email_password"]

    [apps.todo.rules.Task]
    read = "owner_id == $user.id OR shared == true"
    write = "owner_id == $user.id"
    """
)


@pytest.fixture
def rules_server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "tidesync.toml"
    config.write_text(CONFIG)
    proc = ServerProcess(tmp_path / "server", extra_args=["--config", str(config)]).start()
    try:
        yield proc
    finally:
        proc.kill()


async def test_owner_rules_refuse_every_attempt(
    tmp_path: Path, rules_server: ServerProcess
) -> None:
    u1 = Device(tmp_path, "u1", rules_server.url)
    u2 = Device(tmp_path, "u2", rules_server.url)
    try:
        await u1.open()
        await u2.open()
        me, other = u1.user.id, u2.user.id
        with u2.db.write():
            u2.db.add(Task(id="secret", owner_id=other, summary="u2 private"))
            u2.db.add(Task(id="public", owner_id=other, summary="u2 shared", shared=True))
        with u1.db.write():
            u1.db.add(Task(id="mine", owner_id=me, summary="u1 own"))
        await u2.settle()
        await u1.settle()
        await subscribe(u2, "TRUEPREDICATE")
        # subscribe to everything: u1 sees its own and the shared one, never the secret
        await subscribe(u1, "TRUEPREDICATE")
        assert u1.ids() == {"mine", "public"}

        # write another's object, forge the owner field, create in another's name
        with u1.db.write():
            u1.db.find(Task, "public").summary = "defaced"
            u1.db.find(Task, "mine").owner_id = other
            u1.db.add(Task(id="fake", owner_id=other, summary="in u2's name"))
            u1.db.add(Task(id="ok", owner_id=me, summary="allowed"))
        await u1.settle()
        await eventually(lambda: any(isinstance(e, ts.CompensatingWriteError) for e in u1.errors))
        refused = {
            (m, pk)
            for e in u1.errors
            if isinstance(e, ts.CompensatingWriteError)
            for m, pk, _ in e.refused
        }
        assert refused == {("Task", "public"), ("Task", "mine"), ("Task", "fake")}
        # the authoritative state replaced the refused writes; the allowed one was kept
        await eventually(lambda: u1.ids() == {"mine", "public", "ok"})
        assert u1.db.find(Task, "public").summary == "u2 shared"
        assert u1.db.find(Task, "mine").owner_id == me
        assert u1.db.sync_session.state is ts.SessionState.ACTIVE
        await u2.settle()
        assert u2.ids() == {"secret", "public"}
        assert u2.db.find(Task, "public").summary == "u2 shared"

        # u2 changes its shared task into a private one: it leaves u1's view
        with u2.db.write():
            u2.db.find(Task, "public").shared = False
        await u2.settle()
        await eventually(lambda: u1.ids() == {"mine", "ok"})
    finally:
        u1.shutdown()
        u2.shutdown()
