"""Client reset against real servers: each mode, the callbacks, and that resets cannot loop.

Resets are triggered the two ways they happen in production: the server trims history older
than its retention period while a device is paused (a real ``tidesync serve
--history-retention-days`` process), and the server's data is wiped (``wipe_app`` on the
stopped server's storage, then a restart on the same port).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer
from tidesync.server.storage import SQLiteStorage
from tidesync.server.storage.base import HistoryTrimmedError, LogPage
from tidesync.testing import ServerProcess

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken
APP = "resets"
#: Two seconds, in days: history older than that is trimmed.
RETENTION_DAYS = 2 / 86400


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""
    hits: ts.Counter


class Device:
    """One app + synced database, with the errors its handler received."""

    def __init__(self, app: ts.App, db: ts.Database, errors: list[Exception]) -> None:
        self.app, self.db, self.errors = app, db, errors

    def has(self, pk: str) -> bool:
        return self.db.find(Note, pk) is not None

    def write(self, pk: str, text: str = "") -> None:
        with self.db.write():
            self.db.add(Note(id=pk, text=text))

    @property
    def resets(self) -> int:
        return int(self.db.sync_session._worker.resets)

    def close(self) -> None:
        self.db.close()
        self.app.close()


async def _device(root: Path, name: str, url: str, mode: Any = None) -> Device:
    app = ts.App(ts.AppConfiguration(APP, base_url=url, base_path=root / name, sync_timeouts=FAST))
    user = await app.log_in(ts.Credentials.anonymous())
    errors: list[Exception] = []
    config = ts.Configuration.flexible_sync(
        user, [Note], sync_error_handler=lambda _s, e: errors.append(e), client_reset=mode
    )
    return Device(app, ts.Database(config), errors)


async def _until(pred: Callable[[], bool], what: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _server_row(data: Path) -> tuple[int, int]:
    """``(latest_version, trimmed_version)`` of the app in a server's SQLite file."""
    conn = sqlite3.connect(f"file:{data / 'server.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute(
            "SELECT latest_version, trimmed_version FROM apps WHERE app = ?", (APP,)
        ).fetchone()
    finally:
        conn.close()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _copies(root: Path, label: str) -> list[Path]:
    return list(root.glob(f"**/*.{label}-*"))


async def _wipe(server: ServerProcess) -> None:
    """Stop the server, wipe the app's sync data, start it again on the same port."""
    server.stop()
    async with SQLiteStorage.in_folder(server.data_dir) as storage:
        await storage.wipe_app(APP)
    server.start()


async def test_recover_after_trimmed_history_keeps_and_uploads_offline_writes(
    tmp_path: Path,
) -> None:
    data = tmp_path / "server"
    server = ServerProcess(
        data, extra_args=["--history-retention-days", repr(RETENTION_DAYS)]
    ).start()
    seen: dict[str, Any] = {}

    def before(db: ts.Database) -> None:
        seen["before"] = (db.find(Note, "a-offline") is not None, db.find(Note, "b1") is not None)

    def after(old: ts.Database, new: ts.Database) -> None:
        seen["after"] = (old.find(Note, "b1") is not None, new.find(Note, "b1") is not None)
        seen["after_offline"] = new.find(Note, "a-offline") is not None

    mode = ts.RecoverUnsyncedChanges(on_before=before, on_after=after)
    a = await _device(tmp_path, "a", server.url, mode)
    b = await _device(tmp_path, "b", server.url)
    try:
        a.write("a1")
        await a.db.sync_session.wait_for_upload(T(20))
        await _until(lambda: b.has("a1"), "b to see a1")
        a.db.sync_session.pause()
        a.write("a-offline", "written while offline")
        changes: list[Any] = []
        live = a.db.all(Note)
        token = live.add_listener(changes.append)
        assert len(live) == 2
        b.write("b1")
        await b.db.sync_session.wait_for_upload(T(20))
        latest = _server_row(data)[0]
        await _until(lambda: _server_row(data)[1] >= latest, "the server to trim", 30)

        a.db.sync_session.resume()
        await _until(lambda: a.resets >= 1 and a.has("b1"), "a to reset and download b1")
        assert a.has("a-offline") and a.has("a1")  # a1 comes back from the server's state
        await a.db.sync_session.wait_for_upload(T(20))
        await _until(lambda: b.has("a-offline"), "b to see a's recovered offline write")
        await _until(lambda: "after" in seen, "on_after")
        assert seen["before"] == (True, False)
        assert seen["after"] == (False, True)
        assert seen["after_offline"] is True
        await _until(lambda: len(changes) >= 2, "notifications on a's open results")
        assert sorted(n.id for n in live) == ["a-offline", "a1", "b1"]  # results are live
        assert not [e for e in a.errors if isinstance(e, ts.ClientResetError)]
        assert not _copies(tmp_path / "a", "before")  # the copy of the old file is gone
        token.cancel()
    finally:
        a.close()
        b.close()
        server.stop()


async def test_discard_after_wipe_drops_offline_writes(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    calls: list[str] = []
    mode = ts.DiscardUnsyncedChanges(
        on_before=lambda db: calls.append(f"before:{db.find(Note, 'doomed') is not None}"),
        on_after=lambda old, new: calls.append(
            f"after:{new.find(Note, 'doomed') is not None}:{new.find(Note, 'fresh') is not None}"
        ),
    )
    a = await _device(tmp_path, "a", server.url, mode)
    try:
        a.write("kept")
        await a.db.sync_session.wait_for_upload(T(20))
        a.db.sync_session.pause()
        a.write("doomed")
        await _wipe(server)
        b = await _device(tmp_path, "b", server.url)
        try:
            b.write("fresh")
            await b.db.sync_session.wait_for_upload(T(20))
            a.db.sync_session.resume()
            await _until(lambda: a.resets >= 1 and a.has("fresh"), "a to reset")
            assert not a.has("doomed")
            assert not a.has("kept")  # the wiped server no longer has it
            await _until(lambda: len(calls) == 2, "the callbacks")
            assert calls == ["before:True", "after:False:True"]
            a.write("later")  # the reset file syncs normally
            await a.db.sync_session.wait_for_upload(T(20))
            await _until(lambda: b.has("later"), "b to see a's later write")
            await b.db.sync_session.wait_for_download(T(20))
            assert not b.has("doomed")
        finally:
            b.close()
    finally:
        a.close()
        server.stop()


async def test_manual_leaves_a_usable_backup_and_stops(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    a = await _device(tmp_path, "a", server.url, ts.ManualRecovery())
    try:
        a.write("synced")
        await a.db.sync_session.wait_for_upload(T(20))
        a.db.sync_session.pause()
        a.write("unsynced", "only here")
        await _wipe(server)
        a.db.sync_session.resume()
        await _until(
            lambda: any(isinstance(e, ts.ClientResetError) for e in a.errors), "the reset error"
        )
        error = next(e for e in a.errors if isinstance(e, ts.ClientResetError))
        assert isinstance(error, ts.ClientResetError) and error.backup_path
        await _until(
            lambda: a.db.sync_session.state is ts.SessionState.INACTIVE, "the session to stop"
        )
        assert a.resets == 0 and a.has("unsynced")  # the file was not touched
        with ts.Database(ts.Configuration.local([Note], error.backup_path)) as backup:
            obj = backup.find(Note, "unsynced")
            assert obj is not None and obj.text == "only here"
            assert backup.find(Note, "synced") is not None
    finally:
        a.close()
        server.stop()


class _AlwaysTrimmed(SQLiteStorage):
    """A server storage whose history is always trimmed: every session needs a reset."""

    async def read_log(
        self, app_id: str, after: int, max_bytes: int, exclude_origin: str | None = None
    ) -> LogPage:
        raise HistoryTrimmedError(f"app {app_id}: history trimmed (always)", after + 1)


async def test_a_reset_cannot_loop_forever(tmp_path: Path) -> None:
    server = InProcessServer(
        tmp_path / "server",
        config=ServerConfig(),
        storage_factory=lambda folder: _AlwaysTrimmed.in_folder(folder),
    )
    async with server:
        a = await _device(tmp_path, "a", server.url, ts.RecoverUnsyncedChanges(max_resets=3))
        try:
            a.write("x")
            await _until(
                lambda: a.db.sync_session.state is ts.SessionState.INACTIVE, "the session to stop"
            )
            assert a.resets == 3
            stops = [e for e in a.errors if isinstance(e, ts.ClientResetError)]
            assert len(stops) == 1 and stops[0].action is ts.SyncAction.STOP
            assert "3 client resets" in str(stops[0])
            assert a.has("x")  # the unsynced write survived every reset
            with pytest.raises(ts.SessionInactiveError):
                await a.db.sync_session.wait_for_upload(T(5))
        finally:
            a.close()


def test_client_reset_option_is_checked(tmp_path: Path) -> None:
    user: Any = object()
    path = tmp_path / "x.tidesync"
    with pytest.raises(TypeError, match="client_reset"):
        ts.Configuration.flexible_sync(user, [Note], path, client_reset="discard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_resets"):
        ts.Configuration.flexible_sync(
            user, [Note], path, client_reset=ts.RecoverUnsyncedChanges(max_resets=0)
        )
    config = ts.Configuration.flexible_sync(user, [Note], path)
    assert config.sync is not None
    assert isinstance(config.sync.client_reset, ts.RecoverUnsyncedChanges)  # the default
