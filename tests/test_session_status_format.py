"""Pure tests of the session status: ``str(status)`` wording, byte and time formats, the
measured rate behind the ETAs, and the feed's 100 ms rate limit (client/status.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools

import tidesync as ts
from tidesync.client.status import (
    MIN_INTERVAL,
    RateMeter,
    StatusFeed,
    describe,
    format_bytes,
    format_seconds,
)

CS = ts.ConnectionState
UTC = dt.UTC
AT = dt.datetime(2026, 12, 8, 14, 2, 11, tzinfo=UTC)


def _error(message: str) -> ts.ErrorReport:
    return ts.ErrorReport(112, message, ts.SyncAction.RETRY, AT)


def test_offline_waiting_for_the_next_try() -> None:
    status = ts.SyncStatus(
        CS.DISCONNECTED,
        pending_changes=37,
        pending_upload_bytes=12 * 1024,
        last_error=_error("connection refused"),
        attempt=5,
        next_retry_at=AT + dt.timedelta(seconds=40),
        since=AT,
    )
    now = AT + dt.timedelta(seconds=28)
    assert describe(status, now, UTC) == (
        "offline since 14:02:11, 37 changes (12 KiB) waiting, next try in 12 s "
        "(attempt 5: connection refused)"
    )


def test_online_uploading_and_downloading_with_etas() -> None:
    status = ts.SyncStatus(
        CS.CONNECTED,
        pending_changes=1,
        pending_upload_bytes=1536,
        download_remaining_bytes=3 * 1024 * 1024,
        upload_eta=4.2,
        download_eta=75,
        since=AT,
    )
    assert describe(status, AT, UTC) == (
        "online since 14:02:11, 1 change (1.5 KiB) uploading, about 4 s, "
        "3.0 MiB to download, about 1 min 15 s"
    )


def test_online_and_synced() -> None:
    status = ts.SyncStatus(CS.CONNECTED, since=AT, last_synced_at=AT + dt.timedelta(seconds=9))
    assert describe(status, AT, UTC) == "online since 14:02:11, synced at 14:02:20"
    assert describe(ts.SyncStatus(CS.CONNECTED), AT, UTC) == "online, up to date"


def test_connecting_again_after_failures() -> None:
    status = ts.SyncStatus(CS.CONNECTING, attempt=2, last_error=_error("timed out"), since=AT)
    assert describe(status, AT, UTC) == "connecting (attempt 2: timed out)"
    assert str(ts.SyncStatus(CS.DISCONNECTED)) == "offline"


def test_bytes_and_seconds() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 10 * 1024, 5 << 20)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "10 KiB",
        "5.0 MiB",
    ]
    assert [format_seconds(s) for s in (0.4, 12, 60, 185, 7440)] == [
        "0 s",
        "12 s",
        "1 min",
        "3 min 5 s",
        "2 h 4 min",
    ]


def test_rate_and_eta_from_the_measured_bytes() -> None:
    meter = RateMeter()
    assert meter.eta(0.0, 100) is None  # nothing measured
    assert meter.eta(0.0, 0) == 0.0
    meter.add(0.0, 0)
    meter.add(2.0, 1000)
    assert meter.rate(2.0) == 500.0
    assert meter.eta(2.0, 1500) == 3.0
    assert meter.rate(30.0) is None  # nothing moved for longer than the window
    meter.add(31.0, 10)  # the counter started over
    assert meter.rate(31.0) is None


async def test_the_feed_reports_at_most_every_100_ms() -> None:
    loop = asyncio.get_running_loop()
    counter = [0]
    reports: list[tuple[float, int]] = []

    def read() -> ts.SyncStatus:
        return ts.SyncStatus(CS.CONNECTED, pending_changes=counter[0])

    feed = StatusFeed(loop, loop.time, read)
    feed.listeners.append(lambda st: reports.append((loop.time(), st.pending_changes)))
    start = loop.time()
    while loop.time() - start < 0.5:
        counter[0] += 1
        feed.changed()
        await asyncio.sleep(0.005)
    await asyncio.sleep(MIN_INTERVAL * 1.5)
    feed.changed()  # nothing changed since the last report: not reported again
    await asyncio.sleep(MIN_INTERVAL * 1.5)
    feed.close()
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reports)]
    assert 3 <= len(reports) <= 7, reports
    assert min(gaps) >= MIN_INTERVAL * 0.95
    assert reports[-1][1] == counter[0]  # the last change is never lost
    assert reports[0][1] == 1  # the first change is reported at once
