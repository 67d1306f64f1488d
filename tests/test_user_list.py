"""The user stores' list and search (``list_users``, ``get_user``): the same answers from
SQLite and PostgreSQL (the PostgreSQL case skips unless ``TIDESYNC_TEST_PG_DSN`` is set)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tidesync.server.users import MAX_USER_PAGE, SQLiteUserStore, UserStore

APP = "todo"


async def test_sqlite_store(tmp_path: Path) -> None:
    await _run(SQLiteUserStore.in_folder(tmp_path / "users"))


async def test_postgres_store(pg_url: str) -> None:
    from tidesync.server.users_pg import PostgresUserStore

    await _run(PostgresUserStore.from_url(pg_url))


async def _run(store: UserStore) -> None:
    await store.open()
    try:
        await _scenario(store)
    finally:
        await store.close()


async def _scenario(store: UserStore) -> None:
    ada = await store.register_email(APP, "Ada@Example.com", "s3cret-pw", confirmed=True)
    bob = await store.register_email(APP, "bob@example.org", "s3cret-pw", confirmed=True)
    anon = await store.create_user(APP, "anonymous")
    jwt = await store.user_for_identity(APP, "jwt", "ext-1", {"email": "carol@corp.test"})
    other = await store.create_user("other-app", "anonymous")
    await store.set_disabled(APP, bob, True)

    everyone = await store.list_users(APP)
    assert [u.user_id for u in everyone] == sorted([ada, bob, anon, jwt])
    by_id = {u.user_id: u for u in everyone}
    assert by_id[ada].email == "ada@example.com" and by_id[ada].provider == "email_password"
    assert by_id[bob].disabled and not by_id[ada].disabled
    assert by_id[anon].email is None and by_id[anon].provider == "anonymous"
    assert by_id[jwt].email == "carol@corp.test"  # the provider's field
    assert all(u.created_at > 1.7e9 for u in everyone)
    assert other not in by_id

    # search: an e-mail prefix (any case), an id prefix; '%' and '_' are no wildcards
    assert [u.user_id for u in await store.list_users(APP, "ADA@")] == [ada]
    assert [u.user_id for u in await store.list_users(APP, "bob")] == [bob]
    assert [u.user_id for u in await store.list_users(APP, anon[:6])] == [anon]
    assert await store.list_users(APP, "%") == []
    assert await store.list_users(APP, "_") == []
    assert await store.list_users(APP, "nobody") == []

    # pages: after the last id of the page before; the size is bounded
    first = await store.list_users(APP, limit=3)
    rest = await store.list_users(APP, after=first[-1].user_id, limit=3)
    assert [u.user_id for u in first + rest] == [u.user_id for u in everyone]
    assert len(await store.list_users(APP, limit=0)) == 1
    assert MAX_USER_PAGE == 500
    for _ in range(3):
        await store.create_user(APP, "anonymous")
    assert len(await store.list_users(APP, limit=10**9)) == 7

    # a login (a stored refresh token of a new login) is the last login; none before
    assert by_id[ada].last_login_at is None
    before = time.time()
    await store.add_refresh(APP, ada, "refresh-token-of-ada", time.time() + 60)
    logged = await store.get_user(APP, ada)
    assert logged is not None and logged.last_login_at is not None
    assert before - 1 <= logged.last_login_at <= time.time() + 1
    assert logged.to_json()["last_login"] == logged.last_login_at

    got = await store.get_user(APP, bob)
    assert got is not None and got.to_json() == by_id[bob].to_json()
    assert await store.get_user(APP, "nope") is None
    assert await store.get_user("other-app", ada) is None
    assert await store.list_users(APP, "a\x00b") == []


async def test_a_sqlite_file_of_before_last_login_gains_the_column(tmp_path: Path) -> None:
    folder = tmp_path / "users"
    folder.mkdir()
    old = sqlite3.connect(folder / "users.sqlite3")
    old.executescript(
        "CREATE TABLE users (app_id TEXT NOT NULL, user_id TEXT NOT NULL,"
        " provider TEXT NOT NULL, disabled INTEGER NOT NULL DEFAULT 0,"
        " created_at REAL NOT NULL, data TEXT NOT NULL, PRIMARY KEY (app_id, user_id));"
        "INSERT INTO users VALUES ('todo', 'u-old', 'anonymous', 0, 1.8e9, '{}');"
    )
    old.commit()
    old.close()
    store = SQLiteUserStore.in_folder(folder)
    await store.open()
    try:
        [user] = await store.list_users(APP)
        assert (user.user_id, user.last_login_at, user.created_at) == ("u-old", None, 1.8e9)
        await store.add_refresh(APP, "u-old", "a-refresh-token", time.time() + 60)
        again = await store.get_user(APP, "u-old")
        assert again is not None and again.last_login_at is not None
        assert (await store.create_user(APP, "anonymous")) != "u-old"
    finally:
        await store.close()
    reopened = SQLiteUserStore.in_folder(folder)  # the column is not added twice
    await reopened.open()
    await reopened.close()
