"""A full disk on the server: its SQLite storage refuses the upload with a retryable error
(nothing acknowledged that was not stored, no crash), keeps serving other sessions, and the
devices' uploads go through by themselves once there is space. The server's data folder is
on a real tmpfs filled by a file (a ``tidesync serve`` process); not as root, an in-process
server whose storage connection gets ``PRAGMA max_page_count``."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import ServerProcess, TestServer

from .disk_helpers import SmallDisk, count, small_disk, wait_until
from .flex_helpers import FAST, T


class Note(ts.Model):
    id: int = ts.primary_key()
    body: str = ""


class FullServer:
    """A sync server whose storage's disk the test fills and frees."""

    def __init__(self, disk: SmallDisk) -> None:
        self.disk = disk
        self.data = disk.path / "data"
        self.process: ServerProcess | None = None
        self.in_process: TestServer | None = None
        if disk.real:
            self.process = ServerProcess(self.data).start()
            self.url = self.process.url
        else:
            self.in_process = TestServer(self.data).start()
            self.url = self.in_process.url

    def _pragma(self, pages: int) -> None:
        assert self.in_process is not None
        conn = self.in_process.server.storage._conn  # type: ignore[attr-defined]
        assert isinstance(conn, sqlite3.Connection)
        conn.execute(f"PRAGMA max_page_count = {pages}").fetchall()

    def fill(self) -> None:
        if self.disk.real:
            self.disk.fill()
        else:
            self._pragma(1)

    def free(self) -> None:
        if self.disk.real:
            self.disk.free()
        else:
            self._pragma(4294967294)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.proc is not None and self.process.proc.poll() is None
        assert self.in_process is not None
        return self.in_process.server.running

    def stored_version(self, origin: str) -> int:
        """The last client version of ``origin`` the storage holds (read from its file)."""
        uri = f"file:{self.data / 'server.sqlite3'}?mode=ro"
        conn = sqlite3.connect(uri, uri=True)
        try:
            row = conn.execute(
                "SELECT last_version FROM clients WHERE origin = ?", (origin,)
            ).fetchone()
            return int(row[0]) if row else 0
        finally:
            conn.close()

    def output(self) -> str:
        return "".join(self.process.output) if self.process is not None else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
        if self.in_process is not None:
            self.in_process.stop()


@pytest.fixture
def full_server(tmp_path: Path) -> Iterator[FullServer]:
    with small_disk(tmp_path / "server-disk", size="8m") as disk:
        srv = FullServer(disk)
        try:
            yield srv
        finally:
            srv.stop()


class Device:
    def __init__(self, root: Path, name: str, url: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration("todo", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None

    async def open(self) -> ts.Database:
        user = await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, [Note], sync_error_handler=lambda s, e: self.errors.append(e)
        )
        self.db = await asyncio.to_thread(ts.Database, config)
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.app.close()


@pytest.fixture
async def devices(tmp_path: Path, full_server: FullServer) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str) -> Device:
        d = Device(tmp_path, name, full_server.url)
        await d.open()
        made.append(d)
        return d

    yield make
    for d in made:
        await asyncio.to_thread(d.close)


def acked(db: ts.Database) -> int:
    """The highest local version the server acknowledged to this device."""
    return int(db.sync_session._worker.upload_acked)


async def test_a_full_server_disk_refuses_uploads_retryably_and_recovers(
    devices: Any, full_server: FullServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tidesync")
    a, b = await devices("a"), await devices("b")
    assert a.db is not None and b.db is not None
    with a.db.write():
        a.db.add(Note(id=0, body="before"))
    await a.db.sync_session.wait_for_upload(T(20))
    await b.db.sync_session.wait_for_download(T(20))
    assert count(b.db, Note) == 1
    origin = a.db.sync_session._worker.file_ident
    full_server.fill()
    for start in range(1, 601, 100):  # more than the server's WAL can take in place
        with a.db.write():
            for i in range(start, start + 100):
                a.db.add(Note(id=i, body=f"{i:04d}" * 250))
    last = 7  # the local versions: 1 before, 6 now
    with pytest.raises(ts.OperationCancelledError):
        await a.db.sync_session.wait_for_upload(T(4))
    # refused, retryably: the session goes on, nothing acknowledged that was not stored
    sa = a.db.sync_session
    assert sa.state is ts.SessionState.ACTIVE
    assert a.errors and all(
        isinstance(e, ts.SyncError) and e.action is ts.SyncAction.RETRY for e in a.errors
    ), a.errors
    assert "the server's disk is full" in str(a.errors[0]), a.errors[0]
    assert acked(a.db) < last
    assert acked(a.db) <= full_server.stored_version(origin)
    # the server did not crash and still serves the other sessions
    assert full_server.alive()
    await b.db.sync_session.wait_for_download(T(10))
    assert b.db.sync_session.connection_state is ts.ConnectionState.CONNECTED

    full_server.free()  # and nothing else: the device retries by itself
    await sa.wait_for_upload(T(30))
    assert acked(a.db) == last and full_server.stored_version(origin) == last
    await wait_until(lambda: count(b.db, Note) == 601, 20, "the other device downloading it")
    assert {n.id: n.body for n in b.db.all(Note)} == {n.id: n.body for n in a.db.all(Note)}
    assert count(b.db, Note) == 601 and not b.errors
    assert full_server.alive()
    # the server logged each refusal as one line, without a traceback
    assert "refused" in full_server.output() or not full_server.disk.real
    assert "Traceback" not in full_server.output()
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("tidesync")]
