"""History retention: the trimmer trims what is older than the period (and nothing newer),
the option is checked, the task is owned by the server, and a fresh device still gets the
whole state after the history was trimmed (bootstrap from the objects, not the log)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import tidesync as ts
from tidesync.server.config import ServerConfig
from tidesync.server.retention import HistoryTrimmer
from tidesync.server.runner import InProcessServer
from tidesync.server.storage import SQLiteStorage
from tidesync.server.storage.base import HistoryTrimmedError
from tidesync.server.storage.conformance import TASK, Writer, batch

T = ts.TimeoutCancellationToken


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_trimmer_trims_only_what_is_older_than_the_period(tmp_path: Path) -> None:
    clock = FakeClock()
    async with SQLiteStorage.in_folder(tmp_path) as storage:
        await storage.put_schemas("app", [TASK])
        await storage.register_client("app", "w", "u")
        w = Writer("w")
        trimmer = HistoryTrimmer(storage, 60.0, clock)
        trimmer.note_app("app")
        (await storage.integrate([batch("app", w.cs(w.create("a")), w.cs(w.create("b")))]))[
            0
        ].raise_for_error()
        assert await trimmer.trim_once() == 0  # versions 1-2 seen now: not old yet
        clock.now += 30
        (await storage.integrate([batch("app", w.cs(w.create("c")))]))[0].raise_for_error()
        assert await trimmer.trim_once() == 0  # 30 s: still within the period
        clock.now += 31  # versions 1-2 are now more than 60 s old, version 3 is 31 s old
        assert await trimmer.trim_once() == 2
        with pytest.raises(HistoryTrimmedError):
            await storage.read_log("app", 0, 1 << 20)
        page = await storage.read_log("app", 2, 1 << 20)
        assert [e.server_version for e in page.entries] == [3]
        clock.now += 30
        assert await trimmer.trim_once() == 1
        assert trimmer.trimmed_total == 3
        objects = await storage.get_objects("app", "Task")
        assert sorted(objects) == ["a", "b", "c"]  # trimming keeps the objects


def test_retention_option_is_checked() -> None:
    with pytest.raises(ValueError, match="history_retention"):
        ServerConfig(history_retention=-1)
    assert ServerConfig().history_retention == 0  # off by default


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


async def test_server_trims_and_fresh_device_still_gets_everything(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path / "server", config=ServerConfig(history_retention=0.5))
    async with server:
        trimmer = server.hub.trimmer
        assert trimmer is not None
        app = ts.App(ts.AppConfiguration("keep", base_url=server.url, base_path=tmp_path / "a"))
        user = await app.log_in(ts.Credentials.anonymous())
        a = ts.Database(ts.Configuration.flexible_sync(user, [Note]))
        try:
            with a.write():
                for i in range(5):
                    a.add(Note(id=f"n{i}", text="x"))
            await a.sync_session.wait_for_upload(T(20))
            deadline = time.monotonic() + 20
            for _ in range(2000):  # poll: the trimmer runs on its own schedule
                if trimmer.trimmed_total >= 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert trimmer.trimmed_total >= 1
        finally:
            a.close()
            app.close()
        app2 = ts.App(ts.AppConfiguration("keep", base_url=server.url, base_path=tmp_path / "b"))
        user2 = await app2.log_in(ts.Credentials.anonymous())
        b = await ts.Database.open(
            ts.Configuration.flexible_sync(user2, [Note]), cancellation_token=T(20)
        )
        try:
            assert sorted(n.id for n in b.all(Note)) == [f"n{i}" for i in range(5)]
        finally:
            b.close()
            app2.close()
    assert trimmer._task is None  # stopped with the server
