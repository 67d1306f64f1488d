"""A hostile sync client for the rules tests, and readers of what a server stored.

:class:`Hostile` speaks the raw protocol (``tidesync.protocol``'s ``ClientProtocol`` over a
real WebSocket), so it can send what no honest device makes: SETs and ERASEs of objects it
never had, timestamps an hour ahead. It records what the server sent back: the keys of the
objects it was given (whole or as instructions) and the compensating writes (ERROR 231).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack_instructions, unpack_instructions
from tidesync.protocol.client import DownloadReceived, ErrorReceived
from tidesync.protocol.messages import ErrorCode
from tidesync.server.storage.base import ServerStorage

from .test_server_sync import RawClient

#: An hour, in HLC wall-time milliseconds.
HOUR_MS = 3_600_000


def now_ms() -> int:
    """The wall clock in milliseconds (what honest devices put in their HLCs)."""
    return int(time.time() * 1000)


async def log_in(url: str, app_id: str) -> tuple[str, str]:
    """A fresh anonymous user of ``app_id``: ``(user id, access token)``."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post(f"/api/v1/apps/{app_id}/auth/anonymous", json={})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["user_id"], body["access_token"]


class Hostile:
    """One raw client with one session bound to ``ident``, uploading what it is told."""

    def __init__(self, client: RawClient, user_id: str, ident: str) -> None:
        self.client = client
        self.user_id = user_id
        self.ident = ident
        self.version = 0
        self.counter = 0
        #: ``(model, pk)`` of every object the server sent (whole, or instructions on it).
        self.received: set[tuple[str, Any]] = set()
        #: The messages of the ERROR 231 (compensating write) the server sent.
        self.refusals: list[str] = []

    @classmethod
    async def connect(
        cls, url: str, app_id: str, ident: str, schema: list[dict[str, Any]]
    ) -> Hostile:
        """Log in anonymously to the server at ``url`` and bind session 1."""
        user_id, token = await log_in(url, app_id)
        ws_url = "ws" + url[len("http") :]
        client = await RawClient.connect(ws_url, token, app_id)
        await client.welcome()
        await client.bind(1, ident, schema=schema)
        return cls(client, user_id, ident)

    def hlc(self, wall: int) -> HLC:
        """A timestamp of this client at ``wall`` (distinct from every earlier one)."""
        self.counter += 1
        return HLC(wall, self.counter, self.ident)

    def set(self, model: str, pk: Any, field: str, value: Any, wall: int) -> Instruction:
        """SET one field."""
        return Instruction(Op.SET, model, pk, self.hlc(wall), field=field, value=value)

    def erase(self, model: str, pk: Any, wall: int) -> Instruction:
        """ERASE an object."""
        return Instruction(Op.ERASE, model, pk, self.hlc(wall))

    def create(self, model: str, pk: Any, values: dict[str, Any], wall: int) -> Instruction:
        """CREATE an object with ``values``."""
        return Instruction(Op.CREATE, model, pk, self.hlc(wall), value=values)

    async def send(self, *changesets: list[Instruction]) -> int:
        """Upload one changeset per list, without waiting; returns the last version."""
        numbered = []
        for instructions in changesets:
            self.version += 1
            numbered.append((self.version, pack_instructions(instructions)))
        await self.client.upload(1, numbered)
        return self.version

    async def pump(self, within: float = 10.0) -> Any:
        """Take the next event, recording what it carried."""
        event = await self.client.next_event(within)
        if isinstance(event, DownloadReceived):
            for cs in event.changesets:
                for ins in unpack_instructions(cs.instructions, cs.origin):
                    self.received.add((ins.model, ins.pk))
            for obj in event.objects:
                if obj.state is not None:
                    self.received.add((obj.model, obj.pk))
            for block in event.rows:
                for update in block.updates():
                    self.received.add((update.model, update.pk))
        elif isinstance(event, ErrorReceived):
            if event.code != ErrorCode.COMPENSATING_WRITE:
                raise AssertionError(f"unexpected error: {event}")
            self.refusals.append(event.message)
        return event

    async def wait_acked(self, version: int, within: float = 20.0, quiet: float = 0.3) -> None:
        """Until ``version`` is acknowledged, then until the refusal that may follow it
        (ERROR 231 comes right after the DOWNLOAD that acknowledges) or ``quiet`` seconds
        without a message."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.client.proto.progress(1).upload_acked < version:
            await self.pump(max(0.01, deadline - loop.time()))
        if quiet > 0:
            await self.drain(quiet)

    async def caught_up(self, within: float = 20.0) -> None:
        """Upload nothing more and wait until the session has downloaded everything the
        server had when this is called (a changeset of its own, then its echo cursor)."""
        version = await self.send([])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            event = await self.pump(max(0.01, deadline - loop.time()))
            if (
                isinstance(event, DownloadReceived)
                and event.upload_acked >= version
                and event.cursor >= event.latest_server_version
            ):
                break
        await self.drain(0.3)

    async def drain(self, quiet: float) -> None:
        """Take events until none comes for ``quiet`` seconds."""
        while True:
            try:
                await self.pump(quiet)
            except TimeoutError:
                return

    async def close(self) -> None:
        """Close the WebSocket (without waiting long for a reply: the frames the server
        sent meanwhile may fill the client's queue, and no one reads them any more)."""
        self.client.ws.close_timeout = 1
        await self.client.close()


async def stored_log(storage: ServerStorage, app_id: str) -> list[tuple[str, Instruction]]:
    """``(origin, instruction)`` of every instruction the app's history holds, in order."""
    out: list[tuple[str, Instruction]] = []
    after = 0
    for _ in range(100_000):
        page = await storage.read_log(app_id, after, 1 << 22)
        for e in page.entries:
            out += [(e.origin, ins) for ins in unpack_instructions(e.instructions, e.origin)]
        if page.cursor >= page.latest_version or page.cursor <= after:
            return out
        after = page.cursor
    raise AssertionError("the log did not end")


def rules_config(folder: Path, rules: str, app_id: str = "todo") -> Path:
    """A server configuration file with ``app_id`` (anonymous and email/password login,
    addresses confirmed at once) and ``rules``."""
    path = folder / "tidesync.toml"
    path.write_text(
        f'[apps.{app_id}]\nauth = ["anonymous", "email_password"]\nauto_confirm = true\n\n{rules}'
    )
    return path
