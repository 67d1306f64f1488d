"""The wire codec: every message round-trips, and no input makes decoding misbehave."""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack
from tidesync.core.schema import Collection, FieldSchema, Kind, ModelSchema
from tidesync.errors import (
    FrameTooLargeError,
    MalformedMessageError,
    RemoteProtocolError,
    SyncAction,
)
from tidesync.protocol import messages as m
from tidesync.protocol.codec import (
    COMPRESSED_MARKER,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
)
from tidesync.protocol.messages import ErrorCode, MessageType, error_code_of

SCHEMAS = [
    ModelSchema(
        "Task",
        (
            FieldSchema("id", Kind.OBJECTID, primary_key=True),
            FieldSchema("summary", Kind.STR),
            FieldSchema("tags", Kind.STR, Collection.SET),
        ),
        "id",
    ).to_dict(),
    ModelSchema(
        "Person",
        (
            FieldSchema("name", Kind.STR, primary_key=True),
            FieldSchema("friends", Kind.LINK, Collection.LIST, target="Person"),
            FieldSchema("age", Kind.INT, optional=True, indexed=True),
        ),
        "name",
    ).to_dict(),
]

big = st.integers(0, m.MAX_INT)
session = st.integers(1, m.MAX_INT)
text = st.text(max_size=40)
blob = st.binary(max_size=300)

upload_cs = st.builds(m.UploadChangeset, st.integers(1, m.MAX_INT), blob)
download_cs = st.builds(
    m.DownloadChangeset, st.integers(1, m.MAX_INT), st.text(min_size=1, max_size=20), session, blob
)
connection_error = st.builds(
    m.Error,
    st.integers(100, 199),
    text,
    st.sampled_from(list(SyncAction)),
    st.none() | big,
    st.none(),
)
session_error = st.builds(
    m.Error,
    st.integers(200, 299),
    text,
    st.sampled_from(list(SyncAction)),
    st.none() | big,
    session,
)

name = st.text(min_size=1, max_size=10)
scalar = st.none() | st.booleans() | st.integers(-(2**63), m.MAX_INT) | text | st.binary(max_size=8)
object_update = st.builds(m.ObjectUpdate, name, scalar, st.none() | st.binary(max_size=40))


@st.composite
def object_rows(draw: st.DrawFn) -> m.ObjectRows:
    fields = draw(st.lists(name, min_size=1, max_size=4, unique=True))
    rows = draw(
        st.lists(
            st.tuples(
                st.binary(max_size=12), st.lists(scalar, min_size=len(fields), max_size=len(fields))
            ),
            max_size=4,
        )
    )
    pk = draw(st.integers(0, len(fields) - 1))
    size = draw(st.integers(0, m.MAX_INT))
    return m.ObjectRows(draw(name), fields, pk, size, [[hlc, *values] for hlc, values in rows])


MESSAGES: dict[MessageType, st.SearchStrategy[Any]] = {
    MessageType.HELLO: st.builds(
        m.Hello, st.lists(st.integers(1, m.MAX_INT), min_size=1, max_size=5), text, st.booleans()
    ),
    MessageType.REFRESH: st.builds(m.Refresh, text),
    MessageType.BIND: st.builds(
        m.Bind,
        session,
        st.text(min_size=1, max_size=30),
        st.lists(st.sampled_from(SCHEMAS), max_size=3),
        big,
        big,
    ),
    MessageType.UNBIND: st.builds(m.Unbind, session),
    MessageType.UPLOAD: st.builds(m.Upload, session, st.lists(upload_cs, max_size=4), big),
    MessageType.MARK: st.builds(m.Mark, session, st.integers(1, m.MAX_INT)),
    MessageType.QUERY: st.builds(
        m.Query,
        session,
        big,
        st.dictionaries(st.text(min_size=1, max_size=10), st.lists(text, max_size=3), max_size=3),
    ),
    MessageType.PING: st.builds(m.Ping, big),
    MessageType.PONG: st.builds(m.Pong, big),
    MessageType.WELCOME: st.builds(
        m.Welcome, st.integers(1, 1000), st.integers(m.MIN_MAX_FRAME_SIZE, m.MAX_INT), big, text
    ),
    MessageType.BOUND: st.builds(m.Bound, session, big, big),
    MessageType.UNBOUND: st.builds(m.Unbound, session),
    MessageType.DOWNLOAD: st.builds(
        m.Download,
        session,
        st.lists(download_cs, max_size=4),
        big,
        big,
        big,
        big,
        big,
        st.lists(object_update, max_size=3),
        st.integers(0, 2),
        st.lists(object_rows(), max_size=3),
    ),
    MessageType.MARK_REPLY: st.builds(m.MarkReply, session, st.integers(1, m.MAX_INT), big),
    MessageType.QUERY_ERROR: st.builds(m.QueryError, session, big, text),
    MessageType.ERROR: connection_error | session_error,
}
any_message = st.one_of(*MESSAGES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGES) == set(MessageType)


@given(msg=any_message, compress=st.booleans(), threshold=st.integers(0, 64))
def test_round_trip(msg: Any, compress: bool, threshold: int) -> None:
    frame = encode_frame(msg, compress=compress, threshold=threshold)
    assert decode_frame(frame) == msg
    assert type(decode_frame(frame)) is type(msg)
    if not compress:
        assert frame[0] != COMPRESSED_MARKER


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    try:
        decode_frame(data)
    except (MalformedMessageError, FrameTooLargeError):
        pass


@given(
    msg=any_message,
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10_000),
    compress=st.booleans(),
)
def test_mutated_frames_only_raise_protocol_errors(
    msg: Any, edits: list[tuple[int, int]], cut: int, compress: bool
) -> None:
    frame = bytearray(encode_frame(msg, compress=compress, threshold=0))
    for position, value in edits:
        frame[position % len(frame)] = value
    for candidate in (bytes(frame), bytes(frame[: cut % (len(frame) + 1)])):
        try:
            decoded = decode_frame(candidate)
        except (MalformedMessageError, FrameTooLargeError) as exc:
            assert isinstance(exc, RemoteProtocolError)
            assert isinstance(error_code_of(exc), ErrorCode)
        else:
            # whatever decodes must be a fully valid message again
            assert decode_frame(encode_frame(decoded)) == decoded


@given(
    fields=st.lists(
        st.none() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary() | st.booleans()
    )
)
def test_random_fields_for_every_type_only_raise_malformed(fields: list[Any]) -> None:
    for mtype in MessageType:
        try:
            decode_message(pack([int(mtype), *fields]))
        except MalformedMessageError:
            pass


def test_oversize_frame_refused() -> None:
    frame = encode_frame(m.Refresh("x" * 5000))
    with pytest.raises(FrameTooLargeError) as info:
        decode_frame(frame, max_frame_size=4096)
    assert error_code_of(info.value) is ErrorCode.FRAME_TOO_LARGE
    assert decode_frame(frame, max_frame_size=len(frame)) == m.Refresh("x" * 5000)


def test_zip_bomb_refused_without_inflating_everything() -> None:
    bomb = bytes([COMPRESSED_MARKER]) + zlib.compress(b"\x00" * (64 * 1024 * 1024))
    assert len(bomb) < 100_000
    with pytest.raises(FrameTooLargeError):
        decode_frame(bomb, max_frame_size=1024 * 1024)


def test_compressed_valid_message_over_the_limit_once_inflated() -> None:
    msg = m.Refresh("a" * 50_000)
    frame = encode_frame(msg, compress=True, threshold=0)
    assert frame[0] == COMPRESSED_MARKER and len(frame) < 10_000
    with pytest.raises(FrameTooLargeError):
        decode_frame(frame, max_frame_size=20_000)
    assert decode_frame(frame, max_frame_size=60_000) == msg


def test_compression_only_above_threshold_and_when_smaller() -> None:
    small = m.Refresh("a" * 100)
    assert encode_frame(small, compress=True) == encode_message(small)
    large = m.Refresh("a" * 20_000)
    assert encode_frame(large, compress=True)[0] == COMPRESSED_MARKER
    assert encode_frame(large, compress=False) == encode_message(large)
    noise = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(64))
    incompressible = m.Upload(1, [m.UploadChangeset(1, noise)], 0)
    assert encode_frame(incompressible, compress=True, threshold=0)[0] != COMPRESSED_MARKER


def test_compressed_frame_refused_when_not_negotiated() -> None:
    frame = encode_frame(m.Refresh("a" * 20_000), compress=True)
    with pytest.raises(MalformedMessageError, match="not negotiated"):
        decode_frame(frame, allow_compressed=False)


@pytest.mark.parametrize(
    "payload",
    [
        bytes([COMPRESSED_MARKER]) + b"not zlib",
        bytes([COMPRESSED_MARKER]) + zlib.compress(encode_message(m.Ping(1)))[:-3],
        bytes([COMPRESSED_MARKER]) + zlib.compress(encode_message(m.Ping(1))) + b"junk",
    ],
)
def test_corrupt_compressed_frames(payload: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(payload)


def test_unknown_type_code_refused() -> None:
    with pytest.raises(MalformedMessageError, match="unknown message type 99") as info:
        decode_frame(pack([99, 1, 2]))
    assert error_code_of(info.value) is ErrorCode.UNKNOWN_MESSAGE


@pytest.mark.parametrize(
    ("frame", "where"),
    [
        ([int(MessageType.BIND), 0, "f", [], 0, 0], "BIND.session"),
        ([int(MessageType.BIND), 1, "", [], 0, 0], "BIND.file_ident"),
        ([int(MessageType.BIND), 1, "f", [{"name": "X"}], 0, 0], "BIND.schema"),
        ([int(MessageType.BIND), 1, "f", [], -1, 0], "BIND.download_cursor"),
        ([int(MessageType.HELLO), [], "t", True], "HELLO.protocol_versions"),
        ([int(MessageType.HELLO), [1], "t", 1], "HELLO.compression"),
        ([int(MessageType.UPLOAD), 1, [[0, b""]], 0], "UPLOAD.changesets"),
        ([int(MessageType.UPLOAD), 1, [[1, "text"]], 0], "UPLOAD.changesets"),
        ([int(MessageType.DOWNLOAD), 1, [], 0, 0, -5, 0, 0], "DOWNLOAD.downloadable_bytes"),
        ([int(MessageType.DOWNLOAD), 1, [[1, "", 1, b""]], 1, 1, 0, 0, 0], "DOWNLOAD.changesets"),
        ([int(MessageType.MARK), 1, True], "MARK.request_id"),
        ([int(MessageType.QUERY), 1, 1, {"T": "x"}], "QUERY.queries"),
        ([int(MessageType.WELCOME), 1, 10, 0, "c"], "WELCOME.max_frame_size"),
        ([int(MessageType.ERROR), 99, "m", "retry", None, None], "ERROR.code"),
        ([int(MessageType.ERROR), 101, "m", "explode", None, None], "ERROR.action"),
        ([int(MessageType.ERROR), 101, "m", "retry", None, 3], "ERROR.session"),
        ([int(MessageType.ERROR), 201, "m", "retry", None, None], "ERROR.session"),
        ([int(MessageType.PING), 2**63], "PING.timestamp_ms"),
        ([int(MessageType.UNBIND)], "UNBIND"),
        ([int(MessageType.UNBIND), 1, 2], "UNBIND"),
    ],
)
def test_invalid_fields_name_message_and_field(frame: list[Any], where: str) -> None:
    with pytest.raises(MalformedMessageError, match=where) as info:
        decode_frame(pack(frame))
    assert error_code_of(info.value) is ErrorCode.BAD_SYNTAX


@pytest.mark.parametrize("body", [b"", pack({}), pack([]), pack(["HELLO"]), pack([True]), b"\xc1"])
def test_structurally_invalid_frames(body: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(body)


def test_error_codes_levels_and_actions() -> None:
    for code in ErrorCode:
        assert code.is_connection_level == (100 <= code < 200)
        assert isinstance(code.default_action, SyncAction)
    assert ErrorCode.TOKEN_EXPIRED.default_action is SyncAction.REFRESH_TOKEN
    assert ErrorCode.CLIENT_RESET_NEEDED.default_action is SyncAction.CLIENT_RESET
    assert ErrorCode.WRONG_PROTOCOL_VERSION.default_action is SyncAction.STOP
    assert ErrorCode.GOING_AWAY.default_action is SyncAction.RETRY
    assert not ErrorCode.COMPENSATING_WRITE.is_connection_level


def test_changeset_size_counts_instruction_bytes() -> None:
    assert m.changeset_size(m.UploadChangeset(3, b"abcd")) == 4
    assert m.changeset_size(m.DownloadChangeset(1, "o", 1, b"")) == 0


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("Task", "array of 3 items"),
        (["Task", 1], "array of 3 items"),
        (["", 1, None], "needs a model name"),
        ([7, 1, None], "needs a model name"),
        (["Task", 1, "state"], "bytes or nil"),
    ],
)
def test_bad_object_update_is_named_with_its_index(item: Any, says: str) -> None:
    good = ["Task", 1, b"\x90"]
    frame = [int(MessageType.DOWNLOAD), 1, [], 1, 1, 0, 0, 1, [good, None, good], 1]
    frame[8][1] = item
    with pytest.raises(MalformedMessageError, match=f"DOWNLOAD.objects.*item 1: .*{says}"):
        decode_frame(pack(frame))


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ("rows", "array of 5 items"),
        (["Task", ["id"], 0, 0], "array of 5 items"),
        (["", ["id"], 0, 0, []], "needs a model name"),
        (["Task", [], 0, 0, []], "distinct non-empty strings"),
        (["Task", ["id", "id"], 0, 0, []], "distinct non-empty strings"),
        (["Task", ["id", 3], 0, 0, []], "distinct non-empty strings"),
        (["Task", ["id"], 1, 0, []], "primary key index 1 names none"),
        (["Task", ["id"], True, 0, []], "primary key index True"),
        (["Task", ["id"], 0, -1, []], "size must be a non-negative integer"),
        (["Task", ["id"], 0, 0, {}], "rows must be an array"),
        (["Task", ["id"], 0, 0, [[b"h", 1], [b"h"]]], "row 1: expected an array"),
        (["Task", ["id"], 0, 0, [["h", 1]]], "row 0: expected an array"),
    ],
)
def test_bad_object_rows_are_named_with_their_index(block: Any, says: str) -> None:
    good = ["Task", ["id", "name"], 0, 10, [[b"\x93\x01\x00\xa1o", 1, "x"]]]
    frame = [int(MessageType.DOWNLOAD), 1, [], 1, 1, 0, 0, 1, [], 1, [good, block]]
    with pytest.raises(MalformedMessageError, match=f"DOWNLOAD.rows.*item 1: .*{says}"):
        decode_frame(pack(frame))


def test_object_rows_stand_for_lone_create_updates() -> None:
    """A row is the object update whose state is the compact lone-create form."""
    from tidesync.core.merge import ObjectState, created_state

    schema = ModelSchema(
        "Task",
        (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("name", Kind.STR)),
        "id",
    )
    ins = Instruction(Op.CREATE, "Task", 7, HLC(5, 1, "o"), value={"id": 7, "name": "x"})
    made = created_state(ins, schema)
    assert made is not None
    block = m.ObjectRows("Task", ["id", "name"], 0, len(made[0]), [[pack(ins.hlc), 7, "x"]])
    assert block.updates() == [m.ObjectUpdate("Task", 7, made[0])]
    msg = m.Download(1, [], 1, 1, 0, 0, 1, [], 1, [block])
    back = decode_frame(encode_frame(msg))
    assert back == msg
    (update,) = back.rows[0].updates()  # type: ignore[attr-defined]
    state = ObjectState.empty()
    state.apply(ins, schema)
    assert ObjectState.from_bytes(update.state).to_bytes() == state.to_bytes()


def test_object_updates_decode_as_given() -> None:
    objects = [m.ObjectUpdate("Task", 1, b"\x90"), m.ObjectUpdate("Note", "k", None)]
    msg = m.Download(1, [], 1, 1, 0, 0, 1, objects, 2)
    back = decode_frame(encode_frame(msg))
    assert back == msg and type(back.objects[0]) is m.ObjectUpdate  # type: ignore[attr-defined]
