"""ClientProtocol: happy paths against a ServerProtocol in memory, and every check it makes."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tidesync.errors import (
    FrameTooLargeError,
    LocalProtocolError,
    MalformedMessageError,
    RemoteProtocolError,
    SyncAction,
)
from tidesync.protocol import messages as m
from tidesync.protocol.client import (
    BindingState,
    ClientProtocol,
    ClientState,
    DownloadReceived,
    ErrorReceived,
    MarkReplied,
    QueryErrorReceived,
    SessionBound,
    SessionUnbound,
    Welcomed,
)
from tidesync.protocol.codec import COMPRESSED_MARKER, decode_frame, encode_frame
from tidesync.protocol.messages import (
    DownloadChangeset,
    ErrorCode,
    PingReceived,
    PongReceived,
    ProtocolViolationError,
    UploadChangeset,
    error_code_of,
)
from tidesync.protocol.server import (
    BindReceived,
    MarkReceived,
    QueryReceived,
    RefreshReceived,
    ServerProtocol,
    UnbindReceived,
    UploadReceived,
)

NOISE = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(200))
SCHEMA = [{"name": "Task", "primary_key": "id", "fields": [{"name": "id", "kind": "int"}]}]


class Link:
    """A client and a server joined in memory."""

    def __init__(self, *, compression: bool = True) -> None:
        self.client = ClientProtocol()
        self.server = ServerProtocol()
        self.client.start("token-1", compression=compression)
        self.to_server()
        self.server.welcome(1_000, "conn-1")
        self.welcomed = self.to_client()

    def to_server(self) -> list[Any]:
        events: list[Any] = []
        for frame in self.client.data_to_send():
            events += self.server.receive_data(frame)
        return events

    def to_client(self) -> list[Any]:
        events: list[Any] = []
        for frame in self.server.data_to_send():
            events += self.client.receive_data(frame)
        return events

    def open(self, session: int = 1, file_ident: str = "A", version: int = 0) -> None:
        self.client.bind(session, file_ident, SCHEMA, 0, 0)
        self.to_server()
        self.server.bound(session, version, 0)
        self.to_client()


def test_connect_and_welcome() -> None:
    link = Link()
    assert link.welcomed == [Welcomed(3, m.DEFAULT_MAX_FRAME_SIZE, 1_000, "conn-1")]
    assert link.client.state is ClientState.OPEN
    assert link.client.protocol_version == 3


def test_full_session_sequence() -> None:
    link = Link()
    link.client.bind(1, "A", SCHEMA, 0, 0)
    assert link.to_server() == [BindReceived(1, "A", SCHEMA, 0, 0)]
    link.server.bound(1, 5, 0)
    assert link.to_client() == [SessionBound(1, 5, 0)]

    link.client.upload(1, [UploadChangeset(1, b"one"), UploadChangeset(2, b"two")], 0)
    [upload] = link.to_server()
    assert isinstance(upload, UploadReceived) and upload.size == 6
    incoming = [DownloadChangeset(3, "B", 7, b"xyz"), DownloadChangeset(5, "C", 1, b"")]
    link.server.download(1, incoming, 5, 6, 10, 2)
    [download] = link.to_client()
    assert download == DownloadReceived(1, incoming, 5, 6, 10, 2, 0)
    assert download.size == 3
    progress = link.client.progress(1)
    assert (progress.download_cursor, progress.latest_server_version) == (5, 6)
    assert (progress.upload_acked, progress.last_uploaded) == (2, 2)

    request = link.client.mark(1)
    assert link.to_server() == [MarkReceived(1, request)]
    link.server.download(1, [DownloadChangeset(6, "B", 8, b"q")], 6, 6, 0, 2)
    link.server.mark_reply(1, request, 6)
    assert link.to_client()[-1] == MarkReplied(1, request, 6)

    link.client.upload(1, [], 6)  # reports the new cursor only
    assert link.to_server() == [UploadReceived(1, [], 6)]

    link.client.unbind(1)
    assert link.to_server() == [UnbindReceived(1)]
    link.server.unbound(1)
    assert link.to_client() == [SessionUnbound(1)]
    assert not link.client.has_session(1)
    link.open(1, "A", version=6)  # the number is free again
    assert link.client.progress(1).state is BindingState.BOUND


def test_ping_pong_both_ways_refresh_and_query() -> None:
    link = Link()
    link.client.ping(42)
    assert link.to_server() == [PingReceived(42)]
    assert link.to_client() == [PongReceived(42)]
    link.server.ping(7)
    assert link.to_client() == [PingReceived(7)]
    assert link.to_server() == [PongReceived(7)]
    link.client.refresh("token-2")
    assert link.to_server() == [RefreshReceived("token-2")]
    link.open()
    link.client.query(1, 1, {"Task": ["done == false"]})
    assert link.to_server() == [QueryReceived(1, 1, {"Task": ["done == false"]})]
    link.server.query_error(1, 1, "bad query")
    assert link.to_client() == [QueryErrorReceived(1, 1, "bad query")]
    link.server.download(1, [], 0, 0, 0, 0, query_version=1)
    assert link.to_client()[0].query_version == 1


@pytest.mark.parametrize("compression", [True, False])
def test_large_frames_compressed_only_when_negotiated(compression: bool) -> None:
    link = Link(compression=compression)
    link.open()
    body = b"tidesync " * 5000
    link.server.download(1, [DownloadChangeset(1, "B", 1, body)], 1, 1, 0, 0)
    frames = link.server.data_to_send()
    assert (frames[0][0] == COMPRESSED_MARKER) is compression
    [event] = link.client.receive_data(frames[0])
    assert isinstance(event, DownloadReceived)
    assert event.changesets[0].instructions == body
    link.client.upload(1, [UploadChangeset(1, body)], 1)
    frames = link.client.data_to_send()
    assert (frames[0][0] == COMPRESSED_MARKER) is compression
    [upload] = link.server.receive_data(frames[0])
    assert isinstance(upload, UploadReceived)
    assert upload.changesets[0].instructions == body


def test_session_error_suspends_until_unbind() -> None:
    link = Link()
    link.open(1, "A")
    link.open(2, "B")
    link.server.error(ErrorCode.PERMISSION_DENIED, "no", session=1)
    [event] = link.to_client()
    assert isinstance(event, ErrorReceived)
    assert event.error_code is ErrorCode.PERMISSION_DENIED
    assert event.action is SyncAction.STOP and event.session == 1
    assert link.client.progress(1).state is BindingState.SUSPENDED
    with pytest.raises(LocalProtocolError):
        link.client.upload(1, [UploadChangeset(1, b"")], 0)
    link.client.upload(2, [UploadChangeset(1, b"")], 0)  # the other session goes on
    link.client.unbind(1)
    link.to_server()
    link.server.unbound(1)
    assert link.to_client() == [SessionUnbound(1)]


def test_compensating_write_does_not_suspend() -> None:
    link = Link()
    link.open()
    link.server.error(ErrorCode.COMPENSATING_WRITE, "reverted", session=1)
    [event] = link.to_client()
    assert event.action is SyncAction.RETRY
    assert link.client.progress(1).state is BindingState.BOUND


def test_connection_error_closes() -> None:
    link = Link()
    link.server.error(ErrorCode.GOING_AWAY, "bye", retry_delay_ms=500)
    assert link.to_client() == [
        ErrorReceived(115, "bye", SyncAction.RETRY, 500, None),
    ]
    assert link.client.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError):
        link.client.ping(1)


# -- checks on what the server sends ---------------------------------------------------------


def bound_client(*, local_version: int | None = None, server_version: int = 10) -> ClientProtocol:
    client = ClientProtocol()
    client.start("t")
    client.receive_data(encode_frame(m.Welcome(2, 1 << 20, 0, "c")))
    client.bind(1, "A", SCHEMA, 2, 1, local_version=local_version)
    client.receive_data(encode_frame(m.Bound(1, server_version, 1)))
    client.data_to_send()
    return client


def violation(client: ClientProtocol, msg: m.Message) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_data(encode_frame(msg))
    assert client.state is ClientState.CLOSED
    with pytest.raises(RemoteProtocolError):
        client.receive_data(encode_frame(m.Ping(1)))
    return error_code_of(info.value)


def dl(cursor: int, latest: int = 10, acked: int = 1, *versions: int) -> m.Download:
    changesets = [DownloadChangeset(v, "B", 1, b"x") for v in versions]
    return m.Download(1, changesets, cursor, latest, 0, acked, 0)


def test_messages_before_welcome() -> None:
    client = ClientProtocol()
    client.start("t")
    assert violation(client, m.Bound(1, 0, 0)) is ErrorCode.BAD_MESSAGE_ORDER


def test_wrong_version_and_second_welcome() -> None:
    client = ClientProtocol()
    client.start("t", versions=[1])
    assert violation(client, m.Welcome(2, 1 << 20, 0, "c")) is ErrorCode.WRONG_PROTOCOL_VERSION
    assert violation(bound_client(), m.Welcome(2, 1 << 20, 0, "c")) is ErrorCode.BAD_MESSAGE_ORDER


def test_client_message_from_server_refused() -> None:
    assert violation(bound_client(), m.Hello([2], "t", True)) is ErrorCode.UNKNOWN_MESSAGE


@pytest.mark.parametrize(
    "msg",
    [
        m.Bound(9, 0, 0),
        m.Unbound(9),
        m.Download(9, [], 0, 0, 0, 0, 0),
        m.MarkReply(9, 1, 0),
        m.QueryError(9, 1, "x"),
        m.Error(201, "x", SyncAction.RETRY, None, 9),
    ],
)
def test_messages_for_unknown_session(msg: m.Message) -> None:
    assert violation(bound_client(), msg) is ErrorCode.BAD_SESSION_IDENT


def test_messages_for_a_session_not_yet_bound() -> None:
    client = ClientProtocol()
    client.start("t")
    client.receive_data(encode_frame(m.Welcome(2, 1 << 20, 0, "c")))
    client.bind(1, "A", SCHEMA, 0, 0)
    assert violation(client, m.Download(1, [], 0, 0, 0, 0, 0)) is ErrorCode.BAD_MESSAGE_ORDER


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (dl(1), ErrorCode.BAD_SERVER_VERSION),  # cursor backwards (was 2)
        (dl(11, 10), ErrorCode.BAD_SERVER_VERSION),  # beyond latest
        (dl(5, 9), ErrorCode.BAD_SERVER_VERSION),  # latest backwards
        (dl(5, 10, 1, 2), ErrorCode.BAD_CHANGESET),  # not above the old cursor
        (dl(5, 10, 1, 4, 4), ErrorCode.BAD_CHANGESET),  # not increasing
        (dl(5, 10, 1, 4, 3), ErrorCode.BAD_CHANGESET),
        (dl(5, 10, 1, 6), ErrorCode.BAD_CHANGESET),  # beyond the cursor
        (dl(5, 10, 0), ErrorCode.BAD_SERVER_VERSION),  # upload_acked backwards
        (dl(5, 10, 2), ErrorCode.BAD_SERVER_VERSION),  # acks a version never uploaded
        (
            m.Download(1, [DownloadChangeset(3, "A", 1, b"")], 3, 10, 0, 1, 0),
            ErrorCode.BAD_ORIGIN_FILE,
        ),
        (m.Download(1, [], 3, 10, 0, 1, 1), ErrorCode.BAD_MESSAGE_ORDER),  # query never sent
        (m.MarkReply(1, 1, 0), ErrorCode.BAD_MESSAGE_ORDER),  # no such request
        (m.QueryError(1, 1, "x"), ErrorCode.BAD_MESSAGE_ORDER),
        (m.Unbound(1), ErrorCode.BAD_MESSAGE_ORDER),
        (m.Bound(1, 10, 1), ErrorCode.BAD_MESSAGE_ORDER),
        (m.Pong(5), ErrorCode.BAD_MESSAGE_ORDER),
    ],
)
def test_download_and_reply_checks(msg: m.Message, code: ErrorCode) -> None:
    assert violation(bound_client(), msg) is code


def test_valid_download_then_acks_within_uploads() -> None:
    client = bound_client()
    [event] = client.receive_data(encode_frame(dl(5, 10, 1, 3, 5)))
    assert isinstance(event, DownloadReceived) and event.cursor == 5
    client.upload(1, [UploadChangeset(2, b""), UploadChangeset(4, b"")], 5)
    client.receive_data(encode_frame(dl(5, 12, 4)))
    assert client.progress(1).upload_acked == 4
    assert violation(client, dl(6, 12, 5)) is ErrorCode.BAD_SERVER_VERSION


def test_mark_reply_must_not_precede_its_downloads() -> None:
    client = bound_client()
    request = client.mark(1)
    assert violation(client, m.MarkReply(1, request, 3)) is ErrorCode.BAD_SERVER_VERSION
    client = bound_client()
    request = client.mark(1)
    client.receive_data(encode_frame(dl(3)))
    assert client.receive_data(encode_frame(m.MarkReply(1, request, 3))) == [
        MarkReplied(1, request, 3)
    ]
    assert violation(client, m.MarkReply(1, request, 3)) is ErrorCode.BAD_MESSAGE_ORDER


@pytest.mark.parametrize(
    ("bound", "local_version"),
    [(m.Bound(1, 1, 1), None), (m.Bound(1, 10, 0), None), (m.Bound(1, 10, 4), 3)],
)
def test_bound_checks(bound: m.Bound, local_version: int | None) -> None:
    client = ClientProtocol()
    client.start("t")
    client.receive_data(encode_frame(m.Welcome(2, 1 << 20, 0, "c")))
    client.bind(1, "A", SCHEMA, 2, 1, local_version=local_version)
    assert violation(client, bound) is ErrorCode.BAD_SERVER_VERSION


def test_late_messages_after_unbind_are_dropped() -> None:
    client = bound_client()
    client.unbind(1)
    assert client.receive_data(encode_frame(dl(5))) == []
    assert client.receive_data(encode_frame(m.Unbound(1))) == [SessionUnbound(1)]


def test_garbage_and_oversize_frames() -> None:
    client = bound_client()
    with pytest.raises(MalformedMessageError):
        client.receive_data(b"\x93\x01")
    assert client.state is ClientState.CLOSED
    small = ClientProtocol(max_frame_size=4096)
    small.start("t")
    with pytest.raises(FrameTooLargeError):
        small.receive_data(encode_frame(m.Welcome(2, 1 << 20, 0, "c" * 5000)))


def test_violation_carries_session() -> None:
    client = bound_client()
    with pytest.raises(ProtocolViolationError) as info:
        client.receive_data(encode_frame(dl(1)))
    assert info.value.session == 1 and info.value.code is ErrorCode.BAD_SERVER_VERSION


# -- local misuse ----------------------------------------------------------------------------


def test_local_misuse() -> None:
    client = ClientProtocol()
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.start("t", versions=[])
    client.start("t")
    with pytest.raises(LocalProtocolError):
        client.start("t")
    with pytest.raises(LocalProtocolError):  # before WELCOME
        client.bind(1, "A", SCHEMA, 0, 0)
    client.receive_data(encode_frame(m.Welcome(2, m.MIN_MAX_FRAME_SIZE, 0, "c")))
    client.bind(1, "A", SCHEMA, 0, 0)
    with pytest.raises(LocalProtocolError):  # upload before BOUND
        client.upload(1, [], 0)
    with pytest.raises(LocalProtocolError):  # mark before BOUND
        client.mark(1)
    with pytest.raises(LocalProtocolError):  # same session number twice
        client.bind(1, "B", SCHEMA, 0, 0)
    with pytest.raises(LocalProtocolError):  # same file twice
        client.bind(2, "A", SCHEMA, 0, 0)
    with pytest.raises(LocalProtocolError):
        client.bind(0, "C", SCHEMA, 0, 0)
    with pytest.raises(LocalProtocolError):
        client.upload(7, [], 0)
    client.receive_data(encode_frame(m.Bound(1, 5, 2)))
    with pytest.raises(LocalProtocolError):  # already acknowledged
        client.upload(1, [UploadChangeset(2, b"")], 0)
    with pytest.raises(LocalProtocolError):  # not increasing
        client.upload(1, [UploadChangeset(4, b""), UploadChangeset(4, b"")], 0)
    with pytest.raises(LocalProtocolError):  # cursor never received
        client.upload(1, [UploadChangeset(3, b"")], 1)
    with pytest.raises(LocalProtocolError):  # over the server's frame limit
        client.upload(1, [UploadChangeset(3, NOISE)], 0)
    assert client.data_to_send()[-1] == encode_frame(m.Bind(1, "A", SCHEMA, 0, 0))
    client.upload(1, [UploadChangeset(3, b"")], 0)
    with pytest.raises(LocalProtocolError):
        client.upload(1, [UploadChangeset(3, b"")], 0)
    client.query(1, 2, {})
    with pytest.raises(LocalProtocolError):
        client.query(1, 2, {})
    client.unbind(1)
    with pytest.raises(LocalProtocolError):
        client.unbind(1)
    frames = [decode_frame(f) for f in client.data_to_send()]
    assert [type(f) for f in frames] == [m.Upload, m.Query, m.Unbind]
