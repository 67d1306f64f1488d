"""The change feed and webhooks on two ``tidesync serve`` processes sharing PostgreSQL: a
write through one process wakes a long poll and an SSE stream on the other; one process
at a time delivers a webhook, and when it dies the other takes over where it stopped.
Skipped unless ``TIDESYNC_TEST_PG_DSN`` names a PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.testing import ServerProcess

from .backend_helpers import (
    ADMIN_KEY,
    Receiver,
    SSEReader,
    Writer,
    admin,
    delivered_events,
    webhook_toml,
)
from .flex_helpers import eventually
from .test_flexsync_e2e import Task

pytestmark = pytest.mark.skipif(
    not os.environ.get("TIDESYNC_TEST_PG_DSN"), reason="TIDESYNC_TEST_PG_DSN is not set"
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def servers(tmp_path: Path, pg_url: str, receiver: Receiver) -> Iterator[list[ServerProcess]]:
    config = tmp_path / "tidesync.toml"
    config.write_text(
        f'[server]\ndevelopment_mode = true\nadmin_keys = ["{ADMIN_KEY}"]\n\n'
        '[apps.todo]\nauth = ["anonymous"]\nauto_confirm = true\n\n' + webhook_toml(receiver.url)
    )
    args = ["--storage", pg_url, "--config", str(config)]
    made = [ServerProcess(tmp_path / "server", extra_args=args) for _ in range(2)]
    try:
        for proc in made:  # one at a time: the first creates the secret
            proc.start()
        yield made
    finally:
        for proc in made:
            proc.kill()


async def hooks(client: httpx.AsyncClient, base: str) -> dict[str, Any]:
    answer = await client.get(f"{base}/api/v1/apps/todo/webhooks", headers=admin())
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["webhooks"][0])


async def test_feed_and_webhooks_across_two_processes(
    tmp_path: Path, servers: list[ServerProcess], receiver: Receiver
) -> None:
    one, two = servers
    w1 = Writer(tmp_path, "w1", one.url)
    w2 = Writer(tmp_path, "w2", two.url)
    try:
        db1 = await w1.open()
        await w2.open()
        async with httpx.AsyncClient(timeout=30) as client:
            url2 = f"{two.url}/api/v1/apps/todo/changes"
            start = (await client.get(url2, params={"since": "now"}, headers=admin())).json()
            poll = asyncio.ensure_future(
                client.get(url2, params={"since": start["next"], "wait": 20}, headers=admin())
            )
            await asyncio.sleep(0.3)
            with db1.write():  # committed by process 1
                db1.add(Task(id="x1"))
            began = time.monotonic()
            answer = await asyncio.wait_for(poll, 15)
            assert [e["pk"] for e in answer.json()["events"]] == ["x1"]
            assert time.monotonic() - began < 10
            stream_headers = {**admin(), "Accept": "text/event-stream"}
            params = {"since": answer.json()["next"]}
            async with client.stream("GET", url2, params=params, headers=stream_headers) as s:
                sse = SSEReader(s)
                with db1.write():
                    db1.add(Task(id="x2"))
                assert (await sse.next_event(15))["pk"] == "x2"

            # a reader switching processes mid-way skips nothing
            url1 = f"{one.url}/api/v1/apps/todo/changes"
            first = await client.get(url1, params={"limit": 1}, headers=admin())
            rest = await client.get(url2, params={"since": first.json()["next"]}, headers=admin())
            pks = [e["pk"] for e in first.json()["events"] + rest.json()["events"]]
            assert pks == ["x1", "x2"]

            # one process delivers the hook; the other stands by
            await eventually(lambda: [e["pk"] for e in delivered_events(receiver)] == ["x1", "x2"])
            states = [await hooks(client, p.url) for p in servers]
            here = [s["delivering_here"] for s in states]
            assert sorted(here) == [False, True], states
            deliverer = servers[here.index(True)]
            survivor = servers[here.index(False)]
            writer = w2 if survivor is two else w1
            deliverer.kill()  # dies holding the lease
            assert writer.db is not None
            with writer.db.write():
                writer.db.add(Task(id="x3"))
                writer.db.add(Task(id="x4"))
            await eventually(
                lambda: [e["pk"] for e in delivered_events(receiver)] == ["x1", "x2", "x3", "x4"],
                limit=30,
            )
            assert (await hooks(client, survivor.url))["delivering_here"]
            assert receiver.max_active == 1  # never two deliveries at once
    finally:
        w1.close()
        w2.close()
