"""Progress streams registered while paused or right after ``resume()`` (issue 18, item 5),
against a real server: a second device is paused while another writes megabytes; a
``FOR_CURRENTLY_OUTSTANDING_WORK`` stream registered then starts below 1.0 and ends with
1.0 only once the device holds everything (the upload direction: only once the server
acknowledged every pending local change)."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.server.config import ServerConfig
from tidesync.testing import TestServer

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken
UP, DOWN = ts.ProgressDirection.UPLOAD, ts.ProgressDirection.DOWNLOAD
OUTSTANDING = ts.ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK
FOREVER = ts.ProgressMode.REPORT_INDEFINITELY


class Doc(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestServer]:
    # small pages: 1.5 MB is about a hundred DOWNLOADs, so an estimate whose bytes run a
    # little ahead of the server's count (whole objects in flexible sync) would end early
    config = ServerConfig(download_page_bytes=16 * 1024)
    with TestServer(tmp_path / "server", config=config) as srv:
        yield srv


@pytest.fixture
async def user(tmp_path: Path, server: TestServer) -> AsyncIterator[ts.User]:
    app = ts.App(
        ts.AppConfiguration(
            "docs", base_url=server.url, base_path=tmp_path / "a", sync_timeouts=FAST
        )
    )
    try:
        yield await app.log_in(ts.Credentials.anonymous())
    finally:
        app.close()


def _open(user: ts.User, path: Path, flexible: bool) -> ts.Database:
    db = ts.Database(ts.Configuration.flexible_sync(user, [Doc], path))
    if flexible:
        with db.subscriptions.update() as subs:
            subs.add(db.all(Doc))
    return db


def _write(db: ts.Database, prefix: str, count: int, size: int = 300, per_tx: int = 50) -> None:
    """``count`` Docs of ``size`` random characters (random: frames are compressed),
    ``per_tx`` per transaction (one DOWNLOAD page or so each)."""
    for start in range(0, count, per_tx):
        with db.write():
            for i in range(start, min(count, start + per_tx)):
                text = base64.b64encode(os.urandom(size)).decode()[:size]
                db.add(Doc(id=f"{prefix}{i:05d}", text=text))


async def _follow(
    stream: AsyncIterator[ts.SyncProgress], at_end: Callable[[], Any], limit: float = 60
) -> tuple[list[float], Any]:
    """The stream's estimates, and ``at_end()`` read when the 1.0 arrived."""
    values: list[float] = []
    seen: Any = None

    async def run() -> None:
        nonlocal seen
        async for p in stream:
            values.append(p.progress_estimate)
            if p.is_complete:
                seen = at_end()

    await asyncio.wait_for(run(), limit)
    return values, seen


async def _paused_while_another_writes(
    tmp_path: Path, user: ts.User, flexible: bool
) -> tuple[ts.Database, ts.Database]:
    """A writer and a device, both caught up; the device is then paused while the writer
    uploads 5,000 Docs (1.5 MB)."""
    writer = _open(user, tmp_path / "writer.ts", flexible)
    device = _open(user, tmp_path / "device.ts", flexible)
    await device.sync_session.wait_for_download(T(20))
    if flexible:
        await device.subscriptions.wait_for_synchronization(T(20))
    device.sync_session.pause()
    _write(writer, "p", 5000)
    await writer.sync_session.wait_for_upload(T(60))
    return writer, device


@pytest.mark.parametrize("flexible", [False, True], ids=["whole-app", "flexible"])
async def test_download_stream_registered_while_paused_waits_for_the_data(
    tmp_path: Path, user: ts.User, flexible: bool
) -> None:
    writer, device = await _paused_while_another_writes(tmp_path, user, flexible)
    try:
        session = device.sync_session
        stream = session.get_progress_stream(DOWN, OUTSTANDING)
        first = await asyncio.wait_for(anext(stream), 5)
        assert first.progress_estimate == 0.0, first  # unknown until the server says
        forever = session.get_progress_stream(DOWN, FOREVER)
        assert (await asyncio.wait_for(anext(forever), 5)).progress_estimate == 0.0
        await asyncio.sleep(0.2)
        assert len(device.all(Doc)) == 0  # still paused: nothing came, nothing ended
        session.resume()
        values, held = await _follow(stream, lambda: len(device.all(Doc)))
        assert values[-1] == 1.0, values
        assert values == sorted(values), values
        assert held == 5000, (held, values)  # 1.0 only once everything is here
        await forever.aclose()  # type: ignore[attr-defined]
    finally:
        device.close()
        writer.close()


@pytest.mark.parametrize("flexible", [False, True], ids=["whole-app", "flexible"])
async def test_download_stream_registered_right_after_resume_waits_for_the_data(
    tmp_path: Path, user: ts.User, flexible: bool
) -> None:
    writer, device = await _paused_while_another_writes(tmp_path, user, flexible)
    try:
        session = device.sync_session
        session.resume()
        stream = session.get_progress_stream(DOWN, OUTSTANDING)
        values, held = await _follow(stream, lambda: len(device.all(Doc)))
        assert values[0] < 1.0 and values[-1] == 1.0, values
        assert values == sorted(values), values
        assert held == 5000, (held, values)
    finally:
        device.close()
        writer.close()


@pytest.mark.parametrize("flexible", [False, True], ids=["whole-app", "flexible"])
async def test_upload_stream_registered_while_paused_ends_after_the_acknowledgement(
    tmp_path: Path, user: ts.User, server: TestServer, flexible: bool
) -> None:
    device = _open(user, tmp_path / "device.ts", flexible)
    try:
        session = device.sync_session
        await session.wait_for_download(T(20))
        session.pause()
        _write(device, "u", 3000)
        target = session._local_version()
        worker = session._worker

        def acked() -> int:
            return worker.upload_acked

        stream = session.get_progress_stream(UP, OUTSTANDING)
        session.resume()
        values, seen = await _follow(stream, acked)
        assert values[0] == 0.0 and values[-1] == 1.0, values
        assert seen >= target, (seen, target, values)

        # and right after resume()
        session.pause()
        _write(device, "v", 3000)
        target = session._local_version()
        session.resume()
        values, seen = await _follow(session.get_progress_stream(UP, OUTSTANDING), acked)
        assert values[0] < 1.0 and values[-1] == 1.0, values
        assert seen >= target, (seen, target, values)
    finally:
        device.close()
