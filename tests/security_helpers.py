"""Raw sync-protocol clients for the security and fuzz tests (no tidesync client logic)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack_instructions
from tidesync.core.schema import ModelSchema
from tidesync.protocol import messages as m
from tidesync.protocol.codec import decode_frame, encode_frame
from tidesync.server.runner import InProcessServer


def note_schema() -> dict[str, Any]:
    """The schema dict of a small model ``Note(id: str, text: str, n: int)``."""
    import tidesync as ts

    class Note(ts.Model):
        id: str = ts.primary_key()
        text: str = ""
        n: int = 0

    schema: ModelSchema = Note.__schema__
    return schema.to_dict()


def valid_changeset(origin: str, pk: str, text: str, version: int = 1) -> m.UploadChangeset:
    """A well-formed one-instruction upload creating ``Note(pk, text)``."""
    hlc = HLC(1_700_000_000_000 + version, 0, origin)
    ins = [Instruction(Op.CREATE, "Note", pk, hlc, None, {"id": pk, "text": text, "n": version})]
    return m.UploadChangeset(version, pack_instructions(ins))


async def login(server: InProcessServer, app_id: str) -> dict[str, str]:
    """A fresh anonymous user's tokens."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post(f"/api/v1/apps/{app_id}/auth/anonymous", json={})
    assert answer.status_code == 200, answer.text
    body: dict[str, str] = answer.json()
    return body


class Raw:
    """One raw WebSocket to the sync endpoint."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, server: InProcessServer, app_id: str) -> Raw:
        url = f"{server.ws_url}/api/v1/apps/{app_id}/sync"
        return cls(await connect(url, max_size=None, ping_interval=None, compression=None))

    async def send(self, msg: Any) -> None:
        await self.send_bytes(encode_frame(msg))

    async def send_bytes(self, frame: bytes | str) -> None:
        try:
            await self.ws.send(frame)
        except ConnectionClosed:
            pass

    async def recv(self, limit: float = 10.0) -> Any:
        """The next message, or None once the server closed the connection."""
        try:
            frame = await asyncio.wait_for(self.ws.recv(decode=False), limit)
        except ConnectionClosed:
            return None
        return decode_frame(frame, max_frame_size=1 << 30)

    async def until(self, kind: type, limit: float = 10.0) -> Any:
        """Skip messages until one of ``kind`` (or None at close)."""
        while True:
            msg = await self.recv(limit)
            if msg is None or isinstance(msg, kind):
                return msg

    async def hello(self, token: str) -> Any:
        await self.send(m.Hello([2], token, False))
        return await self.recv()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


async def state_digest(server: InProcessServer, app_ids: list[str]) -> str:
    """A digest of everything stored for the apps: history (every byte of every changeset)
    and materialised objects."""
    h = hashlib.sha256()
    for app in app_ids:
        latest = await server.storage.latest_version(app)
        h.update(f"{app}:{latest}".encode())
        page = await server.storage.read_log(app, 0, 1 << 30)
        for e in page.entries:
            h.update(repr((e.server_version, e.origin, e.client_version)).encode())
            h.update(e.instructions)
        for model in sorted(await server.storage.get_schemas(app)):
            objects = await server.storage.get_objects(app, model)
            h.update(repr(sorted(objects.items(), key=repr)).encode())
    return h.hexdigest()
