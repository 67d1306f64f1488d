"""Per-object sync status and session status against a real ``tidesync serve`` process:
a write refused by a rule shows REFUSED with the server's reason, ``db.pending`` empties
(and notifies) as a paused session resumes, ``attempt`` and ``next_retry_at`` follow the
backoff while the server is down, and status listeners are told of changes at most every
100 ms (docs/sync-session.md, "Sync status of an object" and "Session status")."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import tidesync as ts
from tidesync.testing import ServerProcess

from .rules_helpers import rules_config
from .test_flexsync_e2e import Device as FlexDevice
from .test_flexsync_e2e import Task, subscribe
from .test_session_state import Item, device, server, wait_connected, wait_until

__all__ = ["device", "server"]  # the fixtures this module uses

T = ts.TimeoutCancellationToken
CS = ts.ConnectionState

OWNER_RULES = """
[apps.todo.rules.Task]
read = "owner_id == $user.id OR shared == true"
write = "owner_id == $user.id"
"""


async def test_a_write_refused_by_a_rule_is_refused_with_the_reason(tmp_path: Path) -> None:
    args = ["--config", str(rules_config(tmp_path, OWNER_RULES))]
    proc = ServerProcess(tmp_path / "server", extra_args=args).start()
    d = FlexDevice(tmp_path, "d", proc.url)
    try:
        db = await d.open()
        await subscribe(d, "TRUEPREDICATE")
        assert d.user is not None
        with db.write():
            mine = db.add(Task(id="mine", owner_id=d.user.id, summary="ok"))
            theirs = db.add(Task(id="theirs", owner_id="somebody-else", summary="no"))
        assert db.sync_status(theirs) == ts.ObjectSyncStatus.PENDING
        assert len(db.query(Task, "owner_id != '' AND @pending == true")) == 2
        await wait_until(
            lambda: db.sync_status(theirs) == ts.ObjectSyncStatus.REFUSED, 20, "REFUSED"
        )
        await d.settle()
        refused = [e for e in d.errors if isinstance(e, ts.CompensatingWriteError)]
        assert refused, d.errors
        reasons = {pk: why for _, pk, why in refused[0].refused}
        status = db.sync_status(theirs)
        assert status.reason == reasons["theirs"] and status.reason
        assert db.sync_status(mine) == ts.ObjectSyncStatus.SYNCED
        assert len(db.pending(Task)) == 0
        # the next write of it ends the refusal
        with db.write():
            again = db.add(Task(id="theirs", owner_id=d.user.id, summary="mine now"))
        assert db.sync_status(again) == ts.ObjectSyncStatus.PENDING
        await d.settle()
        assert db.sync_status(again) == ts.ObjectSyncStatus.SYNCED
    finally:
        await asyncio.to_thread(d.shutdown)
        proc.kill()


async def test_pending_empties_as_a_paused_session_resumes(device: Any) -> None:
    d = device("a")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    s.pause()
    items = []
    for i in range(5):
        with db.write():
            items.append(db.add(Item(id=f"i{i}", n=i)))
    pending = db.pending(Item)
    assert [i.id for i in pending] == [f"i{i}" for i in range(5)]
    assert [db.sync_status(i).version for i in items] == [1, 2, 3, 4, 5]
    assert [i.id for i in db.query(Item, "n >= 3 AND @pending == true")] == ["i3", "i4"]
    status = s.status
    assert status.pending_changes == 5 and status.pending_upload_bytes > 0
    assert "5 changes" in str(status) and str(status).startswith("offline since")
    sizes: list[int] = []
    lock = threading.Lock()

    def seen(change: ts.ResultsChange) -> None:
        with lock:
            sizes.append(len(change.results))

    token = pending.add_listener(seen)
    try:
        s.resume()
        await s.wait_for_upload(T(20))
        # the session knows at once (memory), the file within CURSOR_SAVE_DELAY
        assert all(db.sync_status(i) == ts.ObjectSyncStatus.SYNCED for i in items)
        await wait_until(lambda: len(db.pending(Item)) == 0, 10, "pending empty")
        await wait_until(lambda: sizes[-1:] == [0], 10, "the notification of the empty set")
    finally:
        token.cancel()
    assert len(pending) == 0
    status = s.status
    assert status.pending_changes == 0 and status.pending_upload_bytes == 0
    assert status.connection_state is CS.CONNECTED
    assert status.last_synced_at is not None
    assert str(status).startswith("online since") and "synced at" in str(status)


async def test_attempt_and_next_retry_follow_the_backoff(tmp_path: Path, device: Any) -> None:
    proc = ServerProcess(tmp_path / "down").start()
    slow = ts.SyncTimeoutOptions(
        connect_timeout=3,
        reconnect_initial_delay=0.4,
        reconnect_max_delay=1.6,
        ping_keep_alive_period=1,
        pong_keep_alive_timeout=2,
        connection_linger_time=1,
    )
    d = device("b", url=proc.url, timeouts=slow)
    try:
        db = await d.open()
        s = db.sync_session
        await wait_connected(s)
        assert s.status.attempt == 0 and s.status.next_retry_at is None
        proc.stop()
        with db.write():
            db.add(Item(id="offline"))
        seen: list[ts.SyncStatus] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = s.status
            if st.next_retry_at is not None and (not seen or st.attempt > seen[-1].attempt):
                seen.append(st)
                if st.attempt >= 4:
                    break
            await asyncio.sleep(0.02)
        assert [st.attempt for st in seen][-1] >= 4, [st.attempt for st in seen]
        attempts = [st.attempt for st in seen]
        assert attempts == sorted(attempts)
        now = dt.datetime.now(dt.UTC)
        for st in seen:
            assert st.connection_state is CS.DISCONNECTED
            assert st.last_error is not None and st.last_error.action is ts.SyncAction.RETRY
        last = seen[-1]
        left = (last.next_retry_at - now).total_seconds() if last.next_retry_at else -1
        assert -0.5 < left <= 1.6 + 0.1  # never more than the backoff's maximum
        text = str(last)
        assert text.startswith("offline since"), text
        assert "1 change (" in text and "waiting" in text and "next try in" in text, text
        assert f"(attempt {last.attempt}: " in text, text
    finally:
        proc.kill()


async def test_status_listener_and_iterator_are_rate_limited(device: Any) -> None:
    d = device("c")
    db = await d.open()
    s = db.sync_session
    await wait_connected(s)
    times: list[float] = []
    got: list[ts.SyncStatus] = []
    lock = threading.Lock()

    def heard(st: ts.SyncStatus) -> None:
        with lock:
            times.append(time.monotonic())
            got.append(st)

    token = s.add_status_listener(heard)
    stream = s.status_changes
    first: list[ts.SyncStatus] = []

    async def read_one() -> None:
        async for st in stream:
            first.append(st)
            break

    reader = asyncio.ensure_future(read_one())
    try:
        for i in range(200):
            with db.write():
                db.add(Item(id=f"r{i}"))
            if i % 20 == 0:
                await asyncio.sleep(0.01)
        await s.wait_for_upload(T(20))
        await asyncio.wait_for(reader, 10)
        await wait_until(
            lambda: bool(got) and got[-1].pending_changes == 0, 10, "a report of nothing pending"
        )
    finally:
        token.cancel()
        reader.cancel()
    assert first and isinstance(first[0], ts.SyncStatus)
    with lock:
        gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 2
    assert min(gaps) >= 0.09, gaps  # at most every 100 ms
    assert len(times) < 200  # merged
