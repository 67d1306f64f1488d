"""The change feed (``GET /api/v1/apps/{app}/changes``, docs/backend.md "Change feed"),
against real servers (in-process, or ``tidesync serve`` child processes), real SQLite files
and devices that write over real WebSockets: device writes appear in server order with
what they changed and who wrote them; long polls and SSE streams wake on commits; SSE
resumes with ``Last-Event-ID``; a restart loses nothing; trimmed history answers 410."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.server.config import ServerConfig
from tidesync.server.settings import AppSettings, AuthSettings
from tidesync.testing import ServerProcess, TestServer

from .backend_helpers import ADMIN_KEY, SSEReader, Writer, admin, read_all
from .flex_helpers import eventually
from .test_flexsync_e2e import Task


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestServer]:
    config = ServerConfig(auth=AuthSettings(admin_keys=(ADMIN_KEY,)))
    with TestServer(tmp_path / "server", config=config) as srv:
        yield srv


@pytest.fixture
async def writer(tmp_path: Path, server: TestServer) -> AsyncIterator[Writer]:
    w = Writer(tmp_path, "a", server.url)
    await w.open()
    yield w
    w.close()


def feed_url(base: str, app: str = "todo") -> str:
    return f"{base}/api/v1/apps/{app}/changes"


async def test_device_writes_appear_in_server_order_with_their_changes(
    server: TestServer, writer: Writer
) -> None:
    db = writer.db
    assert db is not None and writer.user is not None
    with db.write():
        db.add(Task(id="t1", summary="first", n=1))
        db.add(Task(id="t2", summary="second"))
    with db.write():
        db.find(Task, "t1").summary = "edited"
    with db.write():
        db.delete(db.find(Task, "t2"))
    await writer.settle()
    async with httpx.AsyncClient() as client:
        events, cursor = await read_all(client, feed_url(server.url))
        assert [(e["op"], e["pk"]) for e in events] == [
            ("create", "t1"),
            ("create", "t2"),
            ("update", "t1"),
            ("erase", "t2"),
        ]
        versions = [e["version"] for e in events]
        assert versions == sorted(versions) and versions[0] == versions[1] < versions[2]
        assert events[0]["fields"]["summary"] == "first" and events[0]["fields"]["n"] == 1
        assert events[2]["fields"] == {"summary": "edited"}
        assert events[3]["fields"] == {}
        for e in events:
            assert e["model"] == "Task"
            assert e["by"]["user_id"] == writer.user.id and e["by"]["origin"]
            assert e["at"].endswith("Z") and e["at"][:4].isdigit()
        assert cursor == str(versions[-1])
        # pages of whole changesets: limit=1 still gives both events of the first one
        first = await client.get(feed_url(server.url), params={"limit": 1}, headers=admin())
        assert [e["pk"] for e in first.json()["events"]] == ["t1", "t2"]
        # a user's token reads the same feed (no rules: everything)
        mine = await read_all(
            client, feed_url(server.url), headers={"Authorization": f"Bearer {writer.token}"}
        )
        assert mine[0] == events
        # models= and query= filter (query on the current values)
        some = await client.get(
            feed_url(server.url),
            params={"models": "Task", "query": "summary == 'edited'"},
            headers=admin(),
        )
        assert [(e["op"], e["pk"]) for e in some.json()["events"]] == [
            ("create", "t1"),
            ("update", "t1"),
            ("erase", "t2"),  # erases pass a query (their object has no values left)
        ]


async def test_long_poll_wakes_on_a_commit(server: TestServer, writer: Writer) -> None:
    db = writer.db
    assert db is not None
    async with httpx.AsyncClient(timeout=30) as client:
        latest = await client.get(feed_url(server.url), params={"since": "now"}, headers=admin())
        cursor = latest.json()["next"]
        started = time.monotonic()
        empty = await client.get(
            feed_url(server.url), params={"since": cursor, "wait": 0.3}, headers=admin()
        )
        assert empty.json() == {"events": [], "next": cursor}
        assert time.monotonic() - started >= 0.3
        poll = asyncio.ensure_future(
            client.get(feed_url(server.url), params={"since": cursor, "wait": 20}, headers=admin())
        )
        await asyncio.sleep(0.3)
        assert not poll.done()
        with db.write():
            db.add(Task(id="late", n=5))
        started = time.monotonic()
        answer = await asyncio.wait_for(poll, 10)
        assert time.monotonic() - started < 5
        assert [e["pk"] for e in answer.json()["events"]] == ["late"]


async def test_sse_streams_events_and_resumes_from_last_event_id(
    server: TestServer, writer: Writer
) -> None:
    db = writer.db
    assert db is not None
    with db.write():
        db.add(Task(id="s1"))
        db.add(Task(id="s2"))
    await writer.settle()
    headers = {**admin(), "Accept": "text/event-stream"}
    url = feed_url(server.url)
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", url, params={"since": "0"}, headers=headers) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            sse = SSEReader(stream)
            got = [(await sse.next_event())["pk"], (await sse.next_event())["pk"]]
            assert got == ["s1", "s2"]
            resume_at = sse.last_id
            assert resume_at is not None
            with db.write():
                db.add(Task(id="s3"))
            live = await sse.next_event()
            assert live["pk"] == "s3" and sse.last_id == str(live["version"])
        # gone for a while: two more writes, then resume with Last-Event-ID
        with db.write():
            db.add(Task(id="s4"))
        with db.write():
            db.find(Task, "s4").n = 4
        await writer.settle()
        resumed = {**headers, "Last-Event-ID": resume_at}
        async with client.stream("GET", url, headers=resumed) as stream:
            sse = SSEReader(stream)
            got = [(await sse.next_event())["pk"] for _ in range(3)]
            assert got == ["s3", "s4", "s4"]


async def test_bad_requests_are_clear_4xx(server: TestServer, writer: Writer) -> None:
    url = feed_url(server.url)
    async with httpx.AsyncClient() as client:

        async def refusal(params: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
            answer = await client.get(
                url, params=params, headers=admin() if headers is None else headers
            )
            assert 400 <= answer.status_code < 500, answer.text
            return answer.status_code, answer.json()

        status, body = await refusal({"models": "Task,Nope"})
        assert status == 400 and body["code"] == "unknown_model" and "Nope" in body["error"]
        status, body = await refusal({"models": "Task", "query": "n >> 3"})
        assert status == 400 and body["code"] == "bad_query" and "position" in body["error"]
        status, body = await refusal({"models": "Task", "query": "nope == 3"})
        assert status == 400 and "nope" in body["error"]
        status, body = await refusal({"query": "n == 3"})
        assert status == 400 and "models" in body["error"]
        status, body = await refusal({"since": "abc"})
        assert status == 400 and body["code"] == "bad_cursor"
        status, body = await refusal({"since": "999999"})
        assert status == 400 and body["code"] == "bad_cursor"
        status, body = await refusal({"wait": "600"})
        assert status == 400 and "wait" in body["error"]
        status, body = await refusal({}, headers={})
        assert status == 401 and body["code"] == "invalid_token"
        status, body = await refusal({}, headers={"Authorization": "Bearer wrong-key"})
        assert status == 401
        other = await client.get(
            feed_url(server.url, "other-app"),
            headers={"Authorization": f"Bearer {writer.token}"},
        )
        assert other.status_code == 401  # another app's token
        # the server keeps serving
        assert (await client.get(url, headers=admin())).status_code == 200


async def test_trimmed_history_answers_410_with_the_oldest_cursor(tmp_path: Path) -> None:
    config = ServerConfig(auth=AuthSettings(admin_keys=(ADMIN_KEY,)), history_retention=0.3)
    with TestServer(tmp_path / "server", config=config) as server:
        w = Writer(tmp_path, "a", server.url)
        try:
            db = await w.open()
            for i in range(3):
                with db.write():
                    db.add(Task(id=f"old{i}"))
            await w.settle()
            url = feed_url(server.url)
            async with httpx.AsyncClient() as client:
                deadline = time.monotonic() + 20
                while True:  # the trimmer runs every retention / 4
                    answer = await client.get(url, params={"since": "0"}, headers=admin())
                    if answer.status_code == 410 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert answer.status_code == 410, answer.text
                body = answer.json()
                assert body["code"] == "history_trimmed" and int(body["oldest"]) >= 3
                with db.write():
                    db.add(Task(id="new"))
                await w.settle()
                since_oldest = await client.get(
                    url, params={"since": body["oldest"]}, headers=admin()
                )
                assert since_oldest.status_code in (200, 410)
                no_since = await client.get(url, headers=admin())  # from the oldest kept
                assert no_since.status_code == 200
                assert "old0" not in [e["pk"] for e in no_since.json()["events"]]
        finally:
            w.close()


async def test_feed_across_a_server_restart_loses_nothing(tmp_path: Path) -> None:
    config = tmp_path / "tidesync.toml"
    config.write_text(f'[server]\ndevelopment_mode = true\nadmin_keys = ["{ADMIN_KEY}"]\n')
    proc = ServerProcess(tmp_path / "server", extra_args=["--config", str(config)])
    proc.start()
    w = Writer(tmp_path, "a", proc.url)
    try:
        db = await w.open()
        url = feed_url(proc.url)
        with db.write():
            db.add(Task(id="before"))
        await w.settle()
        async with httpx.AsyncClient(timeout=30) as client:
            events, cursor = await read_all(client, url)
            assert [e["pk"] for e in events] == ["before"]
            proc.stop()
            with db.write():  # offline meanwhile: uploaded after the restart
                db.add(Task(id="offline"))
            proc.start()
            with db.write():
                db.add(Task(id="after"))
            await w.settle()
            later, _ = await read_all(client, url, since=cursor)
            assert [e["pk"] for e in later] == ["offline", "after"]
            everything, _ = await read_all(client, url)
            assert [e["pk"] for e in everything] == ["before", "offline", "after"]
    finally:
        w.close()
        proc.stop()


async def test_rules_filter_a_user_tokens_feed(tmp_path: Path) -> None:
    rules = {
        "Task": {"read": "owner_id == $user.id OR shared == true", "write": "owner_id == $user.id"}
    }
    app = AppSettings("todo", ("anonymous",), rules=rules)
    config = ServerConfig(development_mode=False, auth=AuthSettings({"todo": app}, (ADMIN_KEY,)))
    with TestServer(tmp_path / "server", config=config) as server:
        u1, u2 = Writer(tmp_path, "u1", server.url), Writer(tmp_path, "u2", server.url)
        try:
            db1, db2 = await u1.open(), await u2.open()
            assert u1.user is not None and u2.user is not None
            me, other = u1.user.id, u2.user.id
            with db2.write():
                db2.add(Task(id="secret", owner_id=other))
                db2.add(Task(id="public", owner_id=other, shared=True))
            await u2.settle()
            with db1.write():
                db1.add(Task(id="mine", owner_id=me))
            await u1.settle()
            with db2.write():
                db2.find(Task, "secret").summary = "still secret"
                db2.delete(db2.find(Task, "public"))  # u1 cannot tell it from a secret erase
            await u2.settle()
            async with httpx.AsyncClient() as client:
                url = feed_url(server.url)
                everything, _ = await read_all(client, url)
                assert [(e["op"], e["pk"]) for e in everything] == [
                    ("create", "secret"),
                    ("create", "public"),
                    ("create", "mine"),
                    ("update", "secret"),
                    ("erase", "public"),
                ]
                seen, _ = await read_all(
                    client, url, headers={"Authorization": f"Bearer {u1.token}"}
                )
                assert [(e["op"], e["pk"]) for e in seen] == [("create", "mine")]
                theirs, _ = await read_all(
                    client, url, headers={"Authorization": f"Bearer {u2.token}"}
                )
                assert [e["pk"] for e in theirs] == ["secret", "secret"]
                assert theirs[0]["by"]["user_id"] == other
        finally:
            u1.close()
            u2.close()


async def test_streams_end_when_the_client_goes_or_the_server_stops(
    tmp_path: Path, server: TestServer, writer: Writer
) -> None:
    hub = server.server.hub
    url = feed_url(server.url)
    headers = {**admin(), "Accept": "text/event-stream"}
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", url, headers=headers) as stream:
            assert stream.status_code == 200
            await eventually(lambda: hub.listener_count("todo") == 1)
        await eventually(lambda: hub.listener_count("todo") == 0)  # the client went
        poll = asyncio.ensure_future(
            client.get(url, params={"since": "now", "wait": 30}, headers=admin())
        )
        async with client.stream("GET", url, headers=headers) as stream:
            lines = stream.aiter_lines()
            assert await anext(lines) == "retry: 1000"
            await eventually(lambda: hub.listener_count("todo") == 2)
            began = time.monotonic()
            await asyncio.to_thread(server.stop)
            rest = [line async for line in lines]  # the stream ends
            assert all(not line or line.startswith((":", "id:", "data:")) for line in rest)
        answer = await asyncio.wait_for(poll, 10)  # the long poll answered, not cut
        assert answer.status_code == 200 and answer.json()["events"] == []
        assert time.monotonic() - began < 10
        assert hub.listener_count("todo") == 0


async def test_a_quiet_stream_sends_heartbeats(
    server: TestServer, writer: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tidesync.server.api import changes

    monkeypatch.setattr(changes, "HEARTBEAT_SECONDS", 0.2)
    headers = {**admin(), "Accept": "text/event-stream"}
    async with httpx.AsyncClient(timeout=30) as client:
        url = feed_url(server.url)
        async with client.stream("GET", url, params={"since": "now"}, headers=headers) as stream:
            lines = stream.aiter_lines()
            beats = 0
            async with asyncio.timeout(10):
                async for line in lines:
                    beats += line == ": heartbeat"
                    if beats == 2:
                        break
            assert beats == 2


async def test_a_users_stream_ends_when_its_access_token_expires(tmp_path: Path) -> None:
    config = ServerConfig(auth=AuthSettings(admin_keys=(ADMIN_KEY,)), access_token_ttl=1.5)
    with TestServer(tmp_path / "server", config=config) as server:
        w = Writer(tmp_path, "a", server.url)
        try:
            await w.open()
            headers = {"Authorization": f"Bearer {w.token}", "Accept": "text/event-stream"}
            async with httpx.AsyncClient(timeout=30) as client:
                url = feed_url(server.url)
                async with client.stream("GET", url, headers=headers) as stream:
                    assert stream.status_code == 200
                    async with asyncio.timeout(10):
                        lines = [line async for line in stream.aiter_lines()]
            assert "event: error" in lines
            error = next(line for line in lines if line.startswith("data:"))
            assert "invalid_token" in error and "expired" in error
            assert server.server.hub.listener_count("todo") == 0
        finally:
            w.close()
