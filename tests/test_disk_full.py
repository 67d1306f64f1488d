"""A full disk on the device: a local write raises ``DiskFullError`` and leaves the file
consistent; a download that finds the disk full waits, retries with backoff and goes on by
itself once there is space (a real tmpfs filled by a file, a real server process)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import ServerProcess

from .disk_helpers import SmallDisk, count, small_disk, wait_until
from .flex_helpers import FAST, T

CS = ts.ConnectionState


class Note(ts.Model):
    id: int = ts.primary_key()
    body: str = ""


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with small_disk(tmp_path / "disk") as d:
        yield d


def active(session: ts.Session) -> bool:
    return session.state is ts.SessionState.ACTIVE


def check_file(path: str) -> tuple[str, int, int]:
    """``(integrity_check, notes, change log entries)`` read through a fresh connection."""
    conn = sqlite3.connect(path)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        notes = conn.execute('SELECT COUNT(*) FROM "t_Note"').fetchone()[0]
        changes = conn.execute("SELECT COUNT(*) FROM _changelog").fetchone()[0]
        return str(ok), int(notes), int(changes)
    finally:
        conn.close()


def test_a_local_write_on_a_full_disk_raises_disk_full_and_writes_nothing(
    disk: SmallDisk,
) -> None:
    path = disk.path / "local.db"
    db = ts.Database(ts.Configuration.local([Note], path=path))
    try:
        with db.write():
            for i in range(50):
                db.add(Note(id=i, body="x" * 100))
        disk.fill(db)
        if disk.real:
            assert shutil.disk_usage(disk.path).free < 1 << 20
        # a small write fails at COMMIT, a big one inside the block (a statement spills)
        for first, n in ((1000, 20), (2000, 3000)):
            with pytest.raises(ts.TidesyncError) as info:
                with db.write():
                    for i in range(n):
                        db.add(Note(id=first + i, body="y" * 500))
            err = info.value
            assert isinstance(err, ts.DiskFullError) and isinstance(err, ts.WriteError)
            assert err.path == db.path and err.operation == "db.write()"
            assert "disk" in str(err) and "full" in str(err) and db.path in str(err)
            assert isinstance(err.__cause__, sqlite3.Error)  # SQLite's own error, kept
            # rolled back: neither the objects nor their changeset, in memory or the file
            assert count(db, Note) == 50 and db.find(Note, first) is None
            assert check_file(db.path) == ("ok", 50, 1)
        disk.free(db)
        with db.write():  # the same Database works again: no reopening
            db.add(Note(id=100, body="after"))
        assert count(db, Note) == 51
    finally:
        db.close()
    assert check_file(str(path)) == ("ok", 51, 2)


def test_opening_a_file_on_a_full_disk_raises_disk_full_from_an_io_error(
    disk: SmallDisk,
) -> None:
    if not disk.real:  # the -shm file a first connection creates needs a real file system
        pytest.skip("needs a real small disk (a tmpfs: run as root)")
    config = ts.Configuration.local([Note], path=disk.path / "reopened.db")
    with ts.Database(config) as db:
        with db.write():
            db.add(Note(id=1, body="kept"))
    disk.fill()  # the file is closed: its -wal and -shm are gone, and cannot be made again
    assert shutil.disk_usage(disk.path).free < 1 << 20
    with pytest.raises(ts.TidesyncError) as info:
        ts.Database(config)
    err = info.value
    assert isinstance(err, ts.DiskFullError) and err.operation == "opening the database"
    assert getattr(err.__cause__, "sqlite_errorname", "") == "SQLITE_IOERR_SHMSIZE"
    disk.free()
    with ts.Database(config) as db:
        assert [n.body for n in db.all(Note)] == ["kept"]


def io_error(name: str, code: int) -> sqlite3.OperationalError:
    err = sqlite3.OperationalError("disk I/O error" if code & 0xFF == 10 else name)
    err.sqlite_errorcode = code
    err.sqlite_errorname = name
    return err


@pytest.mark.parametrize(
    ("name", "code", "low_space", "full"),
    [
        ("SQLITE_FULL", 13, False, True),  # always a full disk (or max_page_count reached)
        ("SQLITE_IOERR_WRITE", 778, True, True),  # an I/O error with the disk (nearly) full
        ("SQLITE_IOERR_SHMSIZE", 4874, True, True),
        ("SQLITE_IOERR_FSYNC", 1034, True, True),
        ("SQLITE_IOERR_WRITE", 778, False, False),  # an I/O error with room left: not "full"
        ("SQLITE_CORRUPT", 11, True, False),
        ("SQLITE_BUSY", 5, True, False),
    ],
)
def test_which_sqlite_errors_count_as_a_full_disk(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    code: int,
    low_space: bool,
    full: bool,
) -> None:
    from tidesync.support import diskfull  # (imported here: a new module)

    free = diskfull.LOW_SPACE_BYTES - 1 if low_space else diskfull.LOW_SPACE_BYTES * 100
    monkeypatch.setattr(diskfull, "free_bytes", lambda path: free)
    path = str(tmp_path / "x.db")
    assert diskfull.is_disk_full(io_error(name, code), path) is full
    assert diskfull.is_disk_full(ValueError("database or disk is full"), path) is False
    error = diskfull.disk_full_error(io_error(name, code), path, "db.write()")
    assert (error is not None) is full


class Device:
    """An app and user with one synced database (at ``path`` when given)."""

    def __init__(self, root: Path, name: str, url: str, path: Path | None = None) -> None:
        self.app = ts.App(
            ts.AppConfiguration("todo", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.path = path
        self.errors: list[Exception] = []
        self._lock = threading.Lock()
        self.db: ts.Database | None = None

    def _error(self, session: Any, error: Exception) -> None:
        with self._lock:
            self.errors.append(error)

    async def open(self) -> ts.Database:
        user = self.app.current_user or await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, [Note], path=self.path, sync_error_handler=self._error
        )
        self.db = await asyncio.to_thread(ts.Database, config)
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.app.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
async def devices(tmp_path: Path, disk: SmallDisk, server: ServerProcess) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str, path: Path | None = None) -> Device:
        d = Device(tmp_path, name, server.url, path)
        await d.open()
        made.append(d)
        return d

    yield make
    for d in made:
        await asyncio.to_thread(d.close)


async def test_a_download_on_a_full_disk_waits_and_goes_on_once_there_is_space(
    devices: Any,
    disk: SmallDisk,
    server: ServerProcess,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tidesync")
    a = await devices("a", disk.path / "a.db")  # the device on the small disk
    b = await devices("b")  # the writer, on the ordinary disk
    assert a.db is not None and b.db is not None
    sa = a.db.sync_session
    await sa.wait_for_download(T(20))
    changes: list[tuple[float, ts.ConnectionStateChange]] = []
    sa.add_connection_state_listener(lambda c: changes.append((time.monotonic(), c)))
    disk.fill(a.db)
    with b.db.write():  # larger than the device's WAL can take in place
        for i in range(400):
            b.db.add(Note(id=i, body=f"{i:04d}" * 250))
    await b.db.sync_session.wait_for_upload(T(20))

    await wait_until(lambda: a.errors, 20, "the full disk reported")
    await asyncio.sleep(0.5)
    assert sa.state is ts.SessionState.ACTIVE  # it did not stop
    await wait_until(lambda: sa.disk_full is not None, 20, "the session waiting for space")
    await wait_until(
        lambda: sum(1 for _, c in changes if c.current is CS.CONNECTING) >= 4, 20, "four tries"
    )
    # the session did not stop: ACTIVE, it says why it waits, the handler heard it once
    assert sa.state is ts.SessionState.ACTIVE
    waiting = sa.disk_full
    assert isinstance(waiting, ts.SyncDiskFullError) and isinstance(waiting, ts.DiskFullError)
    assert waiting.path == a.db.path and waiting.action is ts.SyncAction.RETRY
    assert "full" in str(waiting) and waiting.operation == "applying a download"
    full = [e for e in a.errors if isinstance(e, ts.DiskFullError)]
    assert full == [waiting] and a.errors == full
    assert any("waits for disk space" in r.getMessage() for r in caplog.records)
    # the tries back off: each wait doubles (minus up to 25 %), up to reconnect_max_delay
    tries = [at for at, c in changes if c.current is CS.CONNECTING]
    binds = [at for at, c in changes if c.current is CS.CONNECTED]
    gaps = [next(b for b in binds if b > t) - t for t in tries[:3]]
    assert gaps[0] >= 0.07 and gaps[2] > gaps[0], gaps
    # pause and resume work as always: the session tries again, still one report
    sa.pause()
    assert not active(sa)
    tried = len(changes)
    sa.resume()
    await wait_until(lambda: len(changes) > tried + 2, 10, "a try after resume()")
    assert active(sa) and sa.disk_full is not None
    # what was applied is whole downloads only; a local write says the disk is full
    held = count(a.db, Note)
    assert held < 400
    with pytest.raises(ts.DiskFullError):
        with a.db.write():
            a.db.add(Note(id=10_000, body="z" * 5000))

    disk.free(a.db)  # and nothing else: no resume(), no reconnect()
    await wait_until(lambda: count(a.db, Note) == 400, 20, "the download after space came back")
    await wait_until(lambda: sa.disk_full is None, 5, "the outage over")
    await sa.wait_for_download(T(10))
    assert sa.state is ts.SessionState.ACTIVE and sa.connection_state is CS.CONNECTED
    assert {n.id: n.body for n in a.db.all(Note)} == {n.id: n.body for n in b.db.all(Note)}
    with a.db.write():
        a.db.add(Note(id=10_000, body="after"))
    await sa.wait_for_upload(T(10))
    await b.db.sync_session.wait_for_download(T(10))
    assert b.db.find(Note, 10_000) is not None
    assert a.errors == full  # one report for the whole outage
    # no traceback from the sync thread, neither on stderr nor in a log record
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_subscription_bootstrap_on_a_full_disk_goes_on_once_there_is_space(
    devices: Any, disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tidesync")
    b = await devices("b")
    assert b.db is not None
    with b.db.write():
        for i in range(400):
            b.db.add(Note(id=i, body=f"{i:04d}" * 250))
    await b.db.sync_session.wait_for_upload(T(20))
    a = await devices("a", disk.path / "a.db")
    assert a.db is not None
    sa = a.db.sync_session
    sa.pause()
    with a.db.subscriptions.update() as subs:  # written now; bootstrapped on resume
        subs.add(a.db.query(Note, "id >= 100"), name="most")
    disk.fill(a.db)
    with pytest.raises(ts.TidesyncError) as info:  # a new set is a local write too
        with a.db.subscriptions.update() as subs:
            for i in range(20):  # larger than the room left in the file's pages
                subs.add(a.db.query(Note, "body == $0", f"{i}" * 1000), name=f"s{i}")
    assert isinstance(info.value, ts.DiskFullError)
    assert info.value.operation == "subscriptions.update()"
    sa.resume()
    await wait_until(lambda: sa.disk_full is not None, 20, "the bootstrap waiting for space")
    assert sa.state is ts.SessionState.ACTIVE
    assert count(a.db, Note) < 300
    disk.free(a.db)
    await a.db.subscriptions.wait_for_synchronization(T(30))
    assert {n.id for n in a.db.all(Note)} == set(range(100, 400))
    assert sa.disk_full is None and sa.state is ts.SessionState.ACTIVE
    assert [type(e) for e in a.errors] == [ts.SyncDiskFullError]
    assert not [r for r in caplog.records if r.exc_info]
