"""Changesets larger than a frame: splitting, joining, and both state machines (pure)."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidesync.errors import LocalProtocolError
from tidesync.protocol import messages as m
from tidesync.protocol.client import ClientProtocol, DownloadReceived
from tidesync.protocol.codec import decode_frame, encode_frame
from tidesync.protocol.messages import (
    DownloadChangeset,
    ErrorCode,
    ProtocolViolationError,
    UploadChangeset,
    error_code_of,
)
from tidesync.protocol.parts import (
    PartAssembler,
    PartOrderError,
    PartsTooLargeError,
    group_by_size,
    part_size_for,
    split_parts,
)
from tidesync.protocol.server import ServerProtocol, UploadReceived

SCHEMA = [{"name": "Task", "primary_key": "id", "fields": [{"name": "id", "kind": "int"}]}]
FRAME = 8192  # a small frame limit, so parts are cheap to test


# -- pure splitting and joining ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
def test_split_then_join_is_the_identity_and_every_part_fits(data: bytes, size: int) -> None:
    parts = split_parts(data, size)
    assert b"".join(parts) == data
    assert all(len(p) <= size for p in parts)
    assert len(parts) == max(1, -(-len(data) // size))
    assembler = PartAssembler(limit=len(data))
    out = [assembler.add(7, p, i < len(parts) - 1) for i, p in enumerate(parts)]
    assert out[:-1] == [None] * (len(parts) - 1)
    assert out[-1] == data
    assert not assembler.pending


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=3000), max_size=40),
    st.integers(min_value=200, max_value=4000),
)
def test_groups_cover_every_item_in_order_within_the_budget(sizes: list[int], budget: int) -> None:
    runs = group_by_size(sizes, budget)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(sizes)))
    for a, b in runs:
        cost = sum(s + 160 for s in sizes[a:b])
        assert cost <= budget or b - a == 1  # an item over the budget is alone


def test_the_assembler_refuses_a_foreign_part_and_bounds_memory() -> None:
    assembler = PartAssembler(limit=10)
    assert assembler.add(1, b"abc", True) is None
    with pytest.raises(PartOrderError):
        assembler.add(2, b"x", False)
    strict = PartAssembler(limit=5)
    strict.add(1, b"abc", True)
    with pytest.raises(PartsTooLargeError, match="more than 5 bytes"):
        strict.add(1, b"abc", True)
    assert not strict.pending
    lenient = PartAssembler(limit=5, discard_over_limit=True)
    for _ in range(100):  # parts past the limit are dropped as they come
        assert lenient.add(1, b"abcd", True) is None
    assert lenient.add(1, b"ab", False) == b""
    assert lenient.overflow == 402
    assert lenient.add(2, b"ok", False) == b"ok" and lenient.overflow is None


def test_part_size_leaves_room_for_the_message() -> None:
    assert part_size_for(FRAME) < FRAME
    assert part_size_for(m.DEFAULT_MAX_FRAME_SIZE) > m.DEFAULT_MAX_OBJECT_BYTES


# -- the state machines ------------------------------------------------------------------------


class Link:
    """A client and a server joined in memory, with a small frame limit."""

    def __init__(self, *, versions: tuple[int, ...] = (2, 3), limit: int = 1 << 20) -> None:
        self.frames: list[bytes] = []
        self.client = ClientProtocol(max_frame_size=FRAME)
        self.server = ServerProtocol(max_frame_size=FRAME, max_changeset_bytes=limit)
        self.client.start("t", versions=versions, compression=False)
        self.to_server()
        self.server.welcome(1, "c")
        self.to_client()
        self.client.bind(1, "A", SCHEMA, 0, 0, local_version=100)
        self.to_server()
        self.server.bound(1, 0, 0)
        self.to_client()
        self.frames.clear()

    def to_server(self) -> list[Any]:
        events: list[Any] = []
        for frame in self.client.data_to_send():
            assert len(frame) <= FRAME
            self.frames.append(frame)
            events += self.server.receive_data(frame)
        return events

    def to_client(self) -> list[Any]:
        events: list[Any] = []
        for frame in self.server.data_to_send():
            assert len(frame) <= FRAME
            events += self.client.receive_data(frame)
        return events


def test_an_upload_larger_than_a_frame_arrives_as_one_changeset() -> None:
    link = Link()
    big = os.urandom(5 * FRAME + 123)
    small = [UploadChangeset(v, os.urandom(900)) for v in (1, 2, 3)]
    link.client.upload(1, [*small, UploadChangeset(4, big), UploadChangeset(5, b"x")], 0)
    events = link.to_server()
    assert len(link.frames) > 6
    got = [cs for ev in events if isinstance(ev, UploadReceived) for cs in ev.changesets]
    assert [cs.version for cs in got] == [1, 2, 3, 4, 5]
    assert got[3].instructions == big and not got[3].more
    assert all(not ev.oversized for ev in events)


def test_an_oversized_upload_is_dropped_part_by_part_and_named() -> None:
    link = Link(limit=3 * FRAME)
    link.client.upload(1, [UploadChangeset(1, os.urandom(6 * FRAME))], 0)
    [event] = link.to_server()
    assert isinstance(event, UploadReceived)
    assert event.changesets == [UploadChangeset(1, b"")]
    assert event.oversized == {1: 6 * FRAME}
    link.client.upload(1, [UploadChangeset(2, b"next")], 0)
    [event] = link.to_server()
    assert event.changesets == [UploadChangeset(2, b"next")] and not event.oversized


def test_a_reconnect_drops_the_parts_and_the_upload_is_sent_again() -> None:
    link = Link()
    big = os.urandom(4 * FRAME)
    link.client.upload(1, [UploadChangeset(1, big)], 0)
    frames = link.client.data_to_send()
    for frame in frames[:2]:  # the connection ends after two parts
        assert link.server.receive_data(frame) == []
    again = Link()  # a new connection: the server holds nothing of version 1
    again.client.upload(1, [UploadChangeset(1, big)], 0)
    events = again.to_server()
    assert [cs.instructions for ev in events for cs in ev.changesets] == [big]


def test_a_download_larger_than_a_frame_is_applied_whole() -> None:
    link = Link()
    big = os.urandom(5 * FRAME)
    changesets = [
        DownloadChangeset(1, "B", 1, os.urandom(700)),
        DownloadChangeset(2, "B", 2, big),
        DownloadChangeset(3, "C", 1, b"small"),
    ]
    link.server.download(1, changesets, 3, 3, 0, 0)
    frames = link.server.data_to_send()
    assert len(frames) > 5 and all(len(f) <= FRAME for f in frames)
    events: list[Any] = []
    for frame in frames:
        got = link.client.receive_data(frame)
        events += got
        # no event ever carries part of a changeset, and the cursor never passes one
        for ev in got:
            assert isinstance(ev, DownloadReceived)
            assert all(not cs.more for cs in ev.changesets)
    received = [cs for ev in events for cs in ev.changesets]
    assert [cs.server_version for cs in received] == [1, 2, 3]
    assert received[1].instructions == big
    assert link.client.progress(1).download_cursor == 3


def test_a_download_of_many_objects_is_split_and_applied_as_one() -> None:
    link = Link()
    objects = [m.ObjectUpdate("Task", i, os.urandom(300)) for i in range(100)]
    changesets = [DownloadChangeset(1, "B", 1, os.urandom(3 * FRAME))]
    link.server.download(1, changesets, 1, 1, 0, 0, 0, objects)
    frames = link.server.data_to_send()
    assert len(frames) > 4
    decoded = [decode_frame(f) for f in frames]
    assert [d.continued for d in decoded if isinstance(d, m.Download)] == [True] * (
        len(frames) - 1
    ) + [False]
    events = [ev for f in frames for ev in link.client.receive_data(f)]
    [event] = events
    assert isinstance(event, DownloadReceived)
    assert event.objects == objects
    assert [cs.instructions for cs in event.changesets] == [changesets[0].instructions]
    assert event.cursor == 1


def test_a_part_out_of_order_from_the_server_ends_the_connection() -> None:
    link = Link()
    link.server.download(1, [DownloadChangeset(1, "B", 1, os.urandom(3 * FRAME))], 1, 1, 0, 0)
    first, *_ = link.server.data_to_send()
    assert link.client.receive_data(first) == []
    other = m.Download(1, [DownloadChangeset(2, "B", 2, b"x")], 2, 2, 0, 0)
    with pytest.raises(ProtocolViolationError) as info:
        link.client.receive_data(encode_frame(other))
    assert error_code_of(info.value) is ErrorCode.BAD_CHANGESET


def test_a_v2_peer_gets_the_old_error_not_parts() -> None:
    link = Link(versions=(2,))
    with pytest.raises(LocalProtocolError, match="needs protocol version 3"):
        link.client.upload(1, [UploadChangeset(1, os.urandom(2 * FRAME))], 0)
    with pytest.raises(LocalProtocolError, match="needs protocol version 3"):
        link.server.download(1, [DownloadChangeset(1, "B", 1, os.urandom(2 * FRAME))], 1, 1, 0, 0)


def test_whole_changesets_keep_the_v2_wire_form() -> None:
    link = Link()
    link.client.upload(1, [UploadChangeset(1, b"abc")], 0)
    [frame] = link.client.data_to_send()
    msg = decode_frame(frame)
    assert isinstance(msg, m.Upload) and msg.changesets == [UploadChangeset(1, b"abc")]
    assert b"\xc3" not in frame  # no msgpack `true`: a v2 server reads it as before
    link.server.download(1, [DownloadChangeset(1, "B", 1, b"abc")], 1, 1, 0, 0)
    [frame] = link.server.data_to_send()
    assert b"\xc3" not in frame and b"\xc2" not in frame  # nor a `continued` flag
    assert len(msgpack.unpackb(frame)) == 11  # the ten fields a v2 client reads, and the type
