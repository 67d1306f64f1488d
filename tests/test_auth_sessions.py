"""Tokens and users with live sync sessions, against a real in-process server: rotation,
revocation, disabling and deleting users, access expiring mid-session, users on disk."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import tidesync as ts
from tidesync.errors import AuthError
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer
from tidesync.server.settings import AuthSettings

from .flex_helpers import FAST, T

ADMIN_KEY = "admin-key-for-tests-0123456789"


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


class Device:
    def __init__(self, server: InProcessServer, root: Path, name: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration(
                "todo", base_url=server.url, base_path=root / name, sync_timeouts=FAST
            )
        )
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None

    async def open(self, credentials: ts.Credentials | None = None) -> ts.Database:
        user = await self.app.log_in(credentials or ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, [Note], sync_error_handler=lambda s, e: self.errors.append(e)
        )
        self.db = ts.Database(config)
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.app.close()


def config(**kwargs: object) -> ServerConfig:
    return ServerConfig(auth=AuthSettings(admin_keys=(ADMIN_KEY,)), **kwargs)  # type: ignore[arg-type]


async def eventually(check: Callable[[], bool], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def write_and_upload(db: ts.Database, key: str) -> None:
    with db.write():
        db.add(Note(id=key, text=key))
    await db.sync_session.wait_for_upload(T(15))


async def test_refresh_tokens_rotate_and_reuse_revokes_the_login(tmp_path: Path) -> None:
    async with InProcessServer(tmp_path / "data", config=config(refresh_reuse_grace=0.0)) as srv:
        app = ts.App(ts.AppConfiguration("todo", base_url=srv.url, base_path=tmp_path / "a"))
        user = await app.log_in(ts.Credentials.anonymous())
        first = user.refresh_token
        await user.refresh_access_token()
        second = user.refresh_token
        assert second != first
        async with httpx.AsyncClient(base_url=srv.url) as http:
            reuse = await http.post(
                "/api/v1/apps/todo/auth/refresh", headers={"Authorization": f"Bearer {first}"}
            )
        assert reuse.status_code == 401 and "used again" in reuse.json()["error"]
        # the whole login is revoked, including the newest token (it may be the thief's)
        with pytest.raises(AuthError, match="revoked"):
            await user.refresh_access_token()
        app.close()


async def test_access_expiring_mid_session_is_refreshed(tmp_path: Path) -> None:
    async with InProcessServer(tmp_path / "data", config=config(access_token_ttl=2.0)) as srv:
        dev = Device(srv, tmp_path, "d")
        db = await dev.open()
        await write_and_upload(db, "before")
        connections = srv.hub.connection_count
        await asyncio.sleep(5)  # more than two access token lifetimes
        await write_and_upload(db, "after")
        assert dev.errors == []
        assert srv.hub.connection_count == connections == 1
        objects = await srv.storage.get_objects("todo", "Note")
        assert set(objects) >= {"before", "after"}
        dev.close()


async def test_revoked_refresh_token_stops_the_session_and_keeps_data(tmp_path: Path) -> None:
    async with InProcessServer(tmp_path / "data", config=config(access_token_ttl=2.0)) as srv:
        dev = Device(srv, tmp_path, "d")
        db = await dev.open()
        await write_and_upload(db, "kept")
        user = dev.app.current_user
        assert user is not None
        async with httpx.AsyncClient(base_url=srv.url) as http:  # revoked elsewhere
            done = await http.post(
                "/api/v1/apps/todo/auth/logout",
                headers={"Authorization": f"Bearer {user.refresh_token}"},
            )
        assert done.status_code == 204
        await eventually(lambda: any(isinstance(e, ts.SyncError) for e in dev.errors))
        error = next(e for e in dev.errors if isinstance(e, ts.SyncError))
        assert "revoked" in str(error) and error.action is ts.SyncAction.STOP
        with db.write():
            db.add(Note(id="offline", text="still writable"))
        assert {n.id for n in db.all(Note)} == {"kept", "offline"}
        dev.close()


@pytest.mark.parametrize("how", ["admin-disable", "self-delete"])
async def test_disabling_or_deleting_a_user_ends_its_connections(tmp_path: Path, how: str) -> None:
    async with InProcessServer(tmp_path / "data", config=config()) as srv:
        victim, bystander = Device(srv, tmp_path, "v"), Device(srv, tmp_path, "b")
        vdb, bdb = await victim.open(), await bystander.open()
        await write_and_upload(vdb, "v1")
        await write_and_upload(bdb, "b1")
        assert srv.hub.connection_count == 2
        user = victim.app.current_user
        assert user is not None
        started = time.monotonic()
        if how == "admin-disable":
            async with httpx.AsyncClient(base_url=srv.url) as http:
                answer = await http.post(
                    f"/api/v1/apps/todo/admin/users/{user.id}/disable",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                )
            assert answer.status_code == 204
        else:
            await user.delete()
            assert victim.app.all_users == []
        await eventually(lambda: srv.hub.connection_count == 1, limit=10)
        await eventually(lambda: bool(victim.errors), limit=10)
        assert time.monotonic() - started < 10
        assert any("revoked" in str(e) or "disabled" in str(e) for e in victim.errors)
        # it stays out: no reconnect succeeds
        await asyncio.sleep(1.5)
        assert srv.hub.connection_count == 1
        # the other user is untouched and keeps syncing
        await write_and_upload(bdb, "b2")
        assert bystander.errors == []
        assert {n.id for n in vdb.all(Note)} >= {"v1"}  # local data kept
        victim.close()
        bystander.close()


async def test_users_persist_switch_and_remove(tmp_path: Path) -> None:
    async with InProcessServer(tmp_path / "data") as srv:
        conf = ts.AppConfiguration("todo", base_url=srv.url, base_path=tmp_path / "app")
        app = ts.App(conf)
        await app.email_password_auth.register_user("p@example.com", "pass word")
        one = await app.log_in(ts.Credentials.anonymous())
        two = await app.log_in(ts.Credentials.email_password("p@example.com", "pass word"))
        assert app.current_user is two
        app.switch_user(one)
        assert app.current_user is one
        users_file = tmp_path / "app" / "users.json"
        assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
        app.close()
        again = ts.App(conf)  # a restart of the program
        assert {u.id for u in again.all_users} == {one.id, two.id}
        assert again.current_user is not None and again.current_user.id == one.id
        restored = next(u for u in again.all_users if u.id == two.id)
        await restored.refresh_access_token()  # its tokens work after the restart
        await again.remove_user(restored)
        assert [u.id for u in again.all_users] == [one.id]
        with pytest.raises(AuthError):
            await restored.refresh_access_token()  # removal logged it out on the server
        third = ts.App(conf)
        assert [u.id for u in third.all_users] == [one.id]
        assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
        again.close()
        third.close()
