"""Users and tokens shared by several server processes on one PostgreSQL database.

Two real ``tidesync serve --storage postgresql://...`` processes with *different* data
folders (nothing shared but the database): a user logs in through one and syncs and
refreshes through the other; logging out through one revokes the token on both; disabling
a user through one closes its sync connection on the other within seconds. Store-level
tests run :class:`~tidesync.server.users_pg.PostgresUserStore` instances (one per
"process") against each other: concurrent refresh-token rotation, the shared secret, user
events by NOTIFY and by the fallback poll; and one scenario on both user stores (SQLite and
PostgreSQL) checks they answer alike. Skipped unless ``TIDESYNC_TEST_PG_DSN`` is set.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import tidesync as ts
from tidesync.errors import AuthError
from tidesync.server.users import (
    RefreshOutcome,
    SQLiteUserStore,
    UserStore,
    new_secret,
)
from tidesync.testing import ServerProcess

from .test_sync_e2e import FAST, Device, Item, settle

asyncpg = pytest.importorskip("asyncpg")
from tidesync.server.users_pg import PostgresUserStore  # noqa: E402  (needs asyncpg)

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
pytestmark = pytest.mark.skipif(not DSN, reason="TIDESYNC_TEST_PG_DSN is not set")
T = ts.TimeoutCancellationToken
ADMIN_KEY = "admin-key-for-pg-user-tests-0123456789"
APP = "todo"


@pytest.fixture
def pair(tmp_path: Path, pg_url: str) -> Iterator[list[ServerProcess]]:
    """Two server processes on one database, each with its own data folder, started at
    the same time (both run the migrations: the advisory lock orders them)."""
    config = tmp_path / "tidesync.toml"
    config.write_text(f'[server]\ndevelopment_mode = true\nadmin_keys = ["{ADMIN_KEY}"]\n')
    made = [
        ServerProcess(
            tmp_path / f"data-{name}", extra_args=["--storage", pg_url, "--config", str(config)]
        )
        for name in ("a", "b")
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(p.start) for p in made]:
                started.result()
        yield made
    finally:
        for proc in made:
            proc.kill()
    for proc in made:  # nothing of the users went to the data folders
        assert not (proc.data_dir / "users.sqlite3").exists()
        assert not (proc.data_dir / "secret.key").exists()


def app_at(url: str, base: Path) -> ts.App:
    return ts.App(ts.AppConfiguration(APP, base_url=url, base_path=base, sync_timeouts=FAST))


async def refresh_via(url: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return await http.post(
            f"/api/v1/apps/{APP}/auth/refresh", headers={"Authorization": f"Bearer {token}"}
        )


async def eventually(check: Callable[[], bool], limit: float = 15.0) -> float:
    """Poll ``check()`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < limit, f"condition not met within {limit} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def write_and_upload(dev: Device, key: str) -> None:
    assert dev.db is not None
    with dev.db.write():
        dev.db.add(Item(id=key, text=key))
    await dev.db.sync_session.wait_for_upload(T(20))


# -- two processes ---------------------------------------------------------------------------


async def test_log_in_through_one_sync_and_refresh_through_the_other(
    tmp_path: Path, pair: list[ServerProcess]
) -> None:
    a, b = pair
    made: list[Device] = []
    try:
        # anonymous: log in through A; the device (same base path) syncs through B
        first = app_at(a.url, tmp_path / "anon")
        anon = await first.log_in(ts.Credentials.anonymous())
        first.close()
        dev = Device(tmp_path, "anon", b.url, [Item])
        made.append(dev)
        dev.user = dev.app.current_user
        assert dev.user is not None and dev.user.id == anon.id
        await dev.open()
        await write_and_upload(dev, "anon-through-b")

        # refresh through B (tokens issued by A), then through A with B's new token
        old = dev.user.refresh_token
        await dev.user.refresh_access_token()
        rotated = dev.user.refresh_token
        assert rotated != old
        again = await refresh_via(a.url, rotated)
        assert again.status_code == 200, again.text
        assert again.json()["user_id"] == anon.id

        # email/password: register through A, log in through B, sync through A
        email, password = f"u{uuid.uuid4().hex[:8]}@example.com", "correct horse"
        reg = app_at(a.url, tmp_path / "reg")
        await reg.email_password_auth.register_user(email, password)
        reg.close()
        login = app_at(b.url, tmp_path / "mail")
        with pytest.raises(AuthError):
            await login.log_in(ts.Credentials.email_password(email, "wrong password"))
        member = await login.log_in(ts.Credentials.email_password(email, password))
        login.close()
        mail = Device(tmp_path, "mail", a.url, [Item])
        made.append(mail)
        mail.user = mail.app.current_user
        assert mail.user is not None and mail.user.id == member.id
        await mail.open()
        await write_and_upload(mail, "mail-through-a")
        await settle(dev, mail)
        assert mail.db is not None and dev.db is not None
        assert {i.id for i in mail.db.all(Item)} >= {"anon-through-b", "mail-through-a"}
        assert {i.id for i in dev.db.all(Item)} >= {"anon-through-b", "mail-through-a"}

        # log out through A: the refresh token is refused through B too
        token = mail.user.refresh_token
        await mail.user.log_out()
        refused = await refresh_via(b.url, token)
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]
        assert not dev.errors
    finally:
        for d in made:
            d.close()


@pytest.mark.parametrize("how", ["admin-disable", "self-delete"])
async def test_ending_a_user_through_one_process_closes_it_on_the_other(
    tmp_path: Path, pair: list[ServerProcess], how: str
) -> None:
    a, b = pair
    # the victim syncs through B (admin disable through A) or through A (deletes itself via B)
    victim_at, bystander_at = (b, a) if how == "admin-disable" else (a, b)
    victim = Device(tmp_path, "victim", victim_at.url, [Item])
    bystander = Device(tmp_path, "bystander", victim_at.url, [Item])
    try:
        await victim.open()
        await bystander.open()
        await write_and_upload(victim, "v1")
        await write_and_upload(bystander, "b1")
        assert victim.user is not None
        refresh = victim.user.refresh_token
        started = time.monotonic()
        if how == "admin-disable":
            async with httpx.AsyncClient(base_url=bystander_at.url, timeout=10) as http:
                answer = await http.post(
                    f"/api/v1/apps/{APP}/admin/users/{victim.user.id}/disable",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                )
            assert answer.status_code == 204, answer.text
        else:
            async with httpx.AsyncClient(base_url=bystander_at.url, timeout=10) as http:
                answer = await http.delete(
                    f"/api/v1/apps/{APP}/auth/me",
                    headers={"Authorization": f"Bearer {victim.user.access_token}"},
                )
            assert answer.status_code == 204, answer.text
        took = await eventually(lambda: bool(victim.errors), limit=10)
        assert time.monotonic() - started < 10
        assert any("disabled" in str(e) or "deleted" in str(e) for e in victim.errors), (
            victim.errors,
            took,
        )
        # it stays out on both processes; the bystander keeps syncing
        for server in (a, b):
            assert (await refresh_via(server.url, refresh)).status_code == 401
        await write_and_upload(bystander, "b2")
        assert bystander.errors == []
        assert victim.db is not None and victim.db.find(Item, "v1") is not None  # kept locally
    finally:
        victim.close()
        bystander.close()


# -- user stores against each other -----------------------------------------------------------


@pytest.fixture
async def two_stores(pg_url: str) -> AsyncIterator[tuple[PostgresUserStore, PostgresUserStore]]:
    """Two PostgreSQL user stores on one schema, as two server processes would have,
    opened at the same time."""
    one = PostgresUserStore.from_url(pg_url, poll_interval=0.5)
    two = PostgresUserStore.from_url(pg_url, poll_interval=0.5)
    await asyncio.gather(one.open(), two.open())
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


async def test_concurrent_rotations_across_processes_let_exactly_one_through(
    two_stores: tuple[PostgresUserStore, PostgresUserStore],
) -> None:
    one, two = two_stores
    assert await one.signing_secret() == await two.signing_secret()
    user = await one.create_user(APP, "anonymous")
    token = new_secret()
    await one.add_refresh(APP, user, token, time.time() + 3600)
    news = [new_secret() for _ in range(8)]
    # grace -1: any second presentation of a rotated token counts as reuse
    outcomes = await asyncio.gather(
        *(
            (one if i % 2 else two).rotate_refresh(
                APP, user, token, new, time.time() + 3600, time.time(), -1.0
            )
            for i, new in enumerate(news)
        )
    )
    assert outcomes.count(RefreshOutcome.ROTATED) == 1, outcomes
    # the first late one revokes the family; the ones after it find it revoked
    assert outcomes.count(RefreshOutcome.REUSED) >= 1, outcomes
    assert set(outcomes) <= {RefreshOutcome.ROTATED, RefreshOutcome.REUSED, RefreshOutcome.REVOKED}
    # the reuse revoked the whole login, including the token the winner got
    winner = news[outcomes.index(RefreshOutcome.ROTATED)]
    record = await two.get_refresh(winner)
    assert record is not None and record.revoked
    outcome = await one.rotate_refresh(APP, user, winner, new_secret(), time.time() + 60, 0, 30)
    assert outcome is RefreshOutcome.REVOKED
    # within the grace, concurrent rotations of one token all succeed (one client, two calls)
    fresh = new_secret()
    await two.add_refresh(APP, user, fresh, time.time() + 3600)
    outcomes = await asyncio.gather(
        *(
            s.rotate_refresh(APP, user, fresh, new_secret(), time.time() + 3600, time.time(), 30)
            for s in (one, two, one, two)
        )
    )
    assert set(outcomes) == {RefreshOutcome.ROTATED}


async def test_user_events_reach_the_other_process_by_notify_and_by_poll(
    two_stores: tuple[PostgresUserStore, PostgresUserStore],
) -> None:
    one, two = two_stores
    heard_one: list[tuple[str, str, str]] = []
    heard_two: list[tuple[str, str, str]] = []
    one.set_user_gone_listener(lambda *e: heard_one.append(e))
    two.set_user_gone_listener(lambda *e: heard_two.append(e))
    u1 = await one.create_user(APP, "anonymous")
    u2 = await one.create_user(APP, "anonymous")
    assert await one.set_disabled(APP, u1, True)
    took = await eventually(lambda: len(heard_two) == 1, limit=10)
    assert heard_two == [(APP, u1, "the user was disabled")]
    assert took < 0.5, took  # the NOTIFY, not the poll
    # a dropped listener connection: the poll still finds the event
    listener = two._listener
    assert listener is not None
    listener.terminate()
    assert await one.delete_user(APP, u2)
    await eventually(lambda: len(heard_two) == 2, limit=10)
    assert heard_two[1] == (APP, u2, "the user was deleted")
    assert heard_one == []  # the process that made the change acts on it itself
    assert await two.user_status(APP, u1) == "disabled" and await two.user_status(APP, u2) is None
    assert not await one.set_disabled(APP, "no-such-user", True)
    assert not await two.delete_user(APP, "nul\x00id")
    await asyncio.sleep(1.2)  # no event is delivered twice
    assert len(heard_two) == 2


# -- one scenario, both user stores -------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_url: str
) -> AsyncIterator[UserStore]:
    made: UserStore
    if request.param == "sqlite":
        made = SQLiteUserStore.in_folder(tmp_path / "users")
    else:
        made = PostgresUserStore.from_url(pg_url)
    await made.open()
    try:
        yield made
    finally:
        await made.close()


async def test_both_user_stores_answer_alike(store: UserStore) -> None:
    secret = await store.signing_secret()
    assert len(secret) >= 32 and await store.signing_secret() == secret
    # email accounts
    user = await store.register_email(APP, " Ada@Example.com ", "s3cret-pw", confirmed=False)
    with pytest.raises(AuthError, match="already registered"):
        await store.register_email(APP, "ada@example.com", "other-pw", confirmed=True)
    with pytest.raises(AuthError):
        await store.register_email(APP, "not-an-address", "s3cret-pw", confirmed=True)
    with pytest.raises(AuthError, match="not confirmed"):
        await store.check_email_password(APP, "ada@example.com", "s3cret-pw")
    assert await store.check_email_password(APP, "ada@example.com", "wrong-pw") is None
    assert await store.check_email_password(APP, "nobody@example.com", "s3cret-pw") is None
    token = await store.add_pending(APP, "confirm", "ada@example.com")
    assert await store.take_pending(APP, "reset", token) is None  # another kind
    assert await store.take_pending(APP, "confirm", token) == "ada@example.com"
    assert await store.take_pending(APP, "confirm", token) is None  # works once
    assert await store.confirm_email(APP, "ada@example.com")
    assert await store.check_email_password(APP, "ada@example.com", "s3cret-pw") == user
    assert await store.check_email_password("other-app", "ada@example.com", "s3cret-pw") is None
    assert await store.email_exists(APP, "ada@example.com")
    data = await store.user_data(APP, user)
    assert data == {"provider": "email_password", "email": "ada@example.com"}
    # identities
    jwt_user = await store.user_for_identity(APP, "jwt", "ext-1", {"name": "A"})
    assert await store.user_for_identity(APP, "jwt", "ext-1", {"name": "B"}) == jwt_user
    assert (await store.user_data(APP, jwt_user) or {}).get("name") == "B"
    # API keys
    info, key = await store.create_api_key(APP, user, "laptop")
    with pytest.raises(AuthError, match="already exists"):
        await store.create_api_key(APP, user, "laptop")
    assert [k.name for k in await store.list_api_keys(APP, user)] == ["laptop"]
    assert await store.user_for_api_key(APP, key) == user
    assert await store.set_api_key_disabled(APP, user, info.id, True)
    assert await store.user_for_api_key(APP, key) is None
    assert await store.delete_api_key(APP, user, info.id)
    assert not await store.delete_api_key(APP, user, info.id)
    # refresh tokens: rotate, grace, reuse, logout, password change, disable
    t1, t2, t3 = new_secret(), new_secret(), new_secret()
    await store.add_refresh(APP, user, t1, time.time() + 3600)
    now = time.time()
    assert await store.rotate_refresh(APP, user, t1, t2, now + 60, now, 30) is (
        RefreshOutcome.ROTATED
    )
    assert await store.rotate_refresh(APP, user, t1, t3, now + 60, now + 1, 30) is (
        RefreshOutcome.ROTATED  # within the grace
    )
    assert await store.rotate_refresh(APP, user, t1, new_secret(), now + 60, now + 99, 30) is (
        RefreshOutcome.REUSED
    )
    for t in (t2, t3):
        assert await store.rotate_refresh(APP, user, t, new_secret(), now, now, 30) is (
            RefreshOutcome.REVOKED
        )
    assert await store.rotate_refresh(APP, jwt_user, t2, new_secret(), now, now, 30) is (
        RefreshOutcome.UNKNOWN  # another user's token
    )
    t4 = new_secret()
    await store.add_refresh(APP, user, t4, time.time() + 3600)
    await store.revoke_refresh(t4)
    record = await store.get_refresh(t4)
    assert record is not None and record.revoked
    t5 = new_secret()
    await store.add_refresh(APP, user, t5, time.time() + 3600)
    assert await store.set_password(APP, "ada@example.com", "n3w-password")
    assert await store.rotate_refresh(APP, user, t5, new_secret(), now, now, 30) is (
        RefreshOutcome.REVOKED
    )
    assert await store.check_email_password(APP, "ada@example.com", "n3w-password") == user
    t6 = new_secret()
    await store.add_refresh(APP, user, t6, time.time() + 3600)
    assert await store.set_disabled(APP, user, True)
    assert await store.user_status(APP, user) == "disabled"
    assert await store.rotate_refresh(APP, user, t6, new_secret(), now, now, 30) is (
        RefreshOutcome.DISABLED
    )
    assert await store.set_disabled(APP, user, False)
    assert await store.delete_user(APP, user)
    assert await store.user_status(APP, user) is None
    assert not await store.email_exists(APP, "ada@example.com")
    await store.add_pending(APP, "reset", "someone@example.com")
    await store.add_refresh(APP, jwt_user, new_secret(), time.time() + 3600)
    assert await store.purge_expired(time.time()) == 0
    assert await store.purge_expired(time.time() + 10 * 86400) == 2
