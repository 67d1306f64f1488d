"""Webhooks (docs/backend.md, "Webhooks"): device writes reach a real HTTP receiver as
signed batches of change feed events, in order and at least once, through a receiver that
answers 500, is too slow or is down for a while; a hook pauses after its failures and
resumes; a restart resumes the same batch under the same delivery id."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.errors import ConfigurationError
from tidesync.server.config import ServerConfig
from tidesync.server.settings import (
    DEV_PROVIDERS,
    AppSettings,
    AuthSettings,
    WebhookSettings,
    parse_config,
)
from tidesync.testing import ServerProcess, TestServer

from .backend_helpers import (
    ADMIN_KEY,
    SECRET,
    Receiver,
    Writer,
    admin,
    delivered_events,
    eventually_async,
    verify,
    webhook_toml,
)
from .flex_helpers import eventually
from .test_flexsync_e2e import Task


def hook_config(url: str, **options: Any) -> ServerConfig:
    settings: dict[str, Any] = {
        "timeout": 0.5,
        "retry_initial": 0.05,
        "retry_max": 0.2,
        "max_failures": 1000,
        "start": "beginning",
        **options,
    }
    hook = WebhookSettings(url=url, models=("Task",), secret=SECRET, **settings)
    app = AppSettings("todo", DEV_PROVIDERS, auto_confirm=True, webhooks=(hook,))
    return ServerConfig(auth=AuthSettings({"todo": app}, (ADMIN_KEY,)))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


async def call(method: str, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, url, headers=admin() if headers is None else headers)


async def status(base: str) -> dict[str, Any]:
    answer = await call("GET", f"{base}/api/v1/apps/todo/webhooks")
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["webhooks"][0])


async def metrics(base: str) -> str:
    return (await call("GET", f"{base}/metrics")).text


async def _failures_at_least(base: str, n: int) -> bool:
    return int((await status(base))["failures"]) >= n


async def _in_state(base: str, state: str) -> bool:
    return (await status(base))["state"] == state


def write(w: Writer, *pks: str) -> None:
    assert w.db is not None
    with w.db.write():
        for pk in pks:
            w.db.add(Task(id=pk))


def attempts(r: Receiver, status_code: int | None = None) -> int:
    return sum(1 for *_, s in r.all() if status_code is None or s == status_code)


async def test_every_change_arrives_in_order_through_500s_timeouts_and_downtime(
    tmp_path: Path, receiver: Receiver
) -> None:
    receivers = [receiver]
    with TestServer(tmp_path / "server", config=hook_config(receiver.url)) as server:
        w = Writer(tmp_path, "a", server.url)
        try:
            await w.open()
            receiver.mode = "fail"
            write(w, "a1")
            write(w, "a2", "a3")
            await eventually(lambda: attempts(receiver, 500) >= 3)
            receiver.slow_seconds = 1.0  # past the hook's 0.5 s timeout
            receiver.mode = "slow"
            write(w, "b1")
            await eventually(lambda: attempts(receiver, 200) >= 2)  # answered too late
            receiver.stop()  # down
            write(w, "c1")
            write(w, "c2")
            await w.settle()
            await eventually_async(lambda: _failures_at_least(server.url, 8))
            assert "ConnectError" in ((await status(server.url))["last_error"] or "")
            back = Receiver(receiver.port)  # up again, on the same address
            receivers.append(back)
            await eventually(
                lambda: [e["pk"] for e in delivered_events(back)][-1:] == ["c2"], limit=20
            )
            every = [r for rec in receivers for r in rec.all()]
            for _, _, headers, raw, _ in every:
                assert verify(SECRET, headers, raw)
            merged = Receiver.__new__(Receiver)  # the deliveries of both, in arrival order
            merged.requests, merged.lock = every, back.lock
            events = delivered_events(merged)
            assert [e["pk"] for e in events] == ["a1", "a2", "a3", "b1", "c1", "c2"]
            versions = [e["version"] for e in events]
            assert versions == sorted(versions)
            ids = [d for d, *_ in every]
            assert len(set(ids)) < len(ids)  # retries came again under the same id
            now = await status(server.url)
            assert now["state"] == "active" and now["failures"] == 0
            assert now["last_error"] is None and now["cursor"] == str(versions[-1])
            assert "tidesync_webhook_failures_total" in await metrics(server.url)
        finally:
            w.close()
            for r in receivers[1:]:
                r.stop()


async def test_a_hook_pauses_after_its_failures_and_resumes(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = hook_config(receiver.url, max_failures=3)
    with TestServer(tmp_path / "server", config=config) as server:
        w = Writer(tmp_path, "a", server.url)
        try:
            await w.open()
            receiver.mode = "fail"
            write(w, "p1")
            await eventually_async(lambda: _in_state(server.url, "paused"))
            paused = await status(server.url)
            assert paused["failures"] == 3 and "500" in paused["last_error"]
            text = await metrics(server.url)
            assert "tidesync_webhooks_paused 1" in text
            assert "tidesync_webhook_pauses_total 1" in text
            seen = attempts(receiver)
            assert seen == 3
            write(w, "p2")
            await w.settle()
            await asyncio.sleep(0.5)
            assert attempts(receiver) == seen  # paused: nothing sent
            user = {"Authorization": f"Bearer {w.token}"}
            url = f"{server.url}/api/v1/apps/todo/webhooks"
            assert (await call("GET", url, user)).status_code == 403
            assert (await call("POST", f"{url}/7/resume")).status_code == 404
            receiver.mode = "ok"
            resumed = await call("POST", f"{url}/0/resume")
            assert resumed.status_code == 200 and resumed.json()["state"] == "active"
            await eventually(lambda: [e["pk"] for e in delivered_events(receiver)] == ["p1", "p2"])
            assert "tidesync_webhooks_paused 0" in await metrics(server.url)
        finally:
            w.close()


async def test_a_restart_retries_the_same_batch_under_the_same_delivery_id(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = tmp_path / "tidesync.toml"
    config.write_text(
        f'[server]\ndevelopment_mode = true\nadmin_keys = ["{ADMIN_KEY}"]\n\n'
        '[apps.todo]\nauth = ["anonymous"]\nauto_confirm = true\n\n' + webhook_toml(receiver.url)
    )
    proc = ServerProcess(tmp_path / "server", extra_args=["--config", str(config)])
    proc.start()
    w = Writer(tmp_path, "a", proc.url)
    try:
        await w.open()
        receiver.mode = "fail"
        write(w, "r1")
        await eventually(lambda: attempts(receiver) >= 2)
        first_id = receiver.all()[0][0]
        assert {d for d, *_ in receiver.all()} == {first_id}
        proc.stop()
        receiver.mode = "ok"
        proc.start()
        await eventually(lambda: len(receiver.accepted()) == 1)
        assert receiver.accepted()[0][0] == first_id  # the same batch, the same id
        write(w, "r2")
        await eventually(lambda: len(receiver.accepted()) == 2)
        proc.stop()
        proc.start()  # delivered batches are not sent again
        write(w, "r3")
        await eventually(lambda: len(receiver.accepted()) == 3)
        assert [e["pk"] for e in delivered_events(receiver)] == ["r1", "r2", "r3"]
        ids = [d for d, _ in receiver.accepted()]
        assert len(set(ids)) == 3
    finally:
        w.close()
        proc.stop()


def test_webhook_settings_are_checked_at_load(tmp_path: Path) -> None:
    def load(hook: str) -> Any:
        import tomllib

        raw = tomllib.loads(
            f'[apps.todo]\nauth = ["anonymous"]\n\n[apps.todo.schema.Task]\n'
            f'primary_key = "id"\nfields = {{ id = "str", n = "int" }}\n\n'
            f"[[apps.todo.webhooks]]\n{hook}"
        )
        return parse_config(raw, tmp_path)

    good = f'url = "https://example.com/h"\nmodels = ["Task"]\nsecret = "{SECRET}"\n'
    hook = load(good + 'query = "n > 3"\ntimeout = 2\n').auth.apps["todo"].webhooks[0]
    assert hook.models == ("Task",) and hook.query == "n > 3" and hook.timeout == 2.0
    assert hook.max_failures == 10 and hook.start == "now"
    bad = {
        good + "colour = 1\n": "unknown key(s) in [apps.todo.webhooks[0]]: colour",
        good.replace("https://example.com/h", "ftp://x"): "url must be an http",
        f'url = "http://x"\nsecret = "{SECRET}"\n': "models is missing",
        good.replace('["Task"]', '["Nope"]'): "does not declare: Nope",
        good.replace(SECRET, "short"): "at least 16 characters",
        good + 'query = "n >>"\n': "query",
        good + 'query = "zz == 1"\n': "zz",
        good + "timeout = -1\n": "timeout must be a positive number",
        good + "max_failures = 0\n": "max_failures must be a positive integer",
        good + 'start = "later"\n': "start must be 'now' or 'beginning'",
        good + "retry_initial = 5\nretry_max = 1\n": "retry_max must not be below",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            load(text)


async def test_a_dead_or_slow_receiver_holds_up_neither_sync_nor_other_hooks(
    tmp_path: Path, receiver: Receiver
) -> None:
    slow = Receiver()
    slow.mode, slow.slow_seconds = "slow", 3.0
    dead = Receiver()
    dead.stop()  # nothing listens there any more
    options = {"retry_initial": 0.05, "retry_max": 0.2, "max_failures": 1000, "start": "beginning"}
    hooks = (
        WebhookSettings(dead.url, ("Task",), SECRET, timeout=2.0, **options),
        WebhookSettings(slow.url, ("Task",), SECRET, timeout=2.0, **options),
        WebhookSettings(receiver.url, ("Task",), SECRET, "n > 5", timeout=2.0, **options),
    )
    app = AppSettings("todo", DEV_PROVIDERS, auto_confirm=True, webhooks=hooks)
    config = ServerConfig(auth=AuthSettings({"todo": app}, (ADMIN_KEY,)))
    with TestServer(tmp_path / "server", config=config) as server:
        a, b = Writer(tmp_path, "a", server.url), Writer(tmp_path, "b", server.url)
        try:
            await a.open()
            db_b = await b.open()
            with db_b.subscriptions.update() as subs:
                subs.add(db_b.query(Task, "TRUEPREDICATE"), name="all")
            assert a.db is not None
            began = time.monotonic()
            for i in range(10):
                with a.db.write():
                    a.db.add(Task(id=f"k{i}", n=i))
            await eventually(lambda: len(list(db_b.all(Task))) == 10, limit=20)
            synced = time.monotonic() - began
            await eventually(
                lambda: [e["pk"] for e in delivered_events(receiver)] == ["k6", "k7", "k8", "k9"],
                limit=20,
            )
            delivered = time.monotonic() - began
            assert synced < 2.0 and delivered < 2.0, (synced, delivered)  # not held 2-3 s
            assert slow.max_active >= 1  # the slow one was being held up meanwhile
        finally:
            a.close()
            b.close()
            slow.stop()


async def test_a_hook_behind_trimmed_history_pauses_and_resumes_from_the_oldest(
    tmp_path: Path, receiver: Receiver
) -> None:
    hook = WebhookSettings(
        receiver.url,
        ("Task",),
        SECRET,
        timeout=0.5,
        retry_initial=0.05,
        retry_max=0.1,
        max_failures=1000,
        start="beginning",
    )
    app = AppSettings("todo", DEV_PROVIDERS, auto_confirm=True, webhooks=(hook,))
    config = ServerConfig(auth=AuthSettings({"todo": app}, (ADMIN_KEY,)), history_retention=1.0)
    with TestServer(tmp_path / "server", config=config) as server:
        w = Writer(tmp_path, "a", server.url)
        try:
            await w.open()
            receiver.mode = "fail"
            write(w, "h1")
            await eventually(lambda: attempts(receiver) >= 1)
            write(w, "h2")  # after the batch in flight: trimmed before it is delivered
            write(w, "h3")
            await w.settle()
            await asyncio.sleep(1.8)  # retention 1 s: the history is trimmed meanwhile
            receiver.mode = "ok"
            await eventually_async(lambda: _in_state(server.url, "paused"))
            paused = await status(server.url)
            assert "trimmed" in paused["last_error"] and "lost" in paused["last_error"]
            assert [e["pk"] for e in delivered_events(receiver)] == ["h1"]
            url = f"{server.url}/api/v1/apps/todo/webhooks/0/resume"
            assert (await call("POST", url)).status_code == 200
            write(w, "h4")
            await eventually(lambda: [e["pk"] for e in delivered_events(receiver)][-1:] == ["h4"])
            assert "h2" not in [e["pk"] for e in delivered_events(receiver)]
        finally:
            w.close()
