"""Latency plumbing on real files and a real hub: writers of one file in one process hand
it over through a lock instead of SQLite's polling busy handler; a commit's writers are
woken before the fan-out; an acknowledgement is persisted by its download transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.server.auth import Authenticator
from tidesync.server.config import ServerConfig
from tidesync.server.hub import HubSession, SyncHub
from tidesync.server.storage import SQLiteStorage, UploadBatch, UploadResult
from tidesync.store.engine import StoreEngine

ITEM = ModelSchema(
    "Item", (FieldSchema("id", Kind.STR, primary_key=True), FieldSchema("n", Kind.INT)), "id"
)


def test_a_waiting_writer_gets_the_file_as_soon_as_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    first, second = StoreEngine(path, {"Item": ITEM}), StoreEngine(path, {"Item": ITEM})
    try:
        first.begin()
        began = threading.Event()
        waited: list[float] = []

        def other() -> None:
            start = time.perf_counter()
            second.begin(durable=False)
            waited.append(time.perf_counter() - start)
            began.set()
            second.commit(())

        th = threading.Thread(target=other)
        th.start()
        assert not began.wait(0.2)  # the file is taken: the other writer waits
        released = time.perf_counter()
        first.commit(())
        assert began.wait(10)
        th.join(10)
        # it got the file right after the release, not at SQLite's next busy-handler poll
        # (which the 200 ms of waiting above would have pushed to 25-100 ms intervals)
        handover = time.perf_counter() - released
        assert waited[0] >= 0.2
        assert handover < 0.02, handover
        assert int(first.get_meta("commit_seq")) == 2
    finally:
        first.close()
        second.close()


def test_a_failed_begin_and_a_rollback_release_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    engine, other = StoreEngine(path, {"Item": ITEM}), StoreEngine(path, {"Item": ITEM})
    try:
        engine.begin()
        # the same thread beginning on the same connection: SQLite's own error, at once
        with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
            engine.begin()
        engine.rollback()
        with engine.transaction() as conn:
            conn.execute("INSERT INTO _meta(key, value) VALUES ('x', 1)")
        with pytest.raises(RuntimeError), engine.transaction() as conn:
            conn.execute("INSERT INTO _meta(key, value) VALUES ('y', 1)")
            raise RuntimeError("boom")
        # nothing is held any more: another thread writes at once
        done: list[int] = []
        th = threading.Thread(target=lambda: done.append(_write_once(other)))
        th.start()
        th.join(5)
        assert done and engine.get_meta("x") == 1 and engine.get_meta("y") is None
    finally:
        engine.close()
        other.close()


def _write_once(engine: StoreEngine) -> int:
    engine.begin()
    return engine.commit(()) or 0


async def test_writers_are_woken_after_the_fan_out(tmp_path: Path) -> None:
    config = ServerConfig()
    storage = SQLiteStorage(tmp_path / "server.sqlite3")
    await storage.open()
    hub = SyncHub(storage, Authenticator(tmp_path, config), config)
    try:
        sessions = [HubSession(i, f"file-{i}", 0, 0, 0, 0) for i in range(6)]
        for s in sessions:
            hub._sessions.setdefault("app", set()).add(s)
        order: list[str] = []

        async def wait(s: HubSession) -> None:
            await s.wake.wait()
            order.append(s.file_ident)

        tasks = [asyncio.create_task(wait(s)) for s in sessions]
        await asyncio.sleep(0)
        batches = [UploadBatch("app", "file-4", []), UploadBatch("app", "file-1", [])]
        results = [UploadResult("file-4", 1, [5]), UploadResult("file-1", 1, [6])]
        hub._committed(batches, results)
        await asyncio.gather(*tasks)
        # the new changes go to the other devices first, the acknowledgements after them
        assert set(order[:4]) == {"file-0", "file-2", "file-3", "file-5"}
        assert set(order[4:]) == {"file-1", "file-4"}
    finally:
        await storage.close()
