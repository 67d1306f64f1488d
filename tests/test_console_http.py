"""The web console over plain HTTP against a real server: who may sign in, the cookie,
CSRF on every POST, escaping of hostile values, the sessions stream, export, and the
time a page of 1,000 sessions takes to render."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.server.config import ServerConfig
from tidesync.server.console import console_for
from tidesync.server.settings import load_config
from tidesync.server.snapshot import ACTIVE, SessionSnapshot
from tidesync.testing import TestServer

from .api_helpers import ADMIN_KEY, Device, admin, write_config
from .console_helpers import csrf_of, sign_in

BASE = "/api/v1/apps/todo/data"
HOSTILE = ["<script>window.pwned = 1</script>", '"><img src=x onerror="window.pwned=2">']


def task(pk: str, **values: Any) -> dict[str, Any]:
    return {"id": pk, "owner_id": "", "summary": "", "n": 0, "shared": False, **values}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    root = tmp_path_factory.mktemp("console-http")
    config = load_config(write_config(root))
    with TestServer(root / "server", config=config) as srv:
        yield srv


@pytest.fixture
async def browser(server: TestServer) -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client, not signed in."""
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        yield client


@pytest.fixture
async def api(server: TestServer) -> AsyncIterator[httpx.AsyncClient]:
    async with admin(server.url) as client:
        yield client


async def test_sign_in_sets_a_strict_http_only_cookie_and_no_secret_in_urls(
    browser: httpx.AsyncClient,
) -> None:
    assert (await browser.get("/admin/")).headers["location"] == "/admin/signin"
    form = await browser.get("/admin/signin")
    wrong = await browser.post(
        "/admin/signin", data={"csrf": csrf_of(form.text), "key": "not-the-admin-key-at-all"}
    )
    assert wrong.status_code == 403 and "not an admin key" in wrong.text
    good = await browser.post("/admin/signin", data={"csrf": csrf_of(form.text), "key": ADMIN_KEY})
    assert good.status_code == 303 and good.headers["location"] == "/admin/"
    cookie = good.headers["set-cookie"]
    assert "tidesync_console=" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert ADMIN_KEY not in good.headers["location"] and ADMIN_KEY not in cookie
    page = await browser.get("/admin/")
    assert page.status_code == 200 and "Overview" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    out = await browser.post("/admin/signout", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303
    assert (await browser.get("/admin/")).status_code == 303  # signed out


async def test_the_sign_in_form_needs_its_own_token(browser: httpx.AsyncClient) -> None:
    # a cross-site form cannot sign a browser in with the attacker's key (login CSRF)
    answer = await browser.post("/admin/signin", data={"key": ADMIN_KEY})
    assert answer.status_code == 403 and "CSRF" in answer.text
    await browser.get("/admin/signin")  # the pre-session cookie, but a made-up token
    answer = await browser.post("/admin/signin", data={"key": ADMIN_KEY, "csrf": "guess"})
    assert answer.status_code == 403


async def test_posts_without_the_csrf_token_are_refused(
    browser: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    assert (await api.post(f"{BASE}/Task", json=task("csrf-1", summary="kept"))).status_code == 200
    csrf = await sign_in(browser)
    edit = "/admin/data/todo/Task/object/edit"
    delete = "/admin/data/todo/Task/object/delete"
    for path, form in [
        (edit, {"pk": "csrf-1", "field": "summary", "value": "changed"}),
        (delete, {"pk": "csrf-1"}),
        ("/admin/users/disable", {"app": "todo", "user": "someone"}),
        ("/admin/users/delete", {"app": "todo", "user": "someone"}),
        ("/admin/signout", {}),
    ]:
        missing = await browser.post(path, data=form)
        assert missing.status_code == 403 and "CSRF" in missing.text, path
        wrong = await browser.post(path, data={**form, "csrf": csrf[:-2] + "xx"})
        assert wrong.status_code == 403, path
    assert (await api.get(f"{BASE}/Task/csrf-1")).json()["summary"] == "kept"
    # without a session at all, a POST is refused too (not redirected)
    async with httpx.AsyncClient(base_url=str(browser.base_url)) as stranger:
        answer = await stranger.post(delete, data={"pk": "csrf-1", "csrf": csrf})
        assert answer.status_code == 403
    assert (await api.get(f"{BASE}/Task/csrf-1")).status_code == 200
    # with the token, the same edit goes through
    done = await browser.post(
        edit, data={"pk": "csrf-1", "field": "summary", "value": "new", "csrf": csrf}
    )
    assert done.status_code == 200 and "Saved summary" in done.text
    assert (await api.get(f"{BASE}/Task/csrf-1")).json()["summary"] == "new"


async def test_hostile_values_are_escaped(
    browser: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    for i, text in enumerate(HOSTILE):
        made = await api.post(
            f"{BASE}/Task", json=task(f"evil-{i}{text}", summary=text, owner_id=text)
        )
        assert made.status_code == 200, made.text
    await sign_in(browser)
    table = await browser.get("/admin/data/todo/Task", params={"query": "id BEGINSWITH 'evil-'"})
    assert table.status_code == 200
    one = await browser.get("/admin/data/todo/Task/object", params={"pk": f"evil-1{HOSTILE[1]}"})
    assert one.status_code == 200, one.text
    app = await browser.get("/admin/data/" + "%3Cb%20onclick%3Dalert(1)%3Eapp")
    for page in (table, one, app):
        for text in [*HOSTILE, "<b onclick"]:
            assert text not in page.text
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in table.text
    assert "&#34;&gt;&lt;img src=x onerror=&#34;window.pwned=2&#34;&gt;" in one.text
    assert "&lt;b onclick=alert(1)&gt;app" in app.text


async def test_query_errors_show_the_parsers_message_and_export_follows_the_query(
    browser: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    rows = [task(f"exp-{i}", summary=f"row {i}", n=i) for i in range(5)]
    assert (await api.post(f"{BASE}/Task", json=rows)).status_code == 200
    await sign_in(browser)
    bad = await browser.get("/admin/data/todo/Task", params={"query": "n >>= 3"})
    assert bad.status_code == 400 and 'id="query-error"' in bad.text
    assert 'value="n &gt;&gt;= 3"' in bad.text  # the query stays in its field
    params = {"query": "id BEGINSWITH 'exp-' AND n >= 3", "format": "jsonl"}
    jsonl = await browser.get("/admin/data/todo/Task/export", params=params)
    assert jsonl.status_code == 200
    assert sorted(json.loads(line)["n"] for line in jsonl.text.splitlines()) == [3, 4]
    csv_text = (
        await browser.get("/admin/data/todo/Task/export", params={**params, "format": "csv"})
    ).text
    lines = csv_text.splitlines()
    assert lines[0] == "id,owner_id,summary,n,shared" and len(lines) == 3
    paged = await browser.get("/admin/data/todo/Task", params={"query": "id BEGINSWITH 'exp-'"})
    assert paged.text.count("/object?pk=exp-") == 5


async def test_sessions_page_and_stream_show_a_device(
    server: TestServer, browser: httpx.AsyncClient, tmp_path: Path
) -> None:
    await sign_in(browser)
    device = Device(tmp_path, "phone", server.url)
    try:
        await device.open("summary == 'phone'")
        page = await browser.get("/admin/sessions", params={"user": device.user_id})
        assert page.status_code == 200 and device.user_id in page.text
        assert "Task: summary == &#39;phone&#39;" in page.text and ">active<" in page.text
        async with browser.stream(
            "GET", "/admin/sessions/events", params={"app": "todo", "user": device.user_id}
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    assert device.user_id in json.loads(line[6:])["html"]
                    break
        # another stream ends when the console session does
        async with browser.stream("GET", "/admin/sessions/events") as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("event: rows")
            page = await browser.get("/admin/")
            await browser.post("/admin/signout", data={"csrf": csrf_of(page.text)})
            rest = [line async for line in lines]  # ends within a second
            assert len(rest) < 10
        await sign_in(browser)
        assert device.db is not None
        device.db.sync_session.pause()

        async def ended() -> bool:
            text = (await browser.get("/admin/sessions", params={"user": device.user_id})).text
            return ">disconnected " in text or ">unbound " in text

        await eventually_async(ended)
    finally:
        device.shutdown()


async def eventually_async(check: Any) -> None:
    """Until ``await check()`` is true (at most 20 s)."""
    deadline = time.monotonic() + 20.0
    while not await check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.1)


def test_no_console_in_production_mode_without_an_admin_key(tmp_path: Path) -> None:
    path = tmp_path / "prod.toml"
    path.write_text('[apps.todo]\nauth = ["anonymous"]\n')
    config = load_config(path)
    assert console_for(config) is None
    with TestServer(tmp_path / "server", config=config) as srv:
        answer = httpx.get(f"{srv.url}/admin/", follow_redirects=False)
        assert answer.status_code == 404
        assert httpx.get(f"{srv.url}/admin/signin").status_code == 404


def test_the_development_link_signs_in_once(tmp_path: Path) -> None:
    with TestServer(tmp_path / "server", config=ServerConfig()) as srv:
        link = srv.server.console_link
        assert link is not None and "/admin/signin?token=" in link
        with httpx.Client() as client:
            answer = client.get(link)
            assert answer.status_code == 303 and answer.headers["location"] == "/admin/"
            assert client.get(f"{srv.url}/admin/sessions").status_code == 200
        assert srv.server.console_link is None
        with httpx.Client() as other:
            assert other.get(link).status_code == 403


def test_a_page_of_1000_sessions_renders_fast() -> None:
    console = console_for(ServerConfig())
    assert console is not None
    now = time.time()
    rows = [
        SessionSnapshot(
            "todo",
            f"c{i}",
            f"user-{i}",
            f"file-{i:08x}",
            1,
            ACTIVE,
            now,
            None,
            3,
            i,
            i + 5,
            i,
            (f"Task: owner_id == 'user-{i}'",),
            None,
        )
        for i in range(1000)
    ]
    context = {
        "csrf": "t",
        "nav": "sessions",
        "rows": rows,
        "user": "",
        "app": "",
        "apps": ["todo"],
        "stream": "/admin/sessions/events",
    }
    console.html("sessions.html", context)  # templates compiled once
    took = []
    for _ in range(5):
        start = time.perf_counter()
        html = console.html("sessions.html", context)
        took.append(time.perf_counter() - start)
    assert html.count("<tr class=") == 1000
    print(f"1,000 sessions rendered in {min(took) * 1000:.1f} ms (best of 5)")
    assert min(took) < 0.2


async def test_serve_prints_a_one_time_console_link_after_the_ready_line(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tidesync.cli", "serve", "--port", "0", "--data",
        str(tmp_path / "data"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert ready.startswith("tidesync serving on http://127.0.0.1:")
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        prefix = "tidesync console (one-time sign-in link): "
        assert line.startswith(prefix + ready.split()[-1] + "/admin/signin?token="), line
        async with httpx.AsyncClient() as client:
            answer = await client.get(line[len(prefix) :])
            assert answer.status_code == 303 and "token" not in answer.headers["location"]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def test_an_open_sessions_stream_does_not_hold_up_stopping(tmp_path: Path) -> None:
    srv = TestServer(tmp_path / "server", config=ServerConfig()).start()
    try:
        link = srv.server.console_link
        assert link is not None
        async with httpx.AsyncClient(base_url=srv.url, timeout=20) as client:
            assert (await client.get(link)).status_code == 303
            async with client.stream("GET", "/admin/sessions/events") as stream:
                lines = stream.aiter_lines()
                assert (await anext(lines)).startswith("event: rows")
                start = time.monotonic()
                await asyncio.to_thread(srv.stop)
                assert time.monotonic() - start < 4.0  # not the 5 s shutdown grace
    finally:
        srv.stop()


async def test_two_processes_on_postgresql_each_serve_the_console(
    tmp_path: Path, pg_url: str
) -> None:
    config = dataclasses.replace(load_config(write_config(tmp_path)), storage_url=pg_url)
    with (
        TestServer(tmp_path / "a", config=config) as a,
        TestServer(tmp_path / "b", config=config) as b,
    ):
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=20) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=20) as on_b,
            admin(b.url) as api_b,
        ):
            made = await api_b.post(f"{BASE}/Task", json=task("pg-1", summary="via b"))
            assert made.status_code == 200, made.text
            csrf = await sign_in(on_a)
            assert "PostgresStorage" in (await on_a.get("/admin/")).text
            edit = {"pk": "pg-1", "field": "summary", "value": "via a", "csrf": csrf}
            done = await on_a.post("/admin/data/todo/Task/object/edit", data=edit)
            assert done.status_code == 200 and "Saved summary" in done.text
            assert (await api_b.get(f"{BASE}/Task/pg-1")).json()["summary"] == "via a"
            # console sessions belong to the process that made them
            on_b.cookies.update(on_a.cookies)
            assert (await on_b.get("/admin/")).status_code == 303
            await sign_in(on_b)
            table = await on_b.get("/admin/data/todo/Task", params={"query": "id == 'pg-1'"})
            assert "via a" in table.text


async def test_the_users_page_lists_and_searches_by_id_or_email(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace(
            'auth = ["anonymous"]', 'auth = ["anonymous", "email_password"]', 1
        )
    )
    srv = TestServer(tmp_path / "server", config=load_config(path))
    await asyncio.to_thread(srv.start)
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=20) as browser:
            await _users_page_scenario(srv.url, browser)
    finally:
        await asyncio.to_thread(srv.stop)


async def _users_page_scenario(url: str, browser: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        made = await http.post(
            "/api/v1/apps/todo/auth/email/register",
            json={"email": "Grace.H@example.com", "password": "s3cret-pw"},
        )
        assert made.status_code in (200, 201, 204), made.text
        login = await http.post(
            "/api/v1/apps/todo/auth/email/login",
            json={"email": "grace.h@example.com", "password": "s3cret-pw"},
        )
        assert login.status_code == 200, login.text
        grace = login.json()["user_id"]
        anon = (await http.post("/api/v1/apps/todo/auth/anonymous")).json()["user_id"]
    await sign_in(browser)
    everyone = await browser.get("/admin/users", params={"app": "todo"})
    assert everyone.status_code == 200
    assert (
        grace in everyone.text and anon in everyone.text and "grace.h@example.com" in everyone.text
    )
    found = await browser.get("/admin/users", params={"app": "todo", "q": "GRACE.h@"})
    assert grace in found.text and anon not in found.text
    by_id = await browser.get("/admin/users", params={"app": "todo", "q": anon[:10]})
    assert anon in by_id.text and grace not in by_id.text
    none = await browser.get("/admin/users", params={"app": "todo", "q": "zz-nobody"})
    assert "No user matching." in none.text
    one = await browser.get("/admin/users", params={"app": "todo", "user": grace})
    assert 'id="found-user"' in one.text and "not recorded" not in one.text  # logged in
