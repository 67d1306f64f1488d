"""Forged identities and SQL metacharacters, against a real in-process server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest

import tidesync as ts
from tidesync.protocol import messages as m
from tidesync.server.runner import InProcessServer

from .security_helpers import Raw, login, note_schema, state_digest, valid_changeset

APP = "todo"
NASTY = [
    "'; DROP TABLE users; --",
    '" OR 1=1 --',
    "x' UNION SELECT * FROM refresh_tokens --",
    "%_\\*[]",
    "a\x00b",
    "Robert'); DELETE FROM history;--",
]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(tmp_path / "data") as srv:
        yield srv


async def bound(server: InProcessServer, token: str, ident: str, app: str = APP) -> Raw:
    raw = await Raw.open(server, app)
    assert isinstance(await raw.hello(token), m.Welcome)
    await raw.send(m.Bind(1, ident, [note_schema()], 0, 0))
    return raw


async def test_forging_another_clients_file_identity(server: InProcessServer) -> None:
    alice, mallory = await login(server, APP), await login(server, APP)
    a = await bound(server, alice["access_token"], "alice-file")
    assert isinstance(await a.until(m.Bound), m.Bound)
    await a.send(m.Upload(1, [valid_changeset("alice-file", "a1", "mine")], 0))
    for _ in range(100):
        if await server.storage.get_objects(APP, "Note"):
            break
        await asyncio.sleep(0.05)
    before = await state_digest(server, [APP])
    forged = await bound(server, mallory["access_token"], "alice-file")
    error = await forged.until(m.Error)
    assert error.code == m.ErrorCode.BAD_CLIENT_FILE_IDENT and error.session == 1
    await forged.send(m.Upload(1, [valid_changeset("alice-file", "a1", "stolen", 2)], 0))
    await forged.send(m.Ping(1))
    await forged.until(m.Pong)
    assert await state_digest(server, [APP]) == before
    assert (await server.storage.get_objects(APP, "Note"))["a1"]["text"] == "mine"
    await a.close()
    await forged.close()


async def test_forging_another_users_id(server: InProcessServer) -> None:
    alice, mallory = await login(server, APP), await login(server, APP)
    claims = jwt.decode(mallory["access_token"], options={"verify_signature": False})
    for forged in (
        jwt.encode(
            {**claims, "sub": alice["user_id"]}, "guessed-secret-0123456789abcdef0123", "HS256"
        ),
        jwt.encode({**claims, "sub": alice["user_id"]}, None, "none"),  # type: ignore[arg-type]
        mallory["access_token"][:-4] + "AAAA",
    ):
        raw = await Raw.open(server, APP)
        error = await raw.hello(forged)
        assert isinstance(error, m.Error) and error.code == m.ErrorCode.BAD_TOKEN
        assert await raw.recv() is None and raw.close_code == 1008
    # a refresh token cannot stand in for an access token, nor another app's token
    raw = await Raw.open(server, APP)
    assert isinstance(await raw.hello(mallory["refresh_token"]), m.Error)
    other = await login(server, "other-app")
    raw = await Raw.open(server, APP)
    error = await raw.hello(other["access_token"])
    assert isinstance(error, m.Error) and error.code == m.ErrorCode.OTHER_APP
    # REFRESH on an open connection with someone else's token is refused
    raw = await Raw.open(server, APP)
    assert isinstance(await raw.hello(mallory["access_token"]), m.Welcome)
    await raw.send(m.Refresh(alice["access_token"]))
    error = await raw.until(m.Error)
    assert error.code == m.ErrorCode.BAD_TOKEN and "another user" in error.message


async def test_sql_metacharacters_everywhere(server: InProcessServer, tmp_path: Path) -> None:
    tokens = await login(server, APP)
    raw = await Raw.open(server, APP)
    assert isinstance(await raw.hello(tokens["access_token"]), m.Welcome)
    for i, text in enumerate(NASTY, start=1):
        await raw.send(m.Bind(i, f"file{text}{i}", [note_schema()], 0, 0))
        assert isinstance(await raw.until(m.Bound), m.Bound)
        await raw.send(m.Upload(i, [valid_changeset(f"file{text}{i}", text + str(i), text)], 0))
        await raw.send(m.Query(i, 1, {"Note": [f"text == '{text}'", "text == $0"]}))
    deadline = time.monotonic() + 15
    while len(await server.storage.get_objects(APP, "Note")) < len(NASTY):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    objects = await server.storage.get_objects(APP, "Note")
    assert {o["text"] for o in objects.values()} == set(NASTY)  # stored exactly
    await raw.close()
    # HTTP string fields: emails, passwords, key names, tokens, app ids
    app = ts.App(ts.AppConfiguration(APP, base_url=server.url, base_path=tmp_path / "c"))
    for text in NASTY:
        with pytest.raises(ts.AuthError):
            await app.log_in(ts.Credentials.email_password(text + "@x.io", text))
        with pytest.raises(ts.AuthError):
            await app.log_in(ts.Credentials.api_key(text))
    await app.email_password_auth.register_user("o'brien@example.com", NASTY[0])
    user = await app.log_in(ts.Credentials.email_password("o'brien@example.com", NASTY[0]))
    for text in NASTY[:3]:
        await user.api_keys.create(text)
    assert {k.name for k in await user.api_keys.list()} == set(NASTY[:3])
    async with httpx.AsyncClient(base_url=server.url) as http:
        for text in NASTY[:3]:
            answer = await http.post(f"/api/v1/apps/{text}/auth/anonymous", json={})
            assert answer.status_code in (200, 404)
            answer = await http.post(f"/api/v1/apps/{APP}/auth/email/confirm", json={"token": text})
            assert answer.status_code == 400
    # the tables are all still there and answer
    assert await state_digest(server, [APP])
    await app.log_in(ts.Credentials.email_password("o'brien@example.com", NASTY[0]))
    app.close()
