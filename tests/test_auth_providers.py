"""Auth providers against a real in-process server: email/password, API keys, custom JWT,
admin keys, the configuration file and per-app providers."""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

import tidesync as ts
from tidesync.errors import AuthError, ConfigurationError
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer
from tidesync.server.settings import DeliveryMessage, load_config
from tidesync.server.users import USERS_FILE

ADMIN_KEY = "admin-key-0123456789abcdef"
HS_SECRET = "idp-shared-secret-0123456789abcdefghij"


def users_bytes(server: InProcessServer) -> bytes:
    """Every byte of the users database (main file and write-ahead log)."""
    base = server.data_dir / USERS_FILE
    parts = [base, base.with_name(USERS_FILE + "-wal")]
    return b"".join(p.read_bytes() for p in parts if p.exists())


def make_app(server: InProcessServer, root: Path, name: str, app_id: str = "todo") -> ts.App:
    return ts.App(ts.AppConfiguration(app_id, base_url=server.url, base_path=root / name))


@pytest.fixture
async def dev_server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(tmp_path / "data") as srv:
        yield srv


async def test_email_password_in_development_mode(
    dev_server: InProcessServer, tmp_path: Path
) -> None:
    app = make_app(dev_server, tmp_path, "dev")
    await app.email_password_auth.register_user("Ann@Example.com", "correct horse")
    user = await app.log_in(ts.Credentials.email_password("ann@example.com", "correct horse"))
    assert app.current_user is user
    # same error for a wrong password and an unknown account
    with pytest.raises(AuthError) as wrong:
        await app.log_in(ts.Credentials.email_password("ann@example.com", "wrong password"))
    with pytest.raises(AuthError) as unknown:
        await app.log_in(ts.Credentials.email_password("nobody@example.com", "correct horse"))
    assert str(wrong.value) == str(unknown.value)
    assert "unknown user or wrong password" in str(wrong.value)
    # registering the address again answers as a new registration (no account discovery);
    # the account keeps its password
    await app.email_password_auth.register_user("ann@example.com", "another one")
    with pytest.raises(AuthError, match="unknown user or wrong password"):
        await app.log_in(ts.Credentials.email_password("ann@example.com", "another one"))
    with pytest.raises(AuthError, match="password must have"):
        await app.email_password_auth.register_user("bob@example.com", "123")
    with pytest.raises(AuthError, match="not valid"):
        await app.email_password_auth.register_user("not an address", "long enough")
    # passwords are stored as argon2 hashes, never in clear
    raw = users_bytes(dev_server)
    assert b"correct horse" not in raw and b"$argon2id$" in raw
    assert stat.S_IMODE((dev_server.data_dir / USERS_FILE).stat().st_mode) == 0o600
    app.close()


def production_config(tmp_path: Path, sent: list[DeliveryMessage], **extra: str) -> ServerConfig:
    pem = extra.get("rs_pem") or (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    (tmp_path / "rs.pem").write_text(pem)
    text = f"""
[server]
admin_keys = ["{ADMIN_KEY}"]

[limits]
login_attempts_per_account = 50

[apps.todo]
auth = ["email_password", "api_key", "jwt"]

[apps.todo.jwt]
algorithm = "HS256"
secret = "{HS_SECRET}"
audience = "todo"
fields = {{ email = "email", display_name = "name" }}

[apps.todo.rules.Task]
read = true

[apps.rsapp]
auth = ["jwt"]

[apps.rsapp.jwt]
algorithm = "{extra.get("rs_alg", "RS256")}"
public_key_file = "rs.pem"
"""
    path = tmp_path / "tidesync.toml"
    path.write_text(text)
    config = load_config(path)
    assert not config.development_mode
    assert config.auth.apps["todo"].rules == {"Task": {"read": True}}
    return ServerConfig(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "auth": type(config.auth)(config.auth.apps, config.auth.admin_keys, (), sent.append),
        }
    )


async def test_confirmation_and_reset_with_a_delivery_function(tmp_path: Path) -> None:
    sent: list[DeliveryMessage] = []
    config = production_config(tmp_path, sent)
    async with InProcessServer(tmp_path / "data", config=config) as server:
        app = make_app(server, tmp_path, "prod")
        auth = app.email_password_auth
        await auth.register_user("c@example.com", "first password")
        assert [m.kind for m in sent] == ["confirm"] and sent[0].email == "c@example.com"
        with pytest.raises(AuthError, match="not confirmed"):
            await app.log_in(ts.Credentials.email_password("c@example.com", "first password"))
        with pytest.raises(AuthError, match="invalid or expired"):
            await auth.confirm_user("forged-token")
        await auth.confirm_user(sent[0].token)
        with pytest.raises(AuthError, match="invalid or expired"):
            await auth.confirm_user(sent[0].token)  # a token works once
        user = await app.log_in(ts.Credentials.email_password("c@example.com", "first password"))
        # reset: unknown addresses get the same answer and no delivery
        await auth.send_reset_password_email("unknown@example.com")
        assert len(sent) == 1
        await auth.send_reset_password_email("c@example.com")
        assert sent[-1].kind == "reset"
        await auth.reset_password(sent[-1].token, "second password")
        with pytest.raises(AuthError):
            await app.log_in(ts.Credentials.email_password("c@example.com", "first password"))
        # a reset revokes the old refresh tokens
        with pytest.raises(AuthError, match="revoked"):
            await user.refresh_access_token()
        await app.log_in(ts.Credentials.email_password("c@example.com", "second password"))
        # providers not enabled for the app, and undeclared apps, are refused
        with pytest.raises(AuthError, match="not enabled"):
            await app.log_in(ts.Credentials.anonymous())
        other = make_app(server, tmp_path, "other", app_id="undeclared")
        with pytest.raises(AuthError, match="no app 'undeclared'"):
            await other.log_in(ts.Credentials.anonymous())
        app.close()
        other.close()


async def test_delivery_command_gets_the_token(tmp_path: Path) -> None:
    out = tmp_path / "mail.txt"
    script = tmp_path / "deliver.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $2 $TIDESYNC_TOKEN" >> {out}\n')
    script.chmod(0o700)
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        f'[delivery]\ncommand = ["{script}", "{{kind}}", "{{email}}"]\n'
        '[apps.todo]\nauth = ["email_password"]\n'
    )
    async with InProcessServer(tmp_path / "data", config=load_config(config_file)) as server:
        app = make_app(server, tmp_path, "cmd")
        await app.email_password_auth.register_user("d@example.com", "a password")
        kind, email, token = out.read_text().split()
        assert (kind, email) == ("confirm", "d@example.com")
        await app.email_password_auth.confirm_user(token)
        await app.log_in(ts.Credentials.email_password("d@example.com", "a password"))
        app.close()


async def test_development_mode_logs_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tidesync.server.auth")
    async with InProcessServer(tmp_path / "data") as server:
        app = make_app(server, tmp_path, "log")
        await app.email_password_auth.register_user("e@example.com", "a password")
        await app.email_password_auth.send_reset_password_email("e@example.com")
        app.close()
    assert any("reset token for e@example.com" in r.getMessage() for r in caplog.records)


async def test_api_keys_of_a_user(dev_server: InProcessServer, tmp_path: Path) -> None:
    app = make_app(dev_server, tmp_path, "keys")
    owner = await app.log_in(ts.Credentials.anonymous())
    key = await owner.api_keys.create("backend")
    assert key.key and not key.disabled
    assert [k.name for k in await owner.api_keys.list()] == ["backend"]
    assert (await owner.api_keys.list())[0].key is None  # shown once only
    with pytest.raises(AuthError, match="already exists"):
        await owner.api_keys.create("backend")
    via_key = await app.log_in(ts.Credentials.api_key(key.key))
    assert via_key.id == owner.id
    await owner.api_keys.disable(key.id)
    with pytest.raises(AuthError, match="unknown or disabled API key"):
        await app.log_in(ts.Credentials.api_key(key.key))
    await owner.api_keys.enable(key.id)
    await app.log_in(ts.Credentials.api_key(key.key))
    # another user cannot touch the key
    stranger = await make_app(dev_server, tmp_path, "s").log_in(ts.Credentials.anonymous())
    assert await stranger.api_keys.list() == []
    with pytest.raises(AuthError, match="no such API key"):
        await stranger.api_keys.delete(key.id)
    await owner.api_keys.delete(key.id)
    assert await owner.api_keys.list() == []
    with pytest.raises(AuthError):
        await app.log_in(ts.Credentials.api_key(key.key))
    assert key.key.encode() not in users_bytes(dev_server)
    app.close()


async def test_custom_jwt_and_admin_keys(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sent: list[DeliveryMessage] = []
    config = production_config(tmp_path, sent, rs_pem=pem.decode())
    async with InProcessServer(tmp_path / "data", config=config) as server:
        app = make_app(server, tmp_path, "jwt")
        now = time.time()
        claims = {"sub": "ext-1", "aud": "todo", "exp": now + 60, "email": "x@idp", "name": "X"}
        user = await app.log_in(ts.Credentials.jwt(jwt.encode(claims, HS_SECRET, "HS256")))
        again = await app.log_in(ts.Credentials.jwt(jwt.encode(claims, HS_SECRET, "HS256")))
        assert again.id == user.id  # the same external subject is the same user
        async with httpx.AsyncClient(base_url=server.url) as http:
            me = await http.get(
                "/api/v1/apps/todo/auth/me",
                headers={"Authorization": f"Bearer {user.access_token}"},
            )
        assert me.json()["email"] == "x@idp" and me.json()["display_name"] == "X"
        for bad in (
            jwt.encode({**claims, "exp": now - 1}, HS_SECRET, "HS256"),
            jwt.encode(claims, "some-other-secret-0123456789abcdefghijk", "HS256"),
            jwt.encode({**claims, "aud": "elsewhere"}, HS_SECRET, "HS256"),
            jwt.encode({k: v for k, v in claims.items() if k != "exp"}, HS_SECRET, "HS256"),
            jwt.encode(claims, private, "RS256"),  # algorithm confusion
            "not-a-token",
        ):
            with pytest.raises(AuthError, match="identity token"):
                await app.log_in(ts.Credentials.jwt(bad))
        rs_app = make_app(server, tmp_path, "rs", app_id="rsapp")
        rs_user = await rs_app.log_in(ts.Credentials.jwt(jwt.encode(claims, private, "RS256")))
        assert rs_user.id != user.id
        with pytest.raises(AuthError):
            await rs_app.log_in(ts.Credentials.jwt(jwt.encode(claims, HS_SECRET, "HS256")))
        # server admin key: logs in as a server user, and may disable / delete users
        admin = await app.log_in(ts.Credentials.api_key(ADMIN_KEY))
        assert admin.id not in (user.id, rs_user.id)
        async with httpx.AsyncClient(base_url=server.url) as http:
            path = f"/api/v1/apps/todo/admin/users/{user.id}"
            refused = await http.post(f"{path}/disable", headers={"Authorization": "Bearer x"})
            assert refused.status_code == 401
            ok = await http.post(
                f"{path}/disable", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            assert ok.status_code == 204
        with pytest.raises(AuthError, match="disabled"):
            await user.refresh_access_token()
        with pytest.raises(AuthError):
            await app.log_in(ts.Credentials.jwt(jwt.encode(claims, HS_SECRET, "HS256")))
        app.close()
        rs_app.close()


async def test_eddsa_identity_provider(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = production_config(tmp_path, [], rs_pem=pem.decode(), rs_alg="EdDSA")
    async with InProcessServer(tmp_path / "data", config=config) as server:
        app = make_app(server, tmp_path, "ed", app_id="rsapp")
        token = jwt.encode({"sub": "e", "exp": time.time() + 60}, private, "EdDSA")
        await app.log_in(ts.Credentials.jwt(token))
        app.close()


def test_config_file_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    cases = {
        "[server]\nadmin_key = ['x']\n": "unknown key(s) in [server]: admin_key",
        "[apps.a]\nauth = ['password']\n": "unknown provider(s) password",
        "[apps.a]\nauth = ['jwt']\n": "[jwt] is missing",
        "[limits]\nmax_query_length = 0\n": "limits.max_query_length",
        "[limits]\nmax_query_lenght = 5\n": "max_query_lenght",
        "[server]\nadmin_keys = ['short']\n": "at least 16",
        "[apps.a.jwt]\nalgorithm = 'none'\nsecret='0123456789abcdef0'\n": "jwt.algorithm",
        "[server\n": "not valid TOML",
        "[server]\nmax_frame_size = 'big'\n": "server.max_frame_size",
    }
    for text, words in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigurationError) as info:
            load_config(path)
        assert words in str(info.value), (text, str(info.value))
