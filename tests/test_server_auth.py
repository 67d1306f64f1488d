"""The HTTP auth API of the sync server: anonymous login, refresh, logout, refusals."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest

from tidesync.server.auth import SECRET_FILE
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer

APP = "todo"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(tmp_path / "data") as srv:
        yield srv


async def post(
    server: InProcessServer, path: str, token: str | None = None, **kwargs: object
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx.AsyncClient(base_url=server.url) as http:
        return await http.post(path, headers=headers, **kwargs)  # type: ignore[arg-type]


async def anonymous(server: InProcessServer, app_id: str = APP) -> dict[str, str]:
    response = await post(server, f"/api/v1/apps/{app_id}/auth/anonymous", json={})
    assert response.status_code == 200, response.text
    body: dict[str, str] = response.json()
    return body


def claims(token: str) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def assert_refused(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["code"] == "invalid_token"
    for word in words:
        assert word in body["error"], body["error"]


async def test_health(server: InProcessServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_anonymous_login_issues_both_tokens(server: InProcessServer) -> None:
    body = await anonymous(server)
    assert set(body) == {"user_id", "access_token", "refresh_token"}
    access, refresh = claims(body["access_token"]), claims(body["refresh_token"])
    assert access["sub"] == refresh["sub"] == body["user_id"]
    assert access["app"] == refresh["app"] == APP
    assert (access["typ"], refresh["typ"]) == ("access", "refresh")
    assert access["jti"] != refresh["jti"]
    now = time.time()
    assert isinstance(access["exp"], float | int) and isinstance(refresh["exp"], float | int)
    assert 1790 < access["exp"] - now <= 1800
    assert 59 * 86400 < refresh["exp"] - now <= 60 * 86400
    other = await anonymous(server)
    assert other["user_id"] != body["user_id"]


async def test_anonymous_login_accepts_an_empty_body(server: InProcessServer) -> None:
    response = await post(server, "/api/v1/apps/any-app/auth/anonymous")
    assert response.status_code == 200
    assert claims(response.json()["access_token"])["app"] == "any-app"


async def test_anonymous_login_refuses_a_non_object_body(server: InProcessServer) -> None:
    response = await post(server, f"/api/v1/apps/{APP}/auth/anonymous", content=b"[1, 2")
    assert response.status_code == 400
    assert "JSON object" in response.json()["error"]


async def test_refresh_issues_a_new_access_token(server: InProcessServer) -> None:
    body = await anonymous(server)
    response = await post(server, f"/api/v1/apps/{APP}/auth/refresh", body["refresh_token"])
    assert response.status_code == 200
    token = response.json()["access_token"]
    assert token != body["access_token"]
    assert claims(token)["sub"] == body["user_id"] and claims(token)["typ"] == "access"


async def test_logout_revokes_the_refresh_token(server: InProcessServer, tmp_path: Path) -> None:
    body = await anonymous(server)
    other = await anonymous(server)
    path = f"/api/v1/apps/{APP}/auth"
    response = await post(server, f"{path}/logout", body["refresh_token"])
    assert response.status_code == 204
    assert_refused(await post(server, f"{path}/refresh", body["refresh_token"]), "revoked")
    await server.stop()
    # the secret and the revocation survive a restart
    async with InProcessServer(tmp_path / "data") as again:
        assert_refused(await post(again, f"{path}/refresh", body["refresh_token"]), "revoked")
        response = await post(again, f"{path}/refresh", other["refresh_token"])
        assert response.status_code == 200


async def test_forged_token_is_refused(server: InProcessServer) -> None:
    body = await anonymous(server)
    forged = jwt.encode(
        {**claims(body["refresh_token"]), "sub": "someone-else"},
        "a guessed secret of 32 bytes ...",
        algorithm="HS256",
    )
    response = await post(server, f"/api/v1/apps/{APP}/auth/refresh", forged)
    assert_refused(response, "signature")


async def test_garbage_and_missing_tokens_are_refused(server: InProcessServer) -> None:
    path = f"/api/v1/apps/{APP}/auth/refresh"
    assert_refused(await post(server, path, "garbage"), "malformed")
    assert_refused(await post(server, path), "Authorization")
    assert_refused(await post(server, f"/api/v1/apps/{APP}/auth/logout"), "Authorization")


async def test_access_token_cannot_refresh(server: InProcessServer) -> None:
    body = await anonymous(server)
    response = await post(server, f"/api/v1/apps/{APP}/auth/refresh", body["access_token"])
    assert_refused(response, "refresh token")


async def test_other_app_token_is_refused(server: InProcessServer) -> None:
    body = await anonymous(server, "app-one")
    response = await post(server, "/api/v1/apps/app-two/auth/refresh", body["refresh_token"])
    assert_refused(response, "app-one")


async def test_expired_refresh_token_is_refused(tmp_path: Path) -> None:
    config = ServerConfig(refresh_token_ttl=1.0)
    async with InProcessServer(tmp_path, config=config) as server:
        body = await anonymous(server)
        await asyncio.sleep(1.1)
        response = await post(server, f"/api/v1/apps/{APP}/auth/refresh", body["refresh_token"])
        assert_refused(response, "expired")


async def test_secret_file_is_private_and_stable(tmp_path: Path) -> None:
    async with InProcessServer(tmp_path) as server:
        body = await anonymous(server)
    secret = tmp_path / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    first = secret.read_bytes()
    async with InProcessServer(tmp_path) as server:
        response = await post(server, f"/api/v1/apps/{APP}/auth/refresh", body["refresh_token"])
        assert response.status_code == 200
    assert secret.read_bytes() == first
