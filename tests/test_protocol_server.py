"""ServerProtocol: negotiation, order checks, the ERRORs it sends, and what it refuses to send."""

from __future__ import annotations

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
from tidesync.protocol.client import ClientProtocol, ClientState, ErrorReceived
from tidesync.protocol.codec import decode_frame, encode_frame
from tidesync.protocol.messages import (
    DownloadChangeset,
    ErrorCode,
    ProtocolViolationError,
    UploadChangeset,
    error_code_of,
)
from tidesync.protocol.server import (
    SUPPORTED_VERSIONS,
    HelloReceived,
    MarkReceived,
    RefreshReceived,
    ServerProtocol,
    ServerSessionState,
    ServerState,
    UploadReceived,
    negotiate_version,
)

SCHEMA = [{"name": "Task", "primary_key": "id", "fields": [{"name": "id", "kind": "int"}]}]


def state(server: ServerProtocol) -> ServerState:
    return server.state


def frame(msg: m.Message) -> bytes:
    return encode_frame(msg)


def open_server(**kwargs: Any) -> ServerProtocol:
    server = ServerProtocol(**kwargs)
    server.receive_data(frame(m.Hello([2], "t", False)))
    server.welcome(0, "c")
    server.data_to_send()
    return server


def bound_server(
    session: int = 1, file_ident: str = "A", cursor: int = 2, acked: int = 1
) -> ServerProtocol:
    server = open_server()
    server.receive_data(frame(m.Bind(session, file_ident, SCHEMA, cursor, acked)))
    server.bound(session, 10, acked)
    server.data_to_send()
    return server


def violation(server: ServerProtocol, data: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(data)
    return info.value


def sent(server: ServerProtocol) -> list[m.Message]:
    return [decode_frame(f) for f in server.data_to_send()]


def test_supported_versions_and_negotiation() -> None:
    assert SUPPORTED_VERSIONS == (2, 3)
    assert negotiate_version([1, 2, 3], [2, 3, 4]) == 3
    assert negotiate_version([5], [1]) is None
    server = ServerProtocol(supported_versions=(1, 2, 3))
    [hello] = server.receive_data(frame(m.Hello([2, 3, 5], "tok", True)))
    assert hello == HelloReceived([2, 3, 5], "tok", True, 3)
    server.welcome(99, "conn")
    assert sent(server) == [m.Welcome(3, m.DEFAULT_MAX_FRAME_SIZE, 99, "conn")]
    assert server.state is ServerState.OPEN


def test_no_common_version_is_error_105_sent_to_the_client() -> None:
    client = ClientProtocol()
    server = ServerProtocol()
    client.start("t", versions=[7, 8])
    [hello_frame] = client.data_to_send()
    exc = violation(server, hello_frame)
    assert error_code_of(exc) is ErrorCode.WRONG_PROTOCOL_VERSION
    assert state(server) is ServerState.FAILED
    server.error_for(exc)
    assert state(server) is ServerState.CLOSED
    [event] = client.receive_data(server.data_to_send()[0])
    assert isinstance(event, ErrorReceived)
    assert event.code == 105 and event.action is SyncAction.STOP and event.session is None
    assert client.state is ClientState.CLOSED


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\x00garbage", ErrorCode.BAD_SYNTAX),
        (b"", ErrorCode.BAD_SYNTAX),
        (m.MAX_INT.to_bytes(8, "big"), ErrorCode.BAD_SYNTAX),
        (frame(m.Bind(1, "A", SCHEMA, 0, 0)), ErrorCode.BAD_MESSAGE_ORDER),  # before HELLO
        (frame(m.Welcome(2, 1 << 20, 0, "c")), ErrorCode.UNKNOWN_MESSAGE),  # a server message
        (encode_frame(m.Hello([2], "t" * 20_000, True), compress=True), ErrorCode.BAD_SYNTAX),
    ],
)
def test_first_frame_checks(data: bytes, code: ErrorCode) -> None:
    server = ServerProtocol()
    exc = violation(server, data)
    assert error_code_of(exc) is code
    server.error_for(exc)
    [error] = sent(server)
    assert isinstance(error, m.Error) and error.code == code and error.session is None
    with pytest.raises(LocalProtocolError):
        server.receive_data(frame(m.Ping(1)))


def test_unknown_type_code() -> None:
    server = ServerProtocol()
    assert error_code_of(violation(server, b"\x92\x63\x01")) is ErrorCode.UNKNOWN_MESSAGE


def test_frames_before_welcome_and_second_hello() -> None:
    server = ServerProtocol()
    server.receive_data(frame(m.Hello([2], "t", False)))
    assert error_code_of(violation(server, frame(m.Ping(1)))) is ErrorCode.BAD_MESSAGE_ORDER
    server = open_server()
    exc = violation(server, frame(m.Hello([2], "t", False)))
    assert error_code_of(exc) is ErrorCode.BAD_MESSAGE_ORDER


def test_oversize_frame() -> None:
    server = open_server(max_frame_size=m.MIN_MAX_FRAME_SIZE)
    exc = violation(server, frame(m.Refresh("x" * 5000)))
    assert isinstance(exc, FrameTooLargeError)
    server.error_for(exc)
    assert sent(server)[0].code == ErrorCode.FRAME_TOO_LARGE  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (m.Bind(1, "B", SCHEMA, 0, 0), ErrorCode.REUSE_OF_SESSION_IDENT),
        (m.Bind(2, "A", SCHEMA, 0, 0), ErrorCode.BOUND_IN_OTHER_SESSION),
        (m.Upload(9, [], 0), ErrorCode.BAD_SESSION_IDENT),
        (m.Mark(9, 1), ErrorCode.BAD_SESSION_IDENT),
        (m.Unbind(9), ErrorCode.BAD_SESSION_IDENT),
        (m.Query(9, 1, {}), ErrorCode.BAD_SESSION_IDENT),
        (m.Pong(3), ErrorCode.BAD_MESSAGE_ORDER),
        (m.Query(1, 0, {}), ErrorCode.BAD_MESSAGE_ORDER),
    ],
)
def test_connection_level_violations(msg: m.Message, code: ErrorCode) -> None:
    server = bound_server()
    exc = violation(server, frame(msg))
    assert error_code_of(exc) is code
    assert server.state is ServerState.FAILED
    server.error_for(exc)
    [error] = sent(server)
    assert isinstance(error, m.Error) and error.code == code and error.session is None


def test_upload_or_mark_for_a_session_still_binding() -> None:
    server = open_server()
    server.receive_data(frame(m.Bind(1, "A", SCHEMA, 0, 0)))
    exc = violation(server, frame(m.Upload(1, [], 0)))
    assert error_code_of(exc) is ErrorCode.BAD_MESSAGE_ORDER
    server = open_server()
    server.receive_data(frame(m.Bind(1, "A", SCHEMA, 0, 0)))
    exc = violation(server, frame(m.Mark(1, 1)))
    assert error_code_of(exc) is ErrorCode.BAD_MESSAGE_ORDER


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (m.Upload(1, [UploadChangeset(1, b"")], 2), ErrorCode.BAD_CHANGESET),  # <= bind's ack
        (
            m.Upload(1, [UploadChangeset(3, b""), UploadChangeset(3, b"")], 2),
            ErrorCode.BAD_CHANGESET,
        ),
        (
            m.Upload(1, [UploadChangeset(4, b""), UploadChangeset(2, b"")], 2),
            ErrorCode.BAD_CHANGESET,
        ),
        (m.Upload(1, [], 3), ErrorCode.BAD_SERVER_VERSION),  # cursor never sent
        (m.Upload(1, [], 1), ErrorCode.BAD_SERVER_VERSION),  # cursor backwards
    ],
)
def test_session_level_violations_keep_the_connection(msg: m.Message, code: ErrorCode) -> None:
    server = bound_server()
    server.receive_data(frame(m.Bind(2, "B", SCHEMA, 0, 0)))
    server.bound(2, 10, 0)
    server.data_to_send()
    exc = violation(server, frame(msg))
    assert isinstance(exc, ProtocolViolationError)
    assert exc.code is code and exc.session == 1
    assert server.state is ServerState.OPEN
    # until the ERROR is sent and the client unbinds, the session's traffic is dropped
    assert server.receive_data(frame(m.Mark(1, 5))) == []
    server.error_for(exc)
    [error] = sent(server)
    assert isinstance(error, m.Error) and error.code == code and error.session == 1
    assert server.receive_data(frame(m.Upload(1, [UploadChangeset(9, b"")], 2))) == []
    assert server.receive_data(frame(m.Mark(2, 1))) == [MarkReceived(2, 1)]
    with pytest.raises(LocalProtocolError):  # no second ERROR for the same session
        server.error(ErrorCode.BAD_CHANGESET, "again", session=1)
    server.receive_data(frame(m.Unbind(1)))
    server.unbound(1)
    assert sent(server) == [m.Unbound(1)]


def test_upload_versions_must_keep_increasing_across_messages() -> None:
    server = bound_server()
    [event] = server.receive_data(frame(m.Upload(1, [UploadChangeset(2, b"ab")], 2)))
    assert event == UploadReceived(1, [UploadChangeset(2, b"ab")], 2) and event.size == 2
    exc = violation(server, frame(m.Upload(1, [UploadChangeset(2, b"")], 2)))
    assert error_code_of(exc) is ErrorCode.BAD_CHANGESET


def test_compressed_frames_only_after_negotiation() -> None:
    server = ServerProtocol()
    server.receive_data(frame(m.Hello([2], "t", True)))
    server.welcome(0, "c")
    big = m.Refresh("r" * 40_000)
    assert server.receive_data(encode_frame(big, compress=True)) == [RefreshReceived(big.token)]
    plain = open_server()
    exc = violation(plain, encode_frame(big, compress=True))
    assert isinstance(exc, MalformedMessageError)


# -- what the server refuses to send -----------------------------------------------------------


def test_local_misuse_of_the_handshake() -> None:
    server = ServerProtocol()
    with pytest.raises(LocalProtocolError):
        server.welcome(0, "c")
    with pytest.raises(LocalProtocolError):
        server.ping(0)
    server.receive_data(frame(m.Hello([2], "t", False)))
    server.welcome(0, "c")
    with pytest.raises(LocalProtocolError):
        server.welcome(0, "c")


def test_bound_refuses_impossible_values() -> None:
    server = open_server()
    server.receive_data(frame(m.Bind(1, "A", SCHEMA, 5, 3)))
    with pytest.raises(LocalProtocolError):
        server.bound(1, 4, 3)  # behind the client's cursor
    with pytest.raises(LocalProtocolError):
        server.bound(1, 5, 2)  # forgets an acknowledged upload
    with pytest.raises(LocalProtocolError):
        server.download(1, [], 5, 5, 0, 3)  # not bound yet
    server.bound(1, 5, 4)
    with pytest.raises(LocalProtocolError):
        server.bound(1, 5, 4)
    assert sent(server) == [m.Bound(1, 5, 4)]


@pytest.mark.parametrize(
    "args",
    [
        ([], 1, 10, 0, 1),  # cursor backwards
        ([], 11, 10, 0, 1),  # beyond latest
        ([], 3, 9, 0, 1),  # latest backwards
        ([DownloadChangeset(2, "B", 1, b"")], 3, 10, 0, 1),  # not above the old cursor
        ([DownloadChangeset(4, "B", 1, b"")], 3, 10, 0, 1),  # beyond the new cursor
        ([DownloadChangeset(3, "A", 1, b"")], 3, 10, 0, 1),  # the client's own changeset
        ([], 3, 10, 0, 0),  # ack backwards
        ([], 3, 10, 0, 2),  # ack of a version never uploaded
        ([], 3, 10, -1, 1),
    ],
)
def test_download_refuses_what_the_client_would_reject(args: tuple[Any, ...]) -> None:
    server = bound_server()
    with pytest.raises(LocalProtocolError):
        server.download(1, *args)
    assert server.data_to_send() == []


def test_download_over_the_frame_limit_is_refused() -> None:
    server = open_server(max_frame_size=m.MIN_MAX_FRAME_SIZE)
    server.receive_data(frame(m.Bind(1, "A", SCHEMA, 0, 0)))
    server.bound(1, 1, 0)
    with pytest.raises(LocalProtocolError):
        server.download(1, [DownloadChangeset(1, "B", 1, bytes(5000))], 1, 1, 0, 0)


def test_mark_reply_rules() -> None:
    server = bound_server()
    with pytest.raises(LocalProtocolError):
        server.mark_reply(1, 1, 2)  # no such MARK
    server.receive_data(frame(m.Mark(1, 1)))
    with pytest.raises(LocalProtocolError):
        server.mark_reply(1, 1, 5)  # downloads up to 5 not sent yet
    server.download(1, [DownloadChangeset(5, "B", 1, b"")], 5, 10, 0, 1)
    server.mark_reply(1, 1, 5)
    assert sent(server)[-1] == m.MarkReply(1, 1, 5)
    with pytest.raises(LocalProtocolError):
        server.mark_reply(1, 1, 5)


def test_error_level_rules_and_query_error() -> None:
    server = bound_server()
    with pytest.raises(LocalProtocolError):
        server.error(ErrorCode.GOING_AWAY, "x", session=1)
    with pytest.raises(LocalProtocolError):
        server.error(ErrorCode.PERMISSION_DENIED, "x")
    with pytest.raises(LocalProtocolError):
        server.error(ErrorCode.PERMISSION_DENIED, "x", session=9)
    with pytest.raises(LocalProtocolError):
        server.query_error(1, 1, "never received")
    server.receive_data(frame(m.Query(1, 1, {"Task": ["x == 1"]})))
    server.query_error(1, 1, "bad")
    server.error(ErrorCode.TOKEN_EXPIRED, "expired", retry_delay_ms=10)
    assert sent(server) == [
        m.QueryError(1, 1, "bad"),
        m.Error(114, "expired", SyncAction.REFRESH_TOKEN, 10, None),
    ]
    assert server.state is ServerState.CLOSED
    assert not server.is_bound(1)
    with pytest.raises(LocalProtocolError):
        server.error(ErrorCode.GOING_AWAY, "again")


def test_refused_bind_then_unbind() -> None:
    server = open_server()
    server.receive_data(frame(m.Bind(1, "A", SCHEMA, 0, 0)))
    server.error(ErrorCode.BAD_SCHEMA, "Task.id changed type", session=1)
    assert sent(server)[0] == m.Error(225, "Task.id changed type", SyncAction.STOP, None, 1)
    with pytest.raises(LocalProtocolError):
        server.bound(1, 0, 0)
    server.receive_data(frame(m.Unbind(1)))
    with pytest.raises(LocalProtocolError):
        server.error(ErrorCode.OTHER_SESSION_ERROR, "x", session=1)
    server.unbound(1)
    assert sent(server) == [m.Unbound(1)]
    server.receive_data(frame(m.Bind(1, "A", SCHEMA, 0, 0)))  # reusable
    with pytest.raises(MalformedMessageError):
        server.receive_data(b"\xc1")
    assert server.state is ServerState.FAILED


def test_server_session_states() -> None:
    server = bound_server()
    assert server.is_bound(1)
    server.receive_data(frame(m.Unbind(1)))
    assert not server.is_bound(1)
    exc = violation(server, frame(m.Unbind(1)))
    assert error_code_of(exc) is ErrorCode.BAD_MESSAGE_ORDER
    assert ServerSessionState.UNBINDING.value == "unbinding"
