"""The acknowledgement of a device's own upload reaches its file later, not in a write
transaction of its own (``SessionWorker._note_cursors``); losing it is harmless.

A real ``tidesync serve`` process, real files; the device that loses its acknowledgement is
a process of its own that exits right after ``wait_for_upload``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tidesync as ts
from tidesync.client.syncclient import CURSOR_SAVE_DELAY
from tidesync.server.storage import SQLiteStorage
from tidesync.testing import ServerProcess

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken


class Tally(ts.Model):
    id: str = ts.primary_key()
    hits: ts.Counter


def _meta(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT key, value FROM _meta WHERE key IN ('upload_acked', 'last_version')"
        ).fetchall()
    finally:
        conn.close()
    return {"upload_acked": 0, "last_version": 0} | {k: int(v or 0) for k, v in rows}


async def _open(root: Path, name: str, url: str) -> tuple[ts.App, ts.Database]:
    app = ts.App(
        ts.AppConfiguration("tally", base_url=url, base_path=root / name, sync_timeouts=FAST)
    )
    user = app.current_user or await app.log_in(ts.Credentials.anonymous())
    return app, ts.Database(ts.Configuration.flexible_sync(user, [Tally]))


async def test_acknowledgement_reaches_the_file(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    try:
        app, db = await _open(tmp_path, "a", server.url)
        try:
            for i in range(3):
                with db.write():
                    db.add(Tally(id=str(i)))
            await db.sync_session.wait_for_upload(T(20))
            path = db.path
            deadline = time.monotonic() + CURSOR_SAVE_DELAY + 10
            while True:
                meta = _meta(path)
                if meta.get("upload_acked") == meta["last_version"] == 3:
                    break
                assert time.monotonic() < deadline, f"the file still holds {meta}"
                await asyncio.sleep(0.05)
            with db.write():
                db.add(Tally(id="3"))
            await db.sync_session.wait_for_upload(T(20))
        finally:
            db.close()  # writes what memory holds
            app.close()
        assert _meta(path) == {"upload_acked": 4, "last_version": 4}
    finally:
        server.stop()


def test_lost_acknowledgement_is_harmless(tmp_path: Path) -> None:
    """The device exits at once after its upload was acknowledged (its file still says
    unacknowledged); opened again, it does not apply or send the increment twice."""
    server = ServerProcess(tmp_path / "server").start()
    root = str(Path(__file__).parent.parent)
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        sys.path.insert(0, {root!r})
        from pathlib import Path
        import tidesync as ts
        from tests.test_cursor_save import Tally, _open
        async def main():
            app, db = await _open(Path({str(tmp_path)!r}), "a", {server.url!r})
            with db.write():
                db.add(Tally(id="t"))
            with db.write():
                db.find(Tally, "t").hits.increment(5)
            await db.sync_session.wait_for_upload(ts.TimeoutCancellationToken(20))
            print(db.path, flush=True)
            os._exit(0)  # before the acknowledgement is written to the file
        asyncio.run(main())
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        path = Path(out.stdout.strip())
        assert _meta(path) == {"upload_acked": 0, "last_version": 2}  # lost, as intended

        async def reopen() -> None:
            app, db = await _open(tmp_path, "a", server.url)
            app_b, b = await _open(tmp_path, "b", server.url)
            try:
                await db.sync_session.wait_for_upload(T(20))
                await db.sync_session.wait_for_download(T(20))
                with db.write():
                    obj = db.find(Tally, "t")
                    assert obj is not None
                    obj.hits.increment(1)
                await db.sync_session.wait_for_upload(T(20))
                deadline = time.monotonic() + 20
                while True:
                    await b.sync_session.wait_for_download(T(20))
                    seen = b.find(Tally, "t")
                    if seen is not None and seen.hits.value == 6:
                        break
                    assert time.monotonic() < deadline, "B never saw 6 hits"
                    await asyncio.sleep(0.05)
                mine = db.find(Tally, "t")
                assert mine is not None and mine.hits.value == 6
            finally:
                db.close()
                b.close()
                app.close()
                app_b.close()

        asyncio.run(reopen())
        assert _meta(path) == {"upload_acked": 3, "last_version": 3}
    finally:
        server.stop()

    async def stored() -> None:
        async with SQLiteStorage(tmp_path / "server" / "server.sqlite3") as storage:
            objects = await storage.get_objects("tally", "Tally")
            assert objects["t"]["hits"] == 6
            page = await storage.read_log("tally", 0, 1 << 30)
            ids = [(e.origin, e.client_version) for e in page.entries]
            assert len(ids) == len(set(ids)) == 3

    asyncio.run(stored())


async def test_a_failed_save_is_logged_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The file refuses the write (locked past the busy timeout, say): the session goes
    on, says so in the log, and the next save writes the cursors."""
    server = ServerProcess(tmp_path / "server").start()
    try:
        app, db = await _open(tmp_path, "a", server.url)
        try:
            worker = db.sync_session._worker
            real = worker.engine.transaction

            def locked(**_: object) -> None:
                raise sqlite3.OperationalError("database is locked")

            monkeypatch.setattr(worker.engine, "transaction", locked)
            with db.write():
                db.add(Tally(id="x"))
            await db.sync_session.wait_for_upload(T(20))
            worker.client.call(worker.save_cursors)
            assert "could not save the sync cursors" in caplog.text
            assert _meta(db.path)["upload_acked"] == 0
            monkeypatch.setattr(worker.engine, "transaction", real)
            worker.client.call(worker.save_cursors)
            assert _meta(db.path)["upload_acked"] == 1
        finally:
            db.close()
            app.close()
    finally:
        server.stop()
