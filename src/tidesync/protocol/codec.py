"""Frames <-> messages: the sync protocol's byte format, with every field validated.

A frame is one binary WebSocket message holding a msgpack array ``[type_code, *fields]``
(nested changesets are arrays too), encoded with :func:`tidesync.core.packing.pack` so
datetimes, decimals, UUIDs and ObjectIds travel as the same extension types as everywhere
else. A frame whose first byte is ``0xC1`` (a byte msgpack never uses) is the zlib
compression of such an array.

Decoding is the trust boundary: whatever arrives, it returns a valid message or raises
:class:`~tidesync.protocol.messages.InvalidMessageError` (a ``MalformedMessageError``) or
:class:`~tidesync.protocol.messages.OversizedFrameError` (a ``FrameTooLargeError``). The
size limit is checked on the raw frame and again while decompressing, so a small zip bomb
is refused before it is inflated.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from typing import Any

from ..core.packing import pack, unpack
from ..core.schema import ModelSchema
from ..errors import SyncAction
from .messages import (
    DEFAULT_COMPRESSION_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_INT,
    MIN_MAX_FRAME_SIZE,
    Bind,
    Bound,
    Download,
    DownloadChangeset,
    Error,
    ErrorCode,
    Hello,
    InvalidMessageError,
    Mark,
    MarkReply,
    Message,
    MessageType,
    ObjectRows,
    ObjectUpdate,
    OversizedFrameError,
    Ping,
    Pong,
    Query,
    QueryError,
    Refresh,
    Unbind,
    Unbound,
    Upload,
    UploadChangeset,
    Welcome,
    is_connection_level_code,
    is_session_level_code,
)

#: First byte of a compressed frame.
COMPRESSED_MARKER = 0xC1
_MARKER_BYTE = bytes([COMPRESSED_MARKER])
#: Most protocol versions a HELLO may list.
MAX_OFFERED_VERSIONS = 64
#: The zlib level frames are compressed at. Level 1 (zlib's fastest) rather than the default
#: 6: on a 256 KiB bootstrap page of 5-field objects it compresses about 6x faster (0.9 ms vs
#: 5.5 ms) for a 6% larger frame (ratio 7.3 vs 7.8); on a ~1 MB page 3.8 ms vs 20.5 ms, ratio
#: 7.4 vs 8.0; on an UPLOAD of 10,000 CREATEs (1.2 MB) 4.1 ms vs 15.6 ms with a *better*
#: ratio (6.4 vs 6.1). Inflating costs the same at either level. The wire format (a zlib
#: stream) does not depend on the level, so peers need not agree on it.
COMPRESSION_LEVEL = 1

_Check = Callable[[Any], Any]


# -- field checks: each returns the (possibly converted) value or raises ValueError ---------


def _int(lo: int = 0, hi: int = MAX_INT) -> _Check:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside [{lo}, {hi}]")
        return value

    return check


def _optional(inner: _Check) -> _Check:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def _str(*, non_empty: bool = False) -> _Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        if non_empty and not value:
            raise ValueError("must not be empty")
        return value

    return check


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError(f"expected bytes, got {type(value).__name__}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean, got {type(value).__name__}")
    return value


def _list(item: _Check, *, min_len: int = 0, max_len: int | None = None) -> _Check:
    def check(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError(f"expected an array, got {type(value).__name__}")
        if len(value) < min_len or (max_len is not None and len(value) > max_len):
            raise ValueError(f"array of {len(value)} items (allowed {min_len}..{max_len})")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except ValueError as exc:
                raise ValueError(f"item {index}: {exc}") from exc
        return out

    return check


def _action(value: Any) -> SyncAction:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    try:
        return SyncAction(value)
    except ValueError:
        raise ValueError(f"unknown action {value!r}") from None


def _model_schema(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("a model schema must be a map with string keys")
    try:
        ModelSchema.from_dict(value)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"invalid model schema: {exc}") from exc
    return value


def _queries(value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a map, got {type(value).__name__}")
    out: dict[str, list[str]] = {}
    for model, queries in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError("model names must be non-empty strings")
        out[model] = _list(_str())(queries)
    return out


def _with_more(name: str, build: Callable[..., Any], checks: tuple[_Check, ...]) -> _Check:
    """A changeset record: its fields, then (protocol v3) ``true`` for a part that more
    parts follow; a whole changeset, or a last part, leaves it off."""
    size = len(checks)

    def check(value: Any) -> Any:
        if not isinstance(value, list) or not size <= len(value) <= size + 1:
            raise ValueError(f"a {name} must be an array of {size} or {size + 1} items")
        values = [c(v) for c, v in zip(checks, value)]
        if len(value) > size:
            if value[size] is not True:
                raise ValueError(f"a {name}'s part flag must be true (or left off)")
            values.append(True)
        return build(*values)

    return check


_upload_changeset = _with_more("changeset", UploadChangeset, (_int(1), _bytes))
_download_changeset = _with_more(
    "changeset", DownloadChangeset, (_int(1), _str(non_empty=True), _int(1), _bytes)
)
_session = _int(1)
_version = _int(0)


def _object_update(value: Any) -> ObjectUpdate:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError("an object update must be an array of 3 items")
    model, pk, state = value
    if not isinstance(model, str) or not model:
        raise ValueError("an object update needs a model name")
    if state is not None and not isinstance(state, bytes):
        raise ValueError("an object update's state must be bytes or nil")
    return ObjectUpdate(model, pk, state)


_new_update = ObjectUpdate.__new__
_set_field = object.__setattr__


def _object_updates(value: Any) -> list[ObjectUpdate]:
    """``_list(_object_update)`` in one loop: a bootstrap page holds thousands. The usual
    item is checked inline and the frozen dataclass filled without its ``__init__``; any
    other goes through :func:`_object_update`, which names what is wrong with it."""
    if not isinstance(value, list):
        raise ValueError(f"expected an array, got {type(value).__name__}")
    out: list[ObjectUpdate] = []
    add = out.append
    for index, item in enumerate(value):
        if type(item) is list and len(item) == 3:
            model, pk, state = item
            if type(model) is str and model and (type(state) is bytes or state is None):
                obj = _new_update(ObjectUpdate)
                _set_field(obj, "model", model)
                _set_field(obj, "pk", pk)
                _set_field(obj, "state", state)
                add(obj)
                continue
        try:
            add(_object_update(item))
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from exc
    return out


def _object_rows_block(block: Any) -> ObjectRows:
    if not isinstance(block, list) or len(block) != 5:
        raise ValueError("a block of object rows must be an array of 5 items")
    model, fields, pk, size, rows = block
    if not isinstance(model, str) or not model:
        raise ValueError("a block of object rows needs a model name")
    if (
        not isinstance(fields, list)
        or not fields
        or not all(isinstance(f, str) and f for f in fields)
        or len(set(fields)) != len(fields)
    ):
        raise ValueError("a block's fields must be distinct non-empty strings")
    if type(pk) is not int or not 0 <= pk < len(fields):
        raise ValueError(f"a block's primary key index {pk!r} names none of its fields")
    if type(size) is not int or not 0 <= size <= MAX_INT:
        raise ValueError(f"a block's size must be a non-negative integer, got {size!r}")
    if not isinstance(rows, list):
        raise ValueError("a block's rows must be an array")
    width = len(fields) + 1
    for index, row in enumerate(rows):
        if type(row) is not list or len(row) != width or type(row[0]) is not bytes:
            raise ValueError(
                f"row {index}: expected an array of the create's HLC (bytes) and "
                f"{len(fields)} values"
            )
    return ObjectRows(model, fields, pk, size, rows)


#: DOWNLOAD's ``rows``: blocks of ``[model, fields, pk, size, rows]``, each row an array of
#: the packed create HLC (bytes) and one value per field.
_object_rows = _list(_object_rows_block)


def _query_args(value: Any) -> dict[str, list[list[Any]]]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a map, got {type(value).__name__}")
    out: dict[str, list[list[Any]]] = {}
    for model, lists in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError("model names must be non-empty strings")
        out[model] = _list(_list(lambda v: v))(lists)
    return out


#: For each type: the message class and one check per field, in field order.
_SPECS: dict[MessageType, tuple[type[Any], tuple[_Check, ...]]] = {
    MessageType.HELLO: (
        Hello,
        (_list(_int(1), min_len=1, max_len=MAX_OFFERED_VERSIONS), _str(), _bool),
    ),
    MessageType.REFRESH: (Refresh, (_str(),)),
    MessageType.BIND: (
        Bind,
        (_session, _str(non_empty=True), _list(_model_schema), _version, _version, _bool),
    ),
    MessageType.UNBIND: (Unbind, (_session,)),
    MessageType.UPLOAD: (Upload, (_session, _list(_upload_changeset), _version)),
    MessageType.MARK: (Mark, (_session, _int(1))),
    MessageType.QUERY: (Query, (_session, _version, _queries, _query_args, _bool)),
    MessageType.PING: (Ping, (_int(0),)),
    MessageType.PONG: (Pong, (_int(0),)),
    MessageType.WELCOME: (
        Welcome,
        (_int(1), _int(MIN_MAX_FRAME_SIZE), _int(0), _str()),
    ),
    MessageType.BOUND: (Bound, (_session, _version, _version)),
    MessageType.UNBOUND: (Unbound, (_session,)),
    MessageType.DOWNLOAD: (
        Download,
        (
            _session,
            _list(_download_changeset),
            _version,
            _version,
            _int(0),
            _version,
            _version,
            _object_updates,
            _int(0, 2),
            _object_rows,
            _bool,
        ),
    ),
    MessageType.MARK_REPLY: (MarkReply, (_session, _int(1), _version)),
    MessageType.QUERY_ERROR: (QueryError, (_session, _version, _str())),
    MessageType.ERROR: (
        Error,
        (_int(100, 299), _str(), _action, _optional(_int(0)), _optional(_session)),
    ),
}


#: How many trailing fields of a message type were added later and may be omitted.
_OPTIONAL_TAIL: dict[MessageType, int] = {
    MessageType.BIND: 1,
    MessageType.QUERY: 2,
    MessageType.DOWNLOAD: 4,
}

# -- messages ------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, UploadChangeset):
        if value.more:
            return [value.version, value.instructions, True]
        return [value.version, value.instructions]
    if isinstance(value, DownloadChangeset):
        if value.more:
            return [
                value.server_version,
                value.origin,
                value.client_version,
                value.instructions,
                True,
            ]
        return [value.server_version, value.origin, value.client_version, value.instructions]
    if isinstance(value, ObjectUpdate):
        return [value.model, value.pk, value.state]
    if isinstance(value, ObjectRows):
        return [value.model, value.fields, value.pk, value.size, value.rows]
    if isinstance(value, SyncAction):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


#: Each message class's field names, in order (``dataclasses.fields`` is slow per call).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclass_fields(cls))
    return names


def encode_message(msg: Message) -> bytes:
    """The uncompressed bytes of a message."""
    names = _field_names(type(msg))
    if type(msg) is Download and not msg.continued:
        names = names[:-1]  # v3's ``continued`` is left off when false: v2 peers read it
    values = [_plain(getattr(msg, name)) for name in names]
    return pack([int(msg.TYPE), *values])


def decode_message(body: bytes) -> Message:
    """Parse and validate an uncompressed frame body.

    Raises :class:`InvalidMessageError` naming the message and field at fault.
    """
    try:
        items = unpack(body)
    except ValueError as exc:
        raise InvalidMessageError(f"not a valid msgpack frame: {exc}") from exc
    if not isinstance(items, list) or not items:
        raise InvalidMessageError("a frame must be a non-empty array")
    raw_type = items[0]
    if not isinstance(raw_type, int) or isinstance(raw_type, bool):
        raise InvalidMessageError("the message type must be an integer")
    try:
        mtype = MessageType(raw_type)
    except ValueError:
        raise InvalidMessageError(
            f"unknown message type {raw_type}", code=ErrorCode.UNKNOWN_MESSAGE
        ) from None
    cls, checks = _SPECS[mtype]
    names = _field_names(cls)
    # Fields added later (flexible sync) have defaults and may be left off by older peers.
    required = len(checks) - _OPTIONAL_TAIL.get(mtype, 0)
    if not required <= len(items) - 1 <= len(checks):
        raise InvalidMessageError(
            f"expected {len(checks)} fields, got {len(items) - 1}", message_name=mtype.name
        )
    values = []
    for name, check, value in zip(names, checks, items[1:]):
        try:
            values.append(check(value))
        except ValueError as exc:
            raise InvalidMessageError(str(exc), message_name=mtype.name, field_name=name) from exc
    msg: Message = cls(*values)
    if isinstance(msg, Error):
        _check_error_level(msg)
    return msg


def _check_error_level(msg: Error) -> None:
    if is_connection_level_code(msg.code) and msg.session is not None:
        raise InvalidMessageError(
            f"connection-level code {msg.code} with a session",
            message_name="ERROR",
            field_name="session",
        )
    if is_session_level_code(msg.code) and msg.session is None:
        raise InvalidMessageError(
            f"session-level code {msg.code} without a session",
            message_name="ERROR",
            field_name="session",
        )


# -- frames --------------------------------------------------------------------------------


def encode_frame(
    msg: Message, *, compress: bool = False, threshold: int = DEFAULT_COMPRESSION_THRESHOLD
) -> bytes:
    """The frame for ``msg``; compressed if allowed, over ``threshold`` and actually smaller."""
    return frame_of_body(encode_message(msg), compress=compress, threshold=threshold)


def frame_of_body(
    body: bytes, *, compress: bool = False, threshold: int = DEFAULT_COMPRESSION_THRESHOLD
) -> bytes:
    """The frame for an encoded message (:func:`encode_message`): ``body`` itself, or its
    compression when allowed, over ``threshold`` and actually smaller. The frame limit
    bounds ``body`` too (the receiver checks it while inflating)."""
    if compress and len(body) > threshold:
        packed = zlib.compress(body, COMPRESSION_LEVEL)
        if len(packed) + 1 < len(body):
            return _MARKER_BYTE + packed
    return body


def decode_frame(
    frame: bytes,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    allow_compressed: bool = True,
) -> Message:
    """Parse one received frame (compressed or not) into a validated message."""
    if len(frame) > max_frame_size:
        raise OversizedFrameError(len(frame), max_frame_size)
    if not frame:
        raise InvalidMessageError("empty frame")
    if frame[0] != COMPRESSED_MARKER:
        return decode_message(bytes(frame))
    if not allow_compressed:
        raise InvalidMessageError("compressed frame, but compression was not negotiated")
    return decode_message(_inflate(bytes(frame[1:]), max_frame_size))


def _inflate(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise InvalidMessageError(f"bad compressed frame: {exc}") from exc
    if len(body) > limit or inflater.unconsumed_tail:
        raise OversizedFrameError(len(body), limit, decompressed=True)
    if not inflater.eof or inflater.unused_data:
        raise InvalidMessageError("bad compressed frame: truncated or trailing data")
    return body
