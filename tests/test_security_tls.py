"""TLS: https/wss with certificates made at test time (trustme); clients verify by default
and accept a custom CA bundle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trustme

import tidesync as ts
from tidesync.errors import AuthError
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer
from tidesync.testing import ServerProcess

T = ts.TimeoutCancellationToken


class Memo(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


def make_certs(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, bundle = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(bundle))
    return chain, key, bundle


async def test_https_and_wss_with_a_custom_ca(tmp_path: Path) -> None:
    chain, key, bundle = make_certs(tmp_path)
    config = ServerConfig(tls_cert=str(chain), tls_key=str(key))
    async with InProcessServer(tmp_path / "data", config=config) as server:
        assert server.url.startswith("https://")
        # default: the system's CAs, which do not know this certificate
        plain = ts.App(ts.AppConfiguration("todo", base_url=server.url, base_path=tmp_path / "p"))
        with pytest.raises(AuthError, match=r"TLS certificate of 127.0.0.1 could not be verified"):
            await plain.log_in(ts.Credentials.anonymous())
        plain.close()
        app = ts.App(
            ts.AppConfiguration(
                "todo", base_url=server.url, base_path=tmp_path / "c", ca_bundle=bundle
            )
        )
        assert app.sync_url().startswith("wss://")
        user = await app.log_in(ts.Credentials.anonymous())
        errors: list[Exception] = []
        db = ts.Database(
            ts.Configuration.flexible_sync(
                user, [Memo], sync_error_handler=lambda s, e: errors.append(e)
            )
        )
        with db.write():
            db.add(Memo(id="m", text="over wss"))
        await db.sync_session.wait_for_upload(T(20))
        assert errors == []
        assert "m" in await server.storage.get_objects("todo", "Memo")
        db.close()
        app.close()


async def test_serve_command_with_tls(tmp_path: Path) -> None:
    chain, key, bundle = make_certs(tmp_path)
    proc = ServerProcess(
        tmp_path / "data", extra_args=["--tls-cert", str(chain), "--tls-key", str(key)]
    )
    await asyncio.to_thread(proc.start)
    try:
        assert proc.url.startswith("https://127.0.0.1:")
        app = ts.App(
            ts.AppConfiguration(
                "todo", base_url=proc.url, base_path=tmp_path / "c", ca_bundle=bundle
            )
        )
        await app.log_in(ts.Credentials.anonymous())
        app.close()
    finally:
        await asyncio.to_thread(proc.kill)
