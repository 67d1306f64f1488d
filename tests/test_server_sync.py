"""The sync endpoint over real loopback WebSockets, driven by a raw protocol client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack, pack_instructions
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.errors import SyncAction
from tidesync.protocol.client import (
    ClientEvent,
    ClientProtocol,
    DownloadReceived,
    ErrorReceived,
    MarkReplied,
    SessionBound,
    SessionUnbound,
    Welcomed,
)
from tidesync.protocol.codec import encode_frame
from tidesync.protocol.messages import (
    ErrorCode,
    PongReceived,
    Upload,
    UploadChangeset,
    refused_changesets_of,
)
from tidesync.server.config import ServerConfig
from tidesync.server.runner import InProcessServer
from tidesync.server.storage import SQLiteStorage, UploadBatch, UploadResult

E = TypeVar("E")
APP = "todo"

TASK = ModelSchema(
    "Task",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("title", Kind.STR),
        FieldSchema("done", Kind.BOOL),
    ),
    "id",
)
SCHEMA = [TASK.to_dict()]


def create_task(origin: str, pk: str, title: str, wall: int = 1000) -> bytes:
    """Packed instructions of one changeset creating Task ``pk``."""
    ins = Instruction(
        Op.CREATE,
        "Task",
        pk,
        HLC(wall, 0, origin),
        value={"id": pk, "title": title, "done": False},
    )
    return pack_instructions([ins])


async def login(server: InProcessServer, app_id: str = APP) -> dict[str, str]:
    """Anonymous login over HTTP: user_id, access_token, refresh_token."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post(f"/api/v1/apps/{app_id}/auth/anonymous", json={})
    assert response.status_code == 200, response.text
    data: dict[str, str] = response.json()
    return data


class RawClient:
    """A WebSocket plus a ClientProtocol; collects events, waits for the ones asked for."""

    def __init__(self, ws: ClientConnection, proto: ClientProtocol) -> None:
        self.ws = ws
        self.proto = proto
        self.events: list[ClientEvent] = []

    @classmethod
    async def connect(
        cls, base_ws_url: str, token: str, app_id: str = APP, *, hello: bool = True
    ) -> RawClient:
        ws = await websockets.connect(f"{base_ws_url}/api/v1/apps/{app_id}/sync", max_size=None)
        client = cls(ws, ClientProtocol())
        if hello:
            client.proto.start(token)
            await client.flush()
        return client

    async def flush(self) -> None:
        for frame in self.proto.data_to_send():
            await self.ws.send(frame)

    async def send_raw(self, frame: bytes) -> None:
        await self.ws.send(frame)

    async def next_event(self, within: float = 5.0) -> ClientEvent:
        while not self.events:
            frame = await asyncio.wait_for(self.ws.recv(), within)
            assert isinstance(frame, bytes)
            self.events.extend(self.proto.receive_data(frame))
            await self.flush()
        return self.events.pop(0)

    async def expect(self, kind: type[E], within: float = 5.0) -> E:
        """The next event of ``kind``; other events before it are dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            event = await self.next_event(max(0.01, deadline - loop.time()))
            if isinstance(event, kind):
                return event
            if isinstance(event, ErrorReceived) and kind is not ErrorReceived:
                raise AssertionError(f"unexpected error: {event}")

    async def welcome(self) -> Welcomed:
        return await self.expect(Welcomed)

    async def bind(
        self, session: int, file_ident: str, cursor: int = 0, acked: int = 0, schema: Any = None
    ) -> SessionBound:
        self.proto.bind(session, file_ident, SCHEMA if schema is None else schema, cursor, acked)
        await self.flush()
        return await self.expect(SessionBound)

    async def upload(self, session: int, changesets: list[tuple[int, bytes]]) -> None:
        cursor = self.proto.progress(session).download_cursor
        self.proto.upload(session, [UploadChangeset(v, b) for v, b in changesets], cursor)
        await self.flush()

    async def wait_acked(self, session: int, version: int, within: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.proto.progress(session).upload_acked < version:
            await self.expect(DownloadReceived, max(0.01, deadline - loop.time()))

    async def downloads_until(self, session: int, cursor: int) -> list[DownloadReceived]:
        got: list[DownloadReceived] = []
        while self.proto.progress(session).download_cursor < cursor:
            got.append(await self.expect(DownloadReceived))
        return got

    async def closed_code(self, within: float = 5.0) -> int | None:
        """Wait for the server to close; return its close code."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), within)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None

    async def close(self) -> None:
        await self.ws.close()


async def connect_bound(
    server: InProcessServer, file_ident: str, session: int = 1
) -> tuple[RawClient, dict[str, str]]:
    tokens = await login(server)
    client = await RawClient.connect(server.ws_url, tokens["access_token"])
    await client.welcome()
    await client.bind(session, file_ident)
    return client, tokens


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(tmp_path / "data", config=ServerConfig(max_frame_size=8192)) as srv:
        yield srv


async def snapshot(server: InProcessServer) -> tuple[int, dict[Any, dict[str, Any]]]:
    storage = server.storage
    return await storage.latest_version(APP), await storage.get_objects(APP, "Task")


# -- the happy path ----------------------------------------------------------------------------


async def test_hello_bind_upload_ack_and_fanout(server: InProcessServer) -> None:
    alice, _ = await connect_bound(server, "file-a")
    bob, _ = await connect_bound(server, "file-b")
    first_a = await alice.expect(DownloadReceived)  # every bind gets a first DOWNLOAD
    assert (first_a.cursor, first_a.latest_server_version, first_a.upload_acked) == (0, 0, 0)
    await bob.expect(DownloadReceived)

    await alice.upload(1, [(1, create_task("file-a", "t1", "buy milk"))])
    ack = await alice.expect(DownloadReceived)
    assert ack.upload_acked == 1
    assert ack.changesets == []  # never its own changeset back
    assert ack.cursor == ack.latest_server_version == 1

    got = await bob.expect(DownloadReceived)
    assert [(c.server_version, c.origin, c.client_version) for c in got.changesets] == [
        (1, "file-a", 1)
    ]
    assert got.changesets[0].instructions == create_task("file-a", "t1", "buy milk")
    assert got.cursor == 1 and got.downloadable_bytes == 0

    latest, objects = await snapshot(server)
    assert latest == 1
    assert objects == {"t1": {"id": "t1", "title": "buy milk", "done": False}}
    await alice.close()
    await bob.close()


async def test_late_binder_downloads_history_in_pages_then_mark(tmp_path: Path) -> None:
    config = ServerConfig(max_frame_size=8192, download_page_bytes=150)
    async with InProcessServer(tmp_path, config=config) as server:
        writer, _ = await connect_bound(server, "writer")
        versions = [(v, create_task("writer", f"t{v}", "x" * 60, wall=v)) for v in range(1, 9)]
        await writer.upload(1, versions)
        await writer.wait_acked(1, 8)

        reader, _ = await connect_bound(server, "reader")
        request = reader.proto.mark(1)
        await reader.flush()
        pages: list[DownloadReceived] = []
        while True:
            event = await reader.next_event()
            if isinstance(event, MarkReplied):
                break
            assert isinstance(event, DownloadReceived)
            pages.append(event)
        assert event.request_id == request and event.server_version == 8
        received = [c.server_version for p in pages for c in p.changesets]
        assert received == list(range(1, 9))
        assert len([p for p in pages if p.changesets]) > 1  # paged
        remaining = [p.downloadable_bytes for p in pages if p.changesets]
        assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 0
        await writer.close()
        await reader.close()


async def test_mark_on_caught_up_session_replies_at_once(server: InProcessServer) -> None:
    client, _ = await connect_bound(server, "f1")
    await client.expect(DownloadReceived)
    request = client.proto.mark(1)
    await client.flush()
    reply = await client.expect(MarkReplied)
    assert (reply.request_id, reply.server_version) == (request, 0)
    await client.close()


async def test_duplicate_upload_is_applied_once(server: InProcessServer) -> None:
    tokens = await login(server)
    first = await RawClient.connect(server.ws_url, tokens["access_token"])
    second = await RawClient.connect(server.ws_url, tokens["access_token"])
    for client in (first, second):
        await client.welcome()
        await client.bind(1, "same-file")
    data = create_task("same-file", "t1", "once")
    await first.upload(1, [(1, data)])
    await first.wait_acked(1, 1)
    await second.upload(1, [(1, data)])  # the same version again (e.g. after a reconnect)
    await second.wait_acked(1, 1)
    latest, objects = await snapshot(server)
    assert latest == 1
    assert list(objects) == ["t1"]
    await first.close()
    await second.close()


async def test_unbind_and_ping(server: InProcessServer) -> None:
    client, _ = await connect_bound(server, "f1")
    client.proto.ping(1234)
    await client.flush()
    pong = await client.expect(PongReceived)
    assert pong.timestamp_ms == 1234
    client.proto.unbind(1)
    await client.flush()
    assert (await client.expect(SessionUnbound)).session == 1
    await client.bind(1, "f1")  # the number is free again
    await client.close()


class CountingStorage(SQLiteStorage):
    """SQLite storage that counts integrate calls and makes each commit slow."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[int] = []

    async def integrate(self, batches: list[UploadBatch]) -> list[UploadResult]:
        self.calls.append(len(batches))
        await asyncio.sleep(0.05)
        return await super().integrate(batches)


async def test_group_commit_merges_concurrent_uploads(tmp_path: Path) -> None:
    storages: list[CountingStorage] = []

    def factory(folder: Path) -> CountingStorage:
        storages.append(CountingStorage(folder / "server.sqlite3"))
        return storages[-1]

    async with InProcessServer(tmp_path, storage_factory=factory) as server:
        clients = [(await connect_bound(server, f"f{i}"))[0] for i in range(12)]
        for client in clients:
            await client.expect(DownloadReceived)
        await asyncio.gather(
            *(c.upload(1, [(1, create_task(f"f{i}", f"t{i}", "x"))]) for i, c in enumerate(clients))
        )
        await asyncio.gather(*(c.wait_acked(1, 1) for c in clients))
        calls = storages[0].calls
        assert sum(calls) == 12
        assert len(calls) < 12
        assert await server.storage.latest_version(APP) == 12
        for client in clients:
            await client.close()


# -- authentication on the socket -------------------------------------------------------------


async def test_token_expiry_ends_the_connection(tmp_path: Path) -> None:
    config = ServerConfig(access_token_ttl=1.0)
    async with InProcessServer(tmp_path, config=config) as server:
        client, _ = await connect_bound(server, "f1")
        error = await client.expect(ErrorReceived, within=5)
        assert error.code == ErrorCode.TOKEN_EXPIRED
        assert error.action is SyncAction.REFRESH_TOKEN
        assert error.session is None
        assert await client.closed_code() == 1008


async def test_refresh_keeps_the_connection_alive(tmp_path: Path) -> None:
    config = ServerConfig(access_token_ttl=1.5)
    async with InProcessServer(tmp_path, config=config) as server:
        client, tokens = await connect_bound(server, "f1")
        await asyncio.sleep(0.8)
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await http.post(
                f"/api/v1/apps/{APP}/auth/refresh",
                headers={"Authorization": f"Bearer {tokens['refresh_token']}"},
            )
        client.proto.refresh(response.json()["access_token"])
        await client.flush()
        await asyncio.sleep(1.0)  # past the first token's expiry
        client.proto.ping(7)
        await client.flush()
        assert (await client.expect(PongReceived)).timestamp_ms == 7
        error = await client.expect(ErrorReceived, within=5)
        assert error.code == ErrorCode.TOKEN_EXPIRED


@pytest.mark.parametrize(
    ("token", "code"),
    [("not-a-jwt", ErrorCode.BAD_TOKEN), ("", ErrorCode.BAD_TOKEN)],
)
async def test_bad_token_is_refused(server: InProcessServer, token: str, code: ErrorCode) -> None:
    client = await RawClient.connect(server.ws_url, token)
    error = await client.expect(ErrorReceived)
    assert error.code == code and "token" in error.message
    assert await client.closed_code() == 1008


async def test_token_of_another_app_is_refused(server: InProcessServer) -> None:
    bystander, _ = await connect_bound(server, "bystander")
    before = await snapshot(server)
    other = await login(server, "other-app")
    client = await RawClient.connect(server.ws_url, other["access_token"], APP)
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.OTHER_APP and "other-app" in error.message
    assert await client.closed_code() == 1008
    assert await snapshot(server) == before
    await assert_still_works(bystander, "bystander")


# -- bad input: each ends only the offending connection ------------------------------------


async def assert_still_works(client: RawClient, file_ident: str) -> None:
    """The client's session 1 can still upload and get the acknowledgement."""
    acked = client.proto.progress(1).upload_acked
    version = acked + 1
    await client.upload(1, [(version, create_task(file_ident, f"{file_ident}-{version}", "ok"))])
    await client.wait_acked(1, version)
    await client.close()


async def bad_connection(server: InProcessServer) -> RawClient:
    tokens = await login(server)
    client = await RawClient.connect(server.ws_url, tokens["access_token"])
    await client.welcome()
    return client


async def test_frame_over_the_limit(server: InProcessServer) -> None:
    bystander, _ = await connect_bound(server, "bystander")
    before = await snapshot(server)
    client = await bad_connection(server)
    await client.send_raw(b"\x93" + b"x" * 8192)  # 8193 bytes > 8192
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.FRAME_TOO_LARGE and "8192" in error.message
    assert await client.closed_code() == 1009
    assert await snapshot(server) == before
    await assert_still_works(bystander, "bystander")


async def test_garbage_bytes(server: InProcessServer) -> None:
    bystander, _ = await connect_bound(server, "bystander")
    before = await snapshot(server)
    client = await bad_connection(server)
    await client.send_raw(b"\xc4\xff\x00garbage")
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.BAD_SYNTAX
    assert "Traceback" not in error.message
    assert await client.closed_code() == 1002
    assert await snapshot(server) == before
    await assert_still_works(bystander, "bystander")


async def test_text_frame(server: InProcessServer) -> None:
    client = await bad_connection(server)
    await client.ws.send("hello")
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.BAD_SYNTAX and "text frames" in error.message
    assert await client.closed_code() == 1002


async def test_unknown_message_type(server: InProcessServer) -> None:
    bystander, _ = await connect_bound(server, "bystander")
    before = await snapshot(server)
    client = await bad_connection(server)
    await client.send_raw(pack([99, 1, 2]))
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.UNKNOWN_MESSAGE and "99" in error.message
    assert await client.closed_code() == 1002
    assert await snapshot(server) == before
    await assert_still_works(bystander, "bystander")


async def test_upload_before_bind(server: InProcessServer) -> None:
    bystander, _ = await connect_bound(server, "bystander")
    before = await snapshot(server)
    client = await bad_connection(server)
    frame = encode_frame(Upload(1, [UploadChangeset(1, create_task("x", "t", "t"))], 0))
    await client.send_raw(frame)
    error = await client.expect(ErrorReceived)
    assert error.code in (ErrorCode.BAD_SESSION_IDENT, ErrorCode.BAD_MESSAGE_ORDER)
    assert "UPLOAD" in error.message
    assert await client.closed_code() == 1002
    assert await snapshot(server) == before
    await assert_still_works(bystander, "bystander")


async def test_upload_before_hello(server: InProcessServer) -> None:
    client = await RawClient.connect(server.ws_url, "", hello=False)
    client.proto.start("unused")  # only to let the protocol read the server's answer
    client.proto.data_to_send()
    await client.send_raw(encode_frame(Upload(1, [], 0)))
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.BAD_MESSAGE_ORDER and "before HELLO" in error.message
    assert await client.closed_code() == 1002


async def test_upload_of_unknown_model_errors_only_that_session(server: InProcessServer) -> None:
    bystander, _ = await connect_bound(server, "bystander")
    client, _ = await connect_bound(server, "bad-file", session=1)
    await client.bind(2, "good-file")
    before = await snapshot(server)
    bad = Instruction(Op.CREATE, "Ghost", "g1", HLC(1, 0, "bad-file"), value={"id": "g1"})
    await client.upload(1, [(1, pack_instructions([bad]))])
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.BAD_CHANGESET and error.session == 1
    assert "Ghost" in error.message
    assert await snapshot(server) == before
    assert await server.storage.client_version(APP, "bad-file") == 0
    # the connection stays open for its other session, and other clients keep working
    await client.upload(2, [(1, create_task("good-file", "g", "fine"))])
    await client.wait_acked(2, 1)
    await assert_still_works(bystander, "bystander")


async def test_malformed_changeset_bytes(server: InProcessServer) -> None:
    # protocol v3: refused (ERROR 232), integrated as nothing, and the session goes on
    client, _ = await connect_bound(server, "f1")
    _, objects = await snapshot(server)
    await client.upload(1, [(1, b"\xc1\xc1 not msgpack")])
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.CHANGESET_REFUSED and error.session == 1
    [(version, reason)] = refused_changesets_of(error.message)
    assert version == 1 and "malformed" in reason
    await client.upload(1, [(2, create_task("f1", "t", "after"))])
    await client.wait_acked(1, 2)
    _, after = await snapshot(server)
    assert set(after) - set(objects) == {"t"}
    await client.close()


async def test_malformed_changeset_bytes_from_a_v2_client(server: InProcessServer) -> None:
    tokens = await login(server)
    client = await RawClient.connect(server.ws_url, tokens["access_token"], hello=False)
    client.proto.start(tokens["access_token"], versions=[2])
    await client.flush()
    await client.welcome()
    await client.bind(1, "f1")
    before = await snapshot(server)
    await client.upload(1, [(1, b"\xc1\xc1 not msgpack")])
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.BAD_CHANGESET and error.session == 1
    assert await snapshot(server) == before
    await client.close()


# -- bind refusals ------------------------------------------------------------------------------


async def test_incompatible_schema_is_refused(server: InProcessServer) -> None:
    client, _ = await connect_bound(server, "f1")
    changed = ModelSchema(
        "Task",
        (FieldSchema("id", Kind.STR, primary_key=True), FieldSchema("title", Kind.INT)),
        "id",
    )
    client.proto.bind(2, "f2", [changed.to_dict()], 0, 0)
    await client.flush()
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.BAD_SCHEMA and error.session == 2
    assert "title" in error.message
    await client.close()


async def test_file_of_another_user_is_refused(server: InProcessServer) -> None:
    owner, _ = await connect_bound(server, "owned")
    intruder = await bad_connection(server)
    intruder.proto.bind(1, "owned", SCHEMA, 0, 0)
    await intruder.flush()
    error = await intruder.expect(ErrorReceived)
    assert error.code == ErrorCode.BAD_CLIENT_FILE_IDENT and error.session == 1
    await owner.close()
    await intruder.close()


async def test_cursor_beyond_latest_is_refused(server: InProcessServer) -> None:
    client = await bad_connection(server)
    client.proto.bind(1, "f1", SCHEMA, 5, 0)
    await client.flush()
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.CLIENT_RESET_NEEDED and error.session == 1  # data wiped
    assert error.action is SyncAction.CLIENT_RESET
    await client.close()


# -- shutdown -----------------------------------------------------------------------------------


async def test_stop_says_going_away_and_keeps_acknowledged_data(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path)
    await server.start()
    client, _ = await connect_bound(server, "f1")
    await client.upload(1, [(1, create_task("f1", "t1", "kept"))])
    await client.wait_acked(1, 1)
    await server.stop()
    error = await client.expect(ErrorReceived)
    assert error.code == ErrorCode.GOING_AWAY and error.action is SyncAction.RETRY
    assert await client.closed_code() == 1001
    async with InProcessServer(tmp_path) as again:
        assert (await again.storage.get_objects(APP, "Task"))["t1"]["title"] == "kept"


def test_threaded_server_survives_event_loops(tmp_path: Path) -> None:
    import threading

    async def round_trip(server: InProcessServer, file_ident: str) -> int:
        client, _ = await connect_bound(server, file_ident)
        await client.upload(1, [(1, create_task(file_ident, file_ident, "x"))])
        await client.wait_acked(1, 1)
        cursor = client.proto.progress(1).download_cursor
        await client.close()
        return cursor

    with InProcessServer(tmp_path) as server:
        assert asyncio.run(round_trip(server, "first")) == 1
        # a new event loop, the same server: the second client downloads the first's change
        assert asyncio.run(round_trip(server, "second")) == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("tidesync")]


async def test_silent_connection_is_closed_after_the_hello_timeout(tmp_path: Path) -> None:
    async with InProcessServer(tmp_path, config=ServerConfig(hello_timeout=0.3)) as server:
        client = await RawClient.connect(server.ws_url, "", hello=False)
        client.proto.start("unused")  # only to let the protocol read the server's answer
        client.proto.data_to_send()
        error = await client.expect(ErrorReceived)
        assert error.code == ErrorCode.OTHER_ERROR and "HELLO" in error.message
        assert await client.closed_code() == 1008


async def test_query_is_acknowledged_in_a_download(server: InProcessServer) -> None:
    client, _ = await connect_bound(server, "f1")
    await client.expect(DownloadReceived)
    client.proto.query(1, 1, {"Task": ["done == false"]})
    await client.flush()
    got = await client.expect(DownloadReceived)
    assert got.query_version == 1
    await client.close()
