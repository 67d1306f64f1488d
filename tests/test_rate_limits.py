"""Login limits that cannot be bypassed or turned against users (issue 19, item 6), against a
real in-process server over loopback HTTP: ``X-Forwarded-For`` is believed only from the
operator's listed proxies; failed logins are limited per (account, address), per address
and per account overall, so an attacker slows only himself; anonymous sign-ups are limited
per address; registering an existing address answers exactly as a new one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.server.config import ServerConfig
from tidesync.server.limits import Limits
from tidesync.server.runner import InProcessServer
from tidesync.server.settings import (
    EMAIL_PASSWORD,
    REGISTERED_AGAIN,
    AppSettings,
    AuthSettings,
    DeliveryMessage,
)

APP = "todo"
RIGHT = "the right password"
LIMITS = Limits(
    login_attempts_per_account=3,
    login_attempts_per_address=6,
    login_attempts_per_account_total=8,
    anonymous_logins_per_address=4,
)


async def start(tmp_path: Path, **config: Any) -> InProcessServer:
    server = InProcessServer(tmp_path / "data", config=ServerConfig(limits=LIMITS, **config))
    await server.start()
    return server


@pytest.fixture
async def direct(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """No trusted proxies (the default)."""
    server = await start(tmp_path)
    yield server
    await server.stop()


@pytest.fixture
async def behind_proxy(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """127.0.0.1 is the operator's load balancer."""
    server = await start(tmp_path, trusted_proxies=("127.0.0.1",))
    yield server
    await server.stop()


async def login(http: httpx.AsyncClient, email: str, password: str, via: str = "") -> int:
    headers = {"X-Forwarded-For": via} if via else {}
    answer = await http.post(
        f"/api/v1/apps/{APP}/auth/email/login",
        json={"email": email, "password": password},
        headers=headers,
    )
    if answer.status_code == 429:
        assert answer.json()["code"] == "too_many_attempts"
    return answer.status_code


async def register(http: httpx.AsyncClient, email: str, via: str = "") -> httpx.Response:
    headers = {"X-Forwarded-For": via} if via else {}
    return await http.post(
        f"/api/v1/apps/{APP}/auth/email/register",
        json={"email": email, "password": RIGHT},
        headers=headers,
    )


async def test_rotating_x_forwarded_for_does_not_escape_the_limit(
    direct: InProcessServer,
) -> None:
    async with httpx.AsyncClient(base_url=direct.url) as http:
        assert (await register(http, "v@example.com")).status_code == 201
        same_account = [
            await login(http, "v@example.com", "wrong", via=f"198.51.100.{i}") for i in range(5)
        ]
        assert same_account == [401, 401, 401, 429, 429]
        many_accounts = [
            await login(http, f"n{i}@example.com", "wrong", via=f"198.51.100.{i}")
            for i in range(12)
        ]
    # the address's failures count whatever the header says: 3 + 3 reach its limit of 6
    assert many_accounts[:3] == [401] * 3
    assert set(many_accounts[3:]) == {429}


async def test_an_attacker_slows_only_himself(behind_proxy: InProcessServer) -> None:
    attacker, victim = "203.0.113.66", "192.0.2.10"
    async with httpx.AsyncClient(base_url=behind_proxy.url) as http:
        assert (await register(http, "v@example.com", via=victim)).status_code == 201
        # the attacker hammers the victim's account from one address
        answers = [await login(http, "v@example.com", "guess", via=attacker) for _ in range(6)]
        assert answers[:3] == [401] * 3 and set(answers[3:]) == {429}
        # the victim, from its own address, logs in with the right password
        assert await login(http, "v@example.com", RIGHT, via=victim) == 200
        # the attacker's address is limited for other accounts once its failures add up
        answers = [await login(http, f"n{i}@example.com", "x", via=attacker) for i in range(5)]
        assert 429 in answers
        # registrations from the victim's address are untouched by all this
        assert (await register(http, "w@example.com", via=victim)).status_code == 201
        # other users behind the same balancer log in
        assert await login(http, "w@example.com", RIGHT, via="192.0.2.11") == 200


async def test_a_guessing_attack_spread_over_addresses_hits_the_account_ceiling(
    behind_proxy: InProcessServer,
) -> None:
    async with httpx.AsyncClient(base_url=behind_proxy.url) as http:
        assert (await register(http, "v@example.com")).status_code == 201
        answers = [
            await login(http, "v@example.com", "guess", via=f"198.51.100.{i}") for i in range(12)
        ]
    assert answers[:8] == [401] * 8  # two per address: under the per-address limits
    assert set(answers[8:]) == {429}  # the account's overall ceiling (8 a minute)


async def test_anonymous_sign_ups_are_limited_per_address(behind_proxy: InProcessServer) -> None:
    path = f"/api/v1/apps/{APP}/auth/anonymous"
    async with httpx.AsyncClient(base_url=behind_proxy.url) as http:
        codes = [
            (await http.post(path, json={}, headers={"X-Forwarded-For": "203.0.113.7"})).status_code
            for _ in range(6)
        ]
        assert codes == [200] * 4 + [429] * 2
        other = await http.post(path, json={}, headers={"X-Forwarded-For": "203.0.113.8"})
        assert other.status_code == 200


async def test_registering_an_existing_address_answers_as_a_new_one(tmp_path: Path) -> None:
    sent: list[DeliveryMessage] = []
    apps = {APP: AppSettings(APP, (EMAIL_PASSWORD,), auto_confirm=False)}
    config = ServerConfig(
        development_mode=False,
        limits=LIMITS,
        auth=AuthSettings(apps, (), (), sent.append),
    )
    async with InProcessServer(tmp_path / "data", config=config) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            new = await register(http, "ann@example.com")
            again = await register(http, "Ann@Example.com")
            assert (new.status_code, new.json()) == (again.status_code, again.json())
            assert new.status_code == 201
            assert set(new.headers) == set(again.headers)
    kinds = [(m.kind, m.email) for m in sent]
    assert kinds == [("confirm", "ann@example.com"), (REGISTERED_AGAIN, "ann@example.com")]
    assert sent[1].token == ""


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="not an IP address or network"):
        ServerConfig(trusted_proxies=("lb.example.com",))
    assert ServerConfig(trusted_proxies=("10.0.0.0/8", "::1")).trusted_proxies
