"""Signing keys rotate without logging anyone out (issue 19, item 7): ``tidesync keys rotate``
against a running ``tidesync serve``; the new key signs after its delay, tokens of the old key
keep working until they expire, then the old key is dropped. On SQLite (one process) and on
two processes sharing PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.server.signing import DEFAULT_KID, SigningKey, current_key, expired_keys
from tidesync.testing import ServerProcess

APP = "todo"
TTL = 12  # token lifetimes in the tests (seconds; a loaded machine's CLI runs take some)


def kid_of(token: str) -> str:
    head = token.split(".")[0]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return str(data.get("kid", DEFAULT_KID))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidesync.cli", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def config_file(root: Path) -> Path:
    path = root / "tidesync.toml"
    path.write_text(
        "[server]\ndevelopment_mode = true\n"
        f"key_reload_interval = 0.2\nrefresh_token_ttl = {TTL}\naccess_token_ttl = {TTL}\n"
    )
    return path


async def anonymous(url: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post(f"/api/v1/apps/{APP}/auth/anonymous", json={})
    assert answer.status_code == 200, answer.text
    body: dict[str, str] = answer.json()
    return body


async def me(url: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return await http.get(
            f"/api/v1/apps/{APP}/auth/me", headers={"Authorization": f"Bearer {token}"}
        )


async def refresh(url: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return await http.post(
            f"/api/v1/apps/{APP}/auth/refresh", headers={"Authorization": f"Bearer {token}"}
        )


async def rotation(signer: str, checker: str, where: list[str]) -> None:
    """Rotate through the CLI (``where``: its --data or --storage options), log in through
    ``signer``, check every token through ``checker``."""
    before = await anonymous(signer)
    assert kid_of(before["access_token"]) == DEFAULT_KID
    done = cli("rotate", *where, "--after", "1")
    assert done.returncode == 0, done.stderr
    new_kid = done.stdout.split()[3]
    assert new_kid != DEFAULT_KID and "signs from" in done.stdout
    # until the new key signs, the old one does
    assert kid_of((await anonymous(signer))["access_token"]) == DEFAULT_KID
    await asyncio.sleep(1.5)
    after = await anonymous(signer)
    assert kid_of(after["access_token"]) == new_kid
    # nobody was logged out: the old key's tokens still verify everywhere
    still = await me(checker, before["access_token"])
    assert still.status_code == 200, still.text
    assert (await me(checker, after["access_token"])).status_code == 200
    rotated = await refresh(checker, before["refresh_token"])
    assert rotated.status_code == 200, rotated.text
    assert kid_of(rotated.json()["access_token"]) == new_kid
    # once every token of the old key has expired, the key is dropped
    for _ in range(200):  # at most 20 s
        listing = cli("list", *where).stdout
        if DEFAULT_KID not in listing:
            break
        await asyncio.sleep(0.1)
    assert DEFAULT_KID not in listing and new_kid in listing
    await asyncio.sleep(0.5)  # the processes reload their keys
    gone = await me(checker, before["access_token"])
    assert gone.status_code == 401 and "does not keep" in gone.json()["error"]
    assert (await me(checker, (await anonymous(signer))["access_token"])).status_code == 200


async def test_rotate_a_running_server_without_logging_anyone_out(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", extra_args=["--config", str(config_file(tmp_path))])
    server.start()
    try:
        await rotation(server.url, server.url, ["--data", str(tmp_path / "data")])
        assert not (tmp_path / "data" / "secret.key").exists()  # the old secret is gone
        server.stop()
        server.start()  # the rotated key survives a restart; the default is not made again
        body = await anonymous(server.url)
        assert kid_of(body["access_token"]) != DEFAULT_KID
        assert (await me(server.url, body["access_token"])).status_code == 200
        assert not (tmp_path / "data" / "secret.key").exists()
    finally:
        server.kill()


def test_bad_data_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = cli("rotate", "--data", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not a server's data folder" in done.stderr


def test_which_key_signs_and_which_are_dropped() -> None:
    a, b, c = (SigningKey(k, b"x" * 32, t) for k, t in (("a", 0.0), ("b", 100.0), ("c", 200.0)))
    assert current_key([a, b, c], 50).kid == "a"
    assert current_key([c, b, a], 150).kid == "b"
    assert current_key([a, b, c], 250).kid == "c"
    assert expired_keys([a, b, c], 150, token_ttl=60) == []  # a's tokens live to 160
    assert expired_keys([a, b, c], 161, token_ttl=60) == ["a"]
    assert expired_keys([a, b, c], 261, token_ttl=60) == ["a", "b"]
    assert "x" not in repr(a)  # no secret in logs


@pytest.fixture
def pg_pair(tmp_path: Path, pg_url: str) -> Iterator[tuple[list[ServerProcess], str]]:
    """Two server processes on one PostgreSQL schema, each with its own data folder."""
    config = config_file(tmp_path)
    made = [
        ServerProcess(
            tmp_path / f"data-{n}", extra_args=["--storage", pg_url, "--config", f"{config}"]
        )
        for n in "ab"
    ]
    try:
        for proc in made:
            proc.start()
        yield made, pg_url
    finally:
        for proc in made:
            proc.kill()


async def test_rotate_a_postgresql_deployment(
    pg_pair: tuple[list[ServerProcess], str],
) -> None:
    (a, b), url = pg_pair
    started = time.monotonic()
    await rotation(a.url, b.url, ["--storage", url])
    assert time.monotonic() - started < 40
