"""The sync protocol's vocabulary: message types, messages, error codes and protocol errors.

Every frame on the sync WebSocket carries one of the frozen dataclasses below (the codec in
:mod:`tidesync.protocol.codec` turns them into bytes and back, validating every field). The
state machines in :mod:`~tidesync.protocol.client` and :mod:`~tidesync.protocol.server` decide
which of them may be sent or received when. Keeping the vocabulary in one module gives both
sides, the documentation (``docs/protocol.md``) and the tests a single source of truth.

Errors a peer can cause are :class:`~tidesync.errors.RemoteProtocolError` subclasses that
carry the :class:`ErrorCode` to report; :func:`error_code_of` reads it from any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from ..core.merge import LONE_HEAD
from ..core.packing import pack
from ..errors import (
    FrameTooLargeError,
    MalformedMessageError,
    RemoteProtocolError,
    SyncAction,
)

#: Protocol versions this implementation speaks (see the version log in docs/protocol.md).
SUPPORTED_VERSIONS: tuple[int, ...] = (2, 3)
#: The first version in which a changeset may travel in parts (docs/protocol.md, "Changeset
#: parts" and the version log).
PARTS_VERSION = 3
#: Largest integer any numeric field may hold (msgpack int64).
MAX_INT = 2**63 - 1
#: Largest object a device writes by default (``Configuration(max_object_bytes=...)``):
#: 16 MiB, Realm's limit. An object travels whole in flexible sync (bootstrap pages and
#: authoritative states), so it must fit one frame with room for its page.
DEFAULT_MAX_OBJECT_BYTES = 16 * 1024 * 1024
#: Default hard limit on a frame, raw and decompressed: the largest object plus 1 MiB (one
#: download page of other objects and the message around them).
DEFAULT_MAX_FRAME_SIZE = DEFAULT_MAX_OBJECT_BYTES + 1024 * 1024
#: Most bytes a device joins from the parts of one downloaded changeset (a bound against a
#: misbehaving server; the server's own ``max_changeset_bytes`` is far lower).
DEFAULT_MAX_ASSEMBLED_BYTES = 1024 * 1024 * 1024
#: Smallest ``max_frame_size`` a server may announce.
MIN_MAX_FRAME_SIZE = 4096
#: Bodies larger than this are compressed when the peer negotiated compression.
DEFAULT_COMPRESSION_THRESHOLD = 16 * 1024


class MessageType(IntEnum):
    """The first element of every frame's array."""

    # client -> server
    HELLO = 1
    REFRESH = 2
    BIND = 3
    UNBIND = 4
    UPLOAD = 5
    MARK = 6
    QUERY = 7
    # both directions
    PING = 8
    PONG = 9
    # server -> client
    WELCOME = 20
    BOUND = 21
    UNBOUND = 22
    DOWNLOAD = 23
    MARK_REPLY = 24
    QUERY_ERROR = 25
    ERROR = 26


class ErrorCode(IntEnum):
    """Error codes sent in ERROR: 100-199 concern the connection, 200-299 one session."""

    CONNECTION_CLOSED = 100
    OTHER_ERROR = 101
    UNKNOWN_MESSAGE = 102
    BAD_SYNTAX = 103
    LIMITS_EXCEEDED = 104
    WRONG_PROTOCOL_VERSION = 105
    BAD_SESSION_IDENT = 106
    REUSE_OF_SESSION_IDENT = 107
    BOUND_IN_OTHER_SESSION = 108
    BAD_MESSAGE_ORDER = 109
    FRAME_TOO_LARGE = 112
    BAD_TOKEN = 113
    TOKEN_EXPIRED = 114
    GOING_AWAY = 115
    OTHER_APP = 116

    SESSION_CLOSED = 201
    OTHER_SESSION_ERROR = 202
    SESSION_TOKEN_EXPIRED = 203
    SESSION_BAD_AUTHENTICATION = 204
    ILLEGAL_PATH = 205
    NO_SUCH_FILE = 206
    PERMISSION_DENIED = 207
    BAD_CLIENT_FILE_IDENT = 209
    BAD_SERVER_VERSION = 210
    CLIENT_RESET_NEEDED = 211
    BAD_CHANGESET = 212
    DISABLED_SESSION = 213
    BAD_CHANGESET_MERGE = 217
    BAD_ORIGIN_FILE = 222
    BAD_SCHEMA = 225
    COMPENSATING_WRITE = 231
    CHANGESET_REFUSED = 232
    CLOCK_SKEW = 236

    @property
    def is_connection_level(self) -> bool:
        """True for 100-199: the error ends the whole connection."""
        return is_connection_level_code(self.value)

    @property
    def default_action(self) -> SyncAction:
        """What a client should do when the server does not say otherwise."""
        return _DEFAULT_ACTIONS[self]


_R, _T, _C, _S = (
    SyncAction.RETRY,
    SyncAction.REFRESH_TOKEN,
    SyncAction.CLIENT_RESET,
    SyncAction.STOP,
)
_DEFAULT_ACTIONS: dict[ErrorCode, SyncAction] = {
    ErrorCode.CONNECTION_CLOSED: _R,
    ErrorCode.OTHER_ERROR: _R,
    ErrorCode.UNKNOWN_MESSAGE: _S,
    ErrorCode.BAD_SYNTAX: _S,
    ErrorCode.LIMITS_EXCEEDED: _S,
    ErrorCode.WRONG_PROTOCOL_VERSION: _S,
    ErrorCode.BAD_SESSION_IDENT: _S,
    ErrorCode.REUSE_OF_SESSION_IDENT: _S,
    ErrorCode.BOUND_IN_OTHER_SESSION: _R,
    ErrorCode.BAD_MESSAGE_ORDER: _S,
    ErrorCode.FRAME_TOO_LARGE: _S,
    ErrorCode.BAD_TOKEN: _T,
    ErrorCode.TOKEN_EXPIRED: _T,
    ErrorCode.GOING_AWAY: _R,
    ErrorCode.OTHER_APP: _S,
    ErrorCode.SESSION_CLOSED: _R,
    ErrorCode.OTHER_SESSION_ERROR: _R,
    ErrorCode.SESSION_TOKEN_EXPIRED: _T,
    ErrorCode.SESSION_BAD_AUTHENTICATION: _T,
    ErrorCode.ILLEGAL_PATH: _S,
    ErrorCode.NO_SUCH_FILE: _S,
    ErrorCode.PERMISSION_DENIED: _S,
    ErrorCode.BAD_CLIENT_FILE_IDENT: _C,
    ErrorCode.BAD_SERVER_VERSION: _C,
    ErrorCode.CLIENT_RESET_NEEDED: _C,
    ErrorCode.BAD_CHANGESET: _S,
    ErrorCode.DISABLED_SESSION: _S,
    ErrorCode.BAD_CHANGESET_MERGE: _C,
    ErrorCode.BAD_ORIGIN_FILE: _C,
    ErrorCode.BAD_SCHEMA: _S,
    ErrorCode.COMPENSATING_WRITE: _R,
    ErrorCode.CHANGESET_REFUSED: _R,
    ErrorCode.CLOCK_SKEW: _R,
}


#: Session-level codes after which the session stays bound: the server refused some
#: writes (231: and sent the authoritative state; 232: a whole changeset, integrated as
#: nothing), and sync goes on.
NON_SUSPENDING_CODES = frozenset({ErrorCode.COMPENSATING_WRITE, ErrorCode.CHANGESET_REFUSED})


def is_connection_level_code(code: int) -> bool:
    """True if ``code`` (known or not) is a connection-level code (100-199)."""
    return 100 <= code <= 199


def is_session_level_code(code: int) -> bool:
    """True if ``code`` (known or not) is a session-level code (200-299)."""
    return 200 <= code <= 299


# -- protocol errors carrying a code ------------------------------------------------------


class ProtocolViolationError(RemoteProtocolError):
    """The peer sent a well-formed message the protocol forbids here.

    ``code`` is what to report; ``session`` is set when only that session is affected.
    """

    def __init__(self, code: ErrorCode, message: str, session: int | None = None) -> None:
        super().__init__(f"[{int(code)}] {message}")
        self.code = code
        self.reason = message
        self.session = session


class InvalidMessageError(MalformedMessageError):
    """A frame did not decode into a valid message; names the message and field at fault."""

    def __init__(
        self,
        message: str,
        *,
        message_name: str | None = None,
        field_name: str | None = None,
        code: ErrorCode = ErrorCode.BAD_SYNTAX,
    ) -> None:
        where = ".".join(p for p in (message_name, field_name) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        self.message_name = message_name
        self.field_name = field_name
        self.code = code


class OversizedFrameError(FrameTooLargeError):
    """A frame, raw or decompressed, exceeded the size limit."""

    def __init__(self, size: int, limit: int, *, decompressed: bool = False) -> None:
        what = "decompressed frame" if decompressed else "frame"
        shown = f"more than {limit}" if decompressed else str(size)
        super().__init__(f"{what} of {shown} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.code = ErrorCode.FRAME_TOO_LARGE


def error_code_of(exc: RemoteProtocolError) -> ErrorCode:
    """The code to report for a remote protocol error (any subclass, ours or not)."""
    code = getattr(exc, "code", None)
    if isinstance(code, ErrorCode):
        return code
    if isinstance(exc, FrameTooLargeError):
        return ErrorCode.FRAME_TOO_LARGE
    if isinstance(exc, MalformedMessageError):
        return ErrorCode.BAD_SYNTAX
    return ErrorCode.OTHER_ERROR


def session_of(exc: RemoteProtocolError) -> int | None:
    """The session a remote protocol error concerns, or None for the whole connection."""
    session = getattr(exc, "session", None)
    return session if isinstance(session, int) else None


# -- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadChangeset:
    """One local changeset in an UPLOAD: its client version and packed instructions."""

    version: int
    instructions: bytes
    #: Protocol v3: this is a part of the changeset and more parts follow (docs/protocol.md).
    more: bool = False


@dataclass(frozen=True, slots=True)
class DownloadChangeset:
    """One server changeset in a DOWNLOAD, with where it came from."""

    server_version: int
    origin: str
    client_version: int
    instructions: bytes
    #: Protocol v3: this is a part of the changeset and more parts follow (docs/protocol.md).
    more: bool = False


def changeset_size(cs: UploadChangeset | DownloadChangeset) -> int:
    """The bytes a changeset counts for in progress accounting (its instructions' length)."""
    return len(cs.instructions)


@dataclass(frozen=True, slots=True)
class Hello:
    """Client's first frame: the versions it speaks, its access token, compression support."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    protocol_versions: list[int]
    token: str
    compression: bool


@dataclass(frozen=True, slots=True)
class Refresh:
    """Replaces the access token of a live connection."""

    TYPE: ClassVar[MessageType] = MessageType.REFRESH
    token: str


@dataclass(frozen=True, slots=True)
class Bind:
    """Opens a session for one local database file."""

    TYPE: ClassVar[MessageType] = MessageType.BIND
    session: int
    file_ident: str
    schema: list[dict[str, Any]]
    download_cursor: int
    upload_acked: int
    #: Flexible sync: send nothing until the session's first QUERY (protocol log: v1 addendum).
    flexible: bool = False


@dataclass(frozen=True, slots=True)
class Unbind:
    """Closes a session; the server answers UNBOUND."""

    TYPE: ClassVar[MessageType] = MessageType.UNBIND
    session: int


@dataclass(frozen=True, slots=True)
class Upload:
    """Local changesets (increasing versions) and the client's integrated server version."""

    TYPE: ClassVar[MessageType] = MessageType.UPLOAD
    session: int
    changesets: list[UploadChangeset]
    download_cursor: int


@dataclass(frozen=True, slots=True)
class Mark:
    """Asks the server to reply once it has sent everything it held when the MARK arrived."""

    TYPE: ClassVar[MessageType] = MessageType.MARK
    session: int
    request_id: int


@dataclass(frozen=True, slots=True)
class Query:
    """The session's subscription set (flexible sync): model name -> query strings."""

    TYPE: ClassVar[MessageType] = MessageType.QUERY
    session: int
    query_version: int
    queries: dict[str, list[str]]
    #: Per model, the arguments of each query (``$0``, ``$1`` ...), parallel to ``queries``.
    args: dict[str, list[list[Any]]] = field(default_factory=dict)
    #: The device already holds this set's complete bootstrap (a QUERY re-sent after a
    #: reconnect): the server may skip the bootstrap if it knows the view is unchanged.
    bootstrapped: bool = False


@dataclass(frozen=True, slots=True)
class ObjectUpdate:
    """A whole object sent outside the changesets (flexible sync): ``state`` is its
    :meth:`~tidesync.core.merge.ObjectState.to_bytes` or, for an object a lone CREATE
    made, the compact form :meth:`~tidesync.core.merge.ObjectState.from_bytes` also reads
    (docs/protocol.md, "Object states"); or None to drop it from the device (a local
    eviction, never a delete)."""

    model: str
    pk: Any
    state: bytes | None


@dataclass(frozen=True, slots=True)
class ObjectRows:
    """Objects of one model that a lone CREATE each made, as rows (a bootstrap page's usual
    content, in less space and decoding than :class:`ObjectUpdate` each). A row is the
    packed HLC of the CREATE (``[wall, counter, origin]``), then the object's values in
    ``fields`` order; ``fields[pk]`` is the primary key. Each row stands for the
    :class:`ObjectUpdate` whose state is the compact lone-create form ``[2, created,
    values]`` (docs/protocol.md, "Object states"; :meth:`updates` makes them), and ``size``
    is those states' bytes (for progress)."""

    model: str
    fields: list[str]
    pk: int
    size: int
    rows: list[list[Any]]

    def updates(self) -> list[ObjectUpdate]:
        """The object updates these rows stand for."""
        return [self.update(row) for row in self.rows]

    def update(self, row: list[Any]) -> ObjectUpdate:
        """The object update ``row`` (one of :attr:`rows`) stands for."""
        values = dict(zip(self.fields, row[1:], strict=True))
        state = LONE_HEAD + row[0] + pack(values)
        return ObjectUpdate(self.model, row[1 + self.pk], state)


#: ``Download.bootstrap`` values: not a bootstrap page, a page, the last page.
BOOTSTRAP_NONE, BOOTSTRAP_PAGE, BOOTSTRAP_LAST = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Ping:
    """Keep-alive; the peer answers PONG with the same timestamp."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to PING, echoing its timestamp."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server's answer to HELLO: the chosen version and the connection's limits."""

    TYPE: ClassVar[MessageType] = MessageType.WELCOME
    protocol_version: int
    max_frame_size: int
    server_time_ms: int
    connection_id: str


@dataclass(frozen=True, slots=True)
class Bound:
    """Server's answer to BIND: its latest version and the last upload it integrated."""

    TYPE: ClassVar[MessageType] = MessageType.BOUND
    session: int
    server_version: int
    upload_acked: int


@dataclass(frozen=True, slots=True)
class Unbound:
    """Server's answer to UNBIND; the session number may then be reused."""

    TYPE: ClassVar[MessageType] = MessageType.UNBOUND
    session: int


@dataclass(frozen=True, slots=True)
class Download:
    """Server changesets plus cursors and progress; an empty one acknowledges uploads."""

    TYPE: ClassVar[MessageType] = MessageType.DOWNLOAD
    session: int
    changesets: list[DownloadChangeset]
    cursor: int
    latest_server_version: int
    downloadable_bytes: int
    upload_acked: int
    query_version: int = 0
    #: Whole objects and evictions, applied after ``changesets`` (flexible sync).
    objects: list[ObjectUpdate] = field(default_factory=list)
    #: BOOTSTRAP_NONE, BOOTSTRAP_PAGE or BOOTSTRAP_LAST (see docs/flexible-sync.md).
    bootstrap: int = 0
    #: New objects as rows (flexible sync's bootstrap), applied before ``objects``.
    rows: list[ObjectRows] = field(default_factory=list)
    #: Protocol v3: the next DOWNLOAD continues this one; the device applies them as one
    #: (docs/protocol.md, "Changeset parts"). Left off the wire when false.
    continued: bool = False


@dataclass(frozen=True, slots=True)
class MarkReply:
    """Answer to MARK: everything up to ``server_version`` has been sent."""

    TYPE: ClassVar[MessageType] = MessageType.MARK_REPLY
    session: int
    request_id: int
    server_version: int


@dataclass(frozen=True, slots=True)
class QueryError:
    """The server refused a subscription set."""

    TYPE: ClassVar[MessageType] = MessageType.QUERY_ERROR
    session: int
    query_version: int
    message: str


@dataclass(frozen=True, slots=True)
class Error:
    """An error on the connection (``session`` None) or on one session."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    message: str
    action: SyncAction
    retry_delay_ms: int | None = None
    session: int | None = field(default=None)


#: Any message.
Message = (
    Hello
    | Refresh
    | Bind
    | Unbind
    | Upload
    | Mark
    | Query
    | Ping
    | Pong
    | Welcome
    | Bound
    | Unbound
    | Download
    | MarkReply
    | QueryError
    | Error
)

#: Types a client may send (and a server receive).
CLIENT_MESSAGE_TYPES = frozenset(
    {
        MessageType.HELLO,
        MessageType.REFRESH,
        MessageType.BIND,
        MessageType.UNBIND,
        MessageType.UPLOAD,
        MessageType.MARK,
        MessageType.QUERY,
        MessageType.PING,
        MessageType.PONG,
    }
)
#: Types a server may send (and a client receive).
SERVER_MESSAGE_TYPES = frozenset(
    {
        MessageType.WELCOME,
        MessageType.BOUND,
        MessageType.UNBOUND,
        MessageType.DOWNLOAD,
        MessageType.MARK_REPLY,
        MessageType.QUERY_ERROR,
        MessageType.ERROR,
        MessageType.PING,
        MessageType.PONG,
    }
)


# -- events both state machines emit -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer sent PING; the PONG answer is already queued."""

    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered one of our PINGs (``timestamp_ms`` is the one we sent)."""

    timestamp_ms: int


# -- invariants both sides check -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DownloadProgress:
    """What a session's peers agree on before a DOWNLOAD: the state it must move forward."""

    cursor: int
    latest_server_version: int
    upload_acked: int
    #: Highest ``upload_acked`` a DOWNLOAD may carry (None: not checked).
    upload_limit: int | None
    #: The receiving client's file ident: its own changesets are never sent back to it.
    own_origin: str | None
    #: Highest query version the client has sent.
    query_version: int


def download_violation(msg: Download, before: DownloadProgress) -> tuple[ErrorCode, str] | None:
    """Check a DOWNLOAD against the session's progress; None if valid, else (code, reason).

    Cursors only move forward, never past the latest server version; changesets come in
    strictly increasing server versions, above the old cursor and up to the new one, never
    from the receiving file itself; acknowledgements only move forward and only cover what
    was uploaded.
    """
    bad_version = ErrorCode.BAD_SERVER_VERSION
    if msg.cursor < before.cursor:
        return bad_version, f"cursor moved backwards ({before.cursor} -> {msg.cursor})"
    if msg.latest_server_version < before.latest_server_version:
        return bad_version, (
            "latest_server_version moved backwards "
            f"({before.latest_server_version} -> {msg.latest_server_version})"
        )
    if msg.cursor > msg.latest_server_version:
        return bad_version, (
            f"cursor {msg.cursor} is beyond latest_server_version {msg.latest_server_version}"
        )
    previous = before.cursor
    for cs in msg.changesets:
        if cs.server_version <= previous:
            return ErrorCode.BAD_CHANGESET, (
                f"changeset server_version {cs.server_version} is not above {previous}"
            )
        if cs.server_version > msg.cursor:
            return ErrorCode.BAD_CHANGESET, (
                f"changeset server_version {cs.server_version} is beyond the cursor {msg.cursor}"
            )
        if before.own_origin is not None and cs.origin == before.own_origin:
            return ErrorCode.BAD_ORIGIN_FILE, (
                f"changeset {cs.server_version} comes from the receiving file itself"
            )
        previous = cs.server_version
    if msg.upload_acked < before.upload_acked:
        return bad_version, (
            f"upload_acked moved backwards ({before.upload_acked} -> {msg.upload_acked})"
        )
    if before.upload_limit is not None and msg.upload_acked > before.upload_limit:
        return bad_version, (
            f"upload_acked {msg.upload_acked} is beyond the last version uploaded "
            f"({before.upload_limit})"
        )
    if msg.query_version > before.query_version:
        return ErrorCode.BAD_MESSAGE_ORDER, (
            f"query_version {msg.query_version} was never sent (last {before.query_version})"
        )
    return None


# -- compensating writes (ERROR 231) ---------------------------------------------------------

#: The line of a COMPENSATING_WRITE message that lists the refused objects.
REFUSED_PREFIX = "refused: "


def compensating_message(refused: list[tuple[str, Any, str]]) -> str:
    """The ERROR 231 message: a readable summary, then one line listing ``(model, pk,
    reason)`` as JSON (each pk msgpack-packed, base64) for the client to decode."""
    import base64
    import json

    from ..core.packing import pack

    summary = "; ".join(f"{m} {pk!r}: {reason}" for m, pk, reason in refused[:20])
    more = f" (and {len(refused) - 20} more)" if len(refused) > 20 else ""
    items = [[m, base64.b64encode(pack(pk)).decode("ascii"), r] for m, pk, r in refused]
    return (
        f"the server refused {len(refused)} write(s) and sent back the authoritative state: "
        f"{summary}{more}\n{REFUSED_PREFIX}{json.dumps(items)}"
    )


def refused_of(message: str) -> list[tuple[str, Any, str]]:
    """Decode the list :func:`compensating_message` wrote (empty if absent or malformed)."""
    import base64
    import binascii
    import json

    from ..core.packing import unpack

    for line in message.splitlines():
        if not line.startswith(REFUSED_PREFIX):
            continue
        try:
            items = json.loads(line[len(REFUSED_PREFIX) :])
            return [(str(m), unpack(base64.b64decode(pk)), str(r)) for m, pk, r in items]
        except (ValueError, TypeError, binascii.Error):
            return []
    return []


# -- refused changesets (ERROR 232) ----------------------------------------------------------

#: The line of a CHANGESET_REFUSED message that lists the refused client versions.
REFUSED_VERSIONS_PREFIX = "refused versions: "


def refused_changesets_message(refused: list[tuple[int, str]]) -> str:
    """The ERROR 232 message: a readable summary, then one line listing ``(client
    version, reason)`` as JSON for the client to decode."""
    import json

    summary = "; ".join(f"version {v}: {reason}" for v, reason in refused[:20])
    more = f" (and {len(refused) - 20} more)" if len(refused) > 20 else ""
    return (
        f"the server refused {len(refused)} changeset(s) and integrated each as nothing: "
        f"{summary}{more}\n{REFUSED_VERSIONS_PREFIX}{json.dumps(refused)}"
    )


def refused_changesets_of(message: str) -> list[tuple[int, str]]:
    """Decode the list :func:`refused_changesets_message` wrote (empty if absent)."""
    import json

    for line in message.splitlines():
        if not line.startswith(REFUSED_VERSIONS_PREFIX):
            continue
        try:
            items = json.loads(line[len(REFUSED_VERSIONS_PREFIX) :])
            return [(int(v), str(r)) for v, r in items]
        except (ValueError, TypeError):
            return []
    return []


# -- clock skew (ERROR 236) ------------------------------------------------------------------

#: The line of a CLOCK_SKEW message that carries the refused version and the server's time.
CLOCK_PREFIX = "clock: "


def clock_skew_message(version: int, wall: int, server_ms: int, limit_ms: int) -> str:
    """The ERROR 236 message: what was refused and why, then one line with the refused
    changeset version and the server's time (ms) as JSON, for the client to decode."""
    import json

    ahead = wall - server_ms
    return (
        f"changeset version {version} has a timestamp {ahead} ms ahead of the server's "
        f"clock, more than the limit of {limit_ms} ms: this device's clock is wrong (set it "
        "right); a current client re-stamps its unsent changes at the server's time and "
        f"uploads them again\n{CLOCK_PREFIX}"
        + json.dumps({"version": version, "server_time_ms": server_ms})
    )


def clock_skew_of(message: str) -> tuple[int, int] | None:
    """``(refused version, server time ms)`` from a :func:`clock_skew_message`, or None."""
    import json

    for line in message.splitlines():
        if not line.startswith(CLOCK_PREFIX):
            continue
        try:
            raw = json.loads(line[len(CLOCK_PREFIX) :])
            version, server_ms = raw["version"], raw["server_time_ms"]
        except (ValueError, TypeError, KeyError):
            return None
        if type(version) is int and type(server_ms) is int and version >= 1 and server_ms >= 0:
            return version, server_ms
        return None
    return None
