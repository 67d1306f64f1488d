"""The server side of the sync protocol as a pure state machine (no sockets, no clock).

The server's WebSocket endpoint feeds each received frame to
:meth:`ServerProtocol.receive_data` and acts on the events (authenticate the HELLO, bind a
file, integrate an upload, ...), then answers through :meth:`~ServerProtocol.welcome`,
:meth:`~ServerProtocol.download` and friends and writes out
:meth:`~ServerProtocol.data_to_send`. A client that breaks the protocol makes
``receive_data`` raise a :class:`~tidesync.errors.RemoteProtocolError` carrying the code to
report: :meth:`~ServerProtocol.error_for` queues the matching ERROR. The methods refuse
(:class:`~tidesync.errors.LocalProtocolError`) to send anything the client would reject, so
a server bug shows up here and not as a confused client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from ..errors import LocalProtocolError, RemoteProtocolError, SyncAction
from . import messages as m
from .codec import decode_frame, encode_frame, encode_message, frame_of_body
from .messages import (
    DEFAULT_COMPRESSION_THRESHOLD,
    DEFAULT_MAX_ASSEMBLED_BYTES,
    DEFAULT_MAX_FRAME_SIZE,
    DownloadChangeset,
    DownloadProgress,
    ErrorCode,
    PingReceived,
    PongReceived,
    ProtocolViolationError,
    UploadChangeset,
    changeset_size,
    download_violation,
    error_code_of,
    is_connection_level_code,
    is_session_level_code,
    session_of,
)
from .messages import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS  # the versions we speak
from .parts import PartAssembler, PartOrderError, group_by_size, part_size_for, split_parts


def _object_size(update: m.ObjectUpdate) -> int:
    """About the bytes an object update takes in a DOWNLOAD (for splitting one)."""
    key = update.pk if isinstance(update.pk, str | bytes) else b""
    return len(update.state or b"") + len(update.model) + len(key)


class ServerState(Enum):
    """Where the connection is, as the server sees it."""

    AWAITING_HELLO = "awaiting_hello"
    HELLO_RECEIVED = "hello_received"  # the shell must answer welcome() or error()
    OPEN = "open"
    FAILED = "failed"  # the client broke the protocol; only error() is left to do
    CLOSED = "closed"  # a connection-level ERROR was sent


class ServerSessionState(Enum):
    """Where one session is, as the server sees it."""

    BINDING = "binding"  # BIND received; the shell must answer bound() or error()
    BOUND = "bound"
    SUSPENDED = "suspended"  # a session ERROR was sent; waiting for UNBIND
    UNBINDING = "unbinding"  # UNBIND received; the shell must answer unbound()


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """A client said HELLO; ``protocol_version`` is the one negotiated."""

    versions: list[int]
    token: str
    compression: bool
    protocol_version: int


@dataclass(frozen=True, slots=True)
class RefreshReceived:
    """The client replaced its access token."""

    token: str


@dataclass(frozen=True, slots=True)
class BindReceived:
    """The client wants to sync a file; answer with bound() or error(session=...)."""

    session: int
    file_ident: str
    schema: list[dict[str, Any]]
    download_cursor: int
    upload_acked: int
    #: Flexible sync: nothing is downloaded before the session's first QUERY.
    flexible: bool = False


@dataclass(frozen=True, slots=True)
class UnbindReceived:
    """The client ends a session; answer with unbound()."""

    session: int


@dataclass(frozen=True, slots=True)
class UploadReceived:
    """Changesets to store and integrate (versions checked to be increasing)."""

    session: int
    changesets: list[UploadChangeset]
    download_cursor: int
    #: Versions (-> their size) of changesets sent in parts that passed the limit on one
    #: changeset: their parts were dropped as they came, ``changesets`` holds each with
    #: empty instructions, and the shell refuses it (ERROR 232).
    oversized: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes uploaded, in :func:`changeset_size` units."""
        return sum(changeset_size(cs) for cs in self.changesets)


@dataclass(frozen=True, slots=True)
class MarkReceived:
    """Answer with mark_reply() once every DOWNLOAD up to the current version is sent."""

    session: int
    request_id: int


@dataclass(frozen=True, slots=True)
class QueryReceived:
    """A new subscription set for the session (flexible sync)."""

    session: int
    query_version: int
    queries: dict[str, list[str]]
    #: Per model, each query's arguments (parallel to ``queries``).
    args: dict[str, list[list[Any]]] = field(default_factory=dict)
    #: The device says it holds this set's complete bootstrap (see ``Query.bootstrapped``).
    bootstrapped: bool = False


#: Anything :meth:`ServerProtocol.receive_data` returns.
ServerEvent = (
    HelloReceived
    | RefreshReceived
    | BindReceived
    | UnbindReceived
    | UploadReceived
    | MarkReceived
    | QueryReceived
    | PingReceived
    | PongReceived
)


def negotiate_version(offered: Sequence[int], supported: Sequence[int]) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(supported)
    return max(common) if common else None


@dataclass(slots=True)
class _Session:
    state: ServerSessionState
    file_ident: str
    client_cursor: int  # last download_cursor the client reported
    client_upload_acked: int  # what the client said at BIND
    sent_cursor: int = 0
    latest: int = 0
    sent_upload_acked: int = 0
    last_upload: int = 0  # highest client version received
    query_version: int = 0
    marks: set[int] = field(default_factory=set)
    error_owed: bool = False  # receive_data found a violation; error() is expected
    parts: PartAssembler | None = None  # an uploaded changeset arriving in parts (v3)


class ServerProtocol:
    """Sans-I/O server state machine for one client connection (many sessions)."""

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        compression_threshold: int = DEFAULT_COMPRESSION_THRESHOLD,
        supported_versions: Sequence[int] = SUPPORTED_VERSIONS,
        max_changeset_bytes: int = DEFAULT_MAX_ASSEMBLED_BYTES,
    ) -> None:
        """``max_frame_size`` bounds frames both ways and is announced in WELCOME;
        ``max_changeset_bytes`` bounds one uploaded changeset joined from parts (the parts
        of a larger one are dropped as they come: see ``UploadReceived.oversized``)."""
        self.max_frame_size = max_frame_size
        self.max_changeset_bytes = max_changeset_bytes
        self.compression_threshold = compression_threshold
        self.supported_versions = tuple(supported_versions)
        self.state = ServerState.AWAITING_HELLO
        self.protocol_version: int | None = None
        self._compression = False
        self._sessions: dict[int, _Session] = {}
        self._pings: set[int] = set()
        self._outgoing: list[bytes] = []

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, frame: bytes) -> list[ServerEvent]:
        """Decode and check one frame from the client; return what happened.

        Raises a :class:`~tidesync.errors.RemoteProtocolError` subclass if the client broke
        the protocol; pass it to :meth:`error_for` to queue the ERROR to send.
        """
        if self.state in (ServerState.FAILED, ServerState.CLOSED):
            raise LocalProtocolError(f"connection is {self.state.value}")
        try:
            msg = decode_frame(
                frame, max_frame_size=self.max_frame_size, allow_compressed=self._compression
            )
            if msg.TYPE not in m.CLIENT_MESSAGE_TYPES:
                raise ProtocolViolationError(
                    ErrorCode.UNKNOWN_MESSAGE, f"{msg.TYPE.name} is not a client message"
                )
            return self._handle(msg)
        except ProtocolViolationError as exc:
            owed = self._sessions.get(exc.session) if exc.session is not None else None
            if owed is not None and is_session_level_code(exc.code):
                owed.error_owed = True
            else:
                self.state = ServerState.FAILED
            raise
        except RemoteProtocolError:
            self.state = ServerState.FAILED
            raise

    def _handle(self, msg: m.Message) -> list[ServerEvent]:
        if self.state is ServerState.AWAITING_HELLO:
            if not isinstance(msg, m.Hello):
                raise ProtocolViolationError(
                    ErrorCode.BAD_MESSAGE_ORDER, f"{msg.TYPE.name} before HELLO"
                )
            return self._on_hello(msg)
        if self.state is ServerState.HELLO_RECEIVED:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER, f"{msg.TYPE.name} before WELCOME"
            )
        match msg:
            case m.Hello():
                raise ProtocolViolationError(ErrorCode.BAD_MESSAGE_ORDER, "second HELLO")
            case m.Refresh():
                return [RefreshReceived(msg.token)]
            case m.Bind():
                return self._on_bind(msg)
            case m.Unbind():
                state = self._known(msg.session, "UNBIND")
                if state.state is ServerSessionState.UNBINDING:
                    raise ProtocolViolationError(
                        ErrorCode.BAD_MESSAGE_ORDER, f"second UNBIND of session {msg.session}"
                    )
                state.state = ServerSessionState.UNBINDING
                return [UnbindReceived(msg.session)]
            case m.Upload():
                return self._on_upload(msg)
            case m.Mark():
                state_or_none = self._active(msg.session, "MARK")
                if state_or_none is None:
                    return []
                state_or_none.marks.add(msg.request_id)
                return [MarkReceived(msg.session, msg.request_id)]
            case m.Query():
                return self._on_query(msg)
            case m.Ping():
                self._send(m.Pong(msg.timestamp_ms))
                return [PingReceived(msg.timestamp_ms)]
            case m.Pong():
                if msg.timestamp_ms not in self._pings:
                    raise ProtocolViolationError(
                        ErrorCode.BAD_MESSAGE_ORDER, f"PONG {msg.timestamp_ms} for no PING"
                    )
                self._pings.discard(msg.timestamp_ms)
                return [PongReceived(msg.timestamp_ms)]
        raise ProtocolViolationError(ErrorCode.UNKNOWN_MESSAGE, f"unexpected {msg.TYPE.name}")

    def _on_hello(self, msg: m.Hello) -> list[ServerEvent]:
        version = negotiate_version(msg.protocol_versions, self.supported_versions)
        if version is None:
            raise ProtocolViolationError(
                ErrorCode.WRONG_PROTOCOL_VERSION,
                f"no common protocol version: client speaks {msg.protocol_versions}, "
                f"server {list(self.supported_versions)}",
            )
        self.state = ServerState.HELLO_RECEIVED
        self.protocol_version = version
        self._compression = msg.compression
        return [HelloReceived(msg.protocol_versions, msg.token, msg.compression, version)]

    def _on_bind(self, msg: m.Bind) -> list[ServerEvent]:
        if msg.session in self._sessions:
            raise ProtocolViolationError(
                ErrorCode.REUSE_OF_SESSION_IDENT, f"session {msg.session} is already in use"
            )
        for number, other in self._sessions.items():
            if other.file_ident == msg.file_ident:
                raise ProtocolViolationError(
                    ErrorCode.BOUND_IN_OTHER_SESSION,
                    f"file {msg.file_ident!r} is already bound in session {number}",
                )
        self._sessions[msg.session] = _Session(
            state=ServerSessionState.BINDING,
            file_ident=msg.file_ident,
            client_cursor=msg.download_cursor,
            client_upload_acked=msg.upload_acked,
            sent_cursor=msg.download_cursor,
            last_upload=msg.upload_acked,
        )
        return [
            BindReceived(
                msg.session,
                msg.file_ident,
                msg.schema,
                msg.download_cursor,
                msg.upload_acked,
                msg.flexible,
            )
        ]

    def _on_upload(self, msg: m.Upload) -> list[ServerEvent]:
        state = self._active(msg.session, "UPLOAD")
        if state is None:
            return []
        parts, oversized = state.parts, None
        if (parts is not None and parts.pending) or (msg.changesets and msg.changesets[-1].more):
            joined = self._assemble(state, msg)
            if joined is None:
                return []  # a part: nothing happens until the changeset is whole
            msg, oversized = joined
        previous = state.last_upload
        for cs in msg.changesets:
            if cs.version <= previous:
                raise ProtocolViolationError(
                    ErrorCode.BAD_CHANGESET,
                    f"upload version {cs.version} is not above {previous}",
                    msg.session,
                )
            previous = cs.version
        if not state.client_cursor <= msg.download_cursor <= state.sent_cursor:
            raise ProtocolViolationError(
                ErrorCode.BAD_SERVER_VERSION,
                f"download_cursor {msg.download_cursor} outside "
                f"[{state.client_cursor}, {state.sent_cursor}]",
                msg.session,
            )
        state.last_upload = previous
        state.client_cursor = msg.download_cursor
        if oversized:
            return [UploadReceived(msg.session, msg.changesets, msg.download_cursor, oversized)]
        return [UploadReceived(msg.session, msg.changesets, msg.download_cursor)]

    def _assemble(
        self, state: _Session, msg: m.Upload
    ) -> tuple[m.Upload, dict[int, int] | None] | None:
        """Take one UPLOAD of a changeset sent in parts: None for a part that more follow,
        else the UPLOAD with the whole changeset in place of its last part (and, if it
        passed ``max_changeset_bytes``, its version and size)."""
        parts = state.parts
        if parts is None:
            parts = state.parts = PartAssembler(self.max_changeset_bytes, discard_over_limit=True)
        first = msg.changesets[0] if msg.changesets else None
        if first is None or any(cs.more for cs in msg.changesets[1:]):
            raise ProtocolViolationError(
                ErrorCode.BAD_CHANGESET,
                "a changeset part must be the only changeset of its UPLOAD, and the part "
                "after it must come first in the next",
                msg.session,
            )
        if not parts.pending and first.version <= state.last_upload:
            raise ProtocolViolationError(
                ErrorCode.BAD_CHANGESET,
                f"upload version {first.version} is not above {state.last_upload}",
                msg.session,
            )
        try:
            whole = parts.add(first.version, first.instructions, first.more)
        except PartOrderError as exc:
            raise ProtocolViolationError(ErrorCode.BAD_CHANGESET, str(exc), msg.session) from exc
        if whole is None:
            return None
        oversized = {first.version: parts.overflow} if parts.overflow is not None else None
        joined = UploadChangeset(first.version, whole)
        return replace(msg, changesets=[joined, *msg.changesets[1:]]), oversized

    def _on_query(self, msg: m.Query) -> list[ServerEvent]:
        state = self._active(msg.session, "QUERY")
        if state is None:
            return []
        if msg.query_version <= state.query_version:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER,
                f"query_version {msg.query_version} is not above {state.query_version}",
                msg.session,
            )
        state.query_version = msg.query_version
        return [
            QueryReceived(msg.session, msg.query_version, msg.queries, msg.args, msg.bootstrapped)
        ]

    def _known(self, session: int, what: str) -> _Session:
        state = self._sessions.get(session)
        if state is None:
            raise ProtocolViolationError(
                ErrorCode.BAD_SESSION_IDENT, f"{what} for unknown session {session}"
            )
        return state

    def _active(self, session: int, what: str) -> _Session | None:
        """The bound session; None if suspended (the client had not seen the ERROR yet)."""
        state = self._known(session, what)
        if state.state is ServerSessionState.SUSPENDED or state.error_owed:
            return None
        if state.state is not ServerSessionState.BOUND:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER,
                f"{what} for session {session} in state {state.state.value}",
            )
        return state

    # -- sending ------------------------------------------------------------------------

    def welcome(self, server_time_ms: int, connection_id: str) -> None:
        """Accept the HELLO: queue WELCOME with the negotiated version and frame limit."""
        if self.state is not ServerState.HELLO_RECEIVED or self.protocol_version is None:
            raise LocalProtocolError(f"welcome() in state {self.state.value}")
        self._send(
            m.Welcome(self.protocol_version, self.max_frame_size, server_time_ms, connection_id)
        )
        self.state = ServerState.OPEN

    def bound(self, session: int, server_version: int, upload_acked: int) -> None:
        """Accept a BIND: the latest server version and the last upload integrated."""
        state = self._own(session, ServerSessionState.BINDING)
        if server_version < state.sent_cursor:
            raise LocalProtocolError(
                f"server_version {server_version} is behind the client's cursor "
                f"{state.sent_cursor}: send BAD_SERVER_VERSION instead"
            )
        if upload_acked < state.client_upload_acked:
            raise LocalProtocolError(
                f"upload_acked {upload_acked} is behind what the client knows "
                f"({state.client_upload_acked}): send CLIENT_RESET_NEEDED instead"
            )
        self._send(m.Bound(session, server_version, upload_acked))
        state.state = ServerSessionState.BOUND
        state.latest = server_version
        state.sent_upload_acked = upload_acked
        state.last_upload = max(state.last_upload, upload_acked)

    def unbound(self, session: int) -> None:
        """Answer an UNBIND; the session number is free again."""
        self._own(session, ServerSessionState.UNBINDING)
        self._send(m.Unbound(session))
        del self._sessions[session]

    def download(
        self,
        session: int,
        changesets: Sequence[DownloadChangeset],
        cursor: int,
        latest_server_version: int,
        downloadable_bytes: int,
        upload_acked: int,
        query_version: int = 0,
        objects: Sequence[m.ObjectUpdate] = (),
        bootstrap: int = m.BOOTSTRAP_NONE,
        rows: Sequence[m.ObjectRows] = (),
    ) -> None:
        """Queue DOWNLOAD (an empty one acknowledges uploads up to ``upload_acked``);
        ``objects``, ``bootstrap`` and ``rows`` carry flexible sync's whole objects and
        pages."""
        state = self._own(session, ServerSessionState.BOUND)
        if downloadable_bytes < 0:
            raise LocalProtocolError("downloadable_bytes must not be negative")
        msg = m.Download(
            session,
            list(changesets),
            cursor,
            latest_server_version,
            downloadable_bytes,
            upload_acked,
            query_version,
            list(objects),
            bootstrap,
            list(rows),
        )
        before = DownloadProgress(
            cursor=state.sent_cursor,
            latest_server_version=state.latest,
            upload_acked=state.sent_upload_acked,
            upload_limit=state.last_upload,
            own_origin=state.file_ident,
            query_version=state.query_version,
        )
        problem = download_violation(msg, before)
        if problem is not None:
            raise LocalProtocolError(f"invalid DOWNLOAD for session {session}: {problem[1]}")
        frame, size = self._sized_frame(msg)
        if size <= self.max_frame_size:
            self._outgoing.append(frame)
        else:  # the one size comparison the usual download pays for parts
            self._outgoing.extend(self._split_download(msg))
        state.sent_cursor = cursor
        state.latest = latest_server_version
        state.sent_upload_acked = upload_acked

    def _split_download(self, msg: m.Download) -> list[bytes]:
        """The frames of a DOWNLOAD too large for one (protocol v3): a run of DOWNLOADs,
        each but the last marked ``continued``, that the device joins into one and applies
        in one transaction. Changesets go first (runs that fit, one larger than a frame as
        parts, each alone in its DOWNLOAD), then objects; the last DOWNLOAD carries the
        rows and the bootstrap mark. Every DOWNLOAD repeats the message's cursors."""
        limit = self.max_frame_size
        if (self.protocol_version or 0) < m.PARTS_VERSION:
            raise LocalProtocolError(
                f"a DOWNLOAD of more than {limit} bytes needs protocol version "
                f"{m.PARTS_VERSION}; the client speaks {self.protocol_version}"
            )
        budget = part_size_for(limit)
        base = replace(msg, changesets=[], objects=[], rows=[], bootstrap=0, continued=True)
        heads: list[m.Download] = []
        changesets = msg.changesets
        for start, stop in group_by_size([len(cs.instructions) for cs in changesets], budget):
            run = changesets[start:stop]
            cs = run[0]
            pieces = split_parts(cs.instructions, budget) if len(run) == 1 else []
            if len(pieces) > 1:
                last = len(pieces) - 1
                for i, piece in enumerate(pieces):
                    part = DownloadChangeset(
                        cs.server_version, cs.origin, cs.client_version, piece, more=i < last
                    )
                    heads.append(replace(base, changesets=[part]))
            else:
                heads.append(replace(base, changesets=run))
        objects = msg.objects
        for start, stop in group_by_size([_object_size(o) for o in objects], budget):
            heads.append(replace(base, objects=objects[start:stop]))
        if heads and not msg.rows:
            heads[-1] = replace(heads[-1], bootstrap=msg.bootstrap, continued=False)
        else:
            heads.append(replace(msg, changesets=[], objects=[]))
        frames: list[bytes] = []
        for head in heads:
            frame, size = self._sized_frame(head)
            if size > limit:  # one object or row block larger than a frame: not split
                raise LocalProtocolError(
                    f"DOWNLOAD of {size} bytes exceeds the frame limit {limit}"
                )
            frames.append(frame)
        return frames

    def mark_reply(self, session: int, request_id: int, server_version: int) -> None:
        """Answer a MARK: every DOWNLOAD up to ``server_version`` has been queued."""
        state = self._own(session, ServerSessionState.BOUND)
        if request_id not in state.marks:
            raise LocalProtocolError(f"no MARK {request_id} pending on session {session}")
        if server_version > state.sent_cursor:
            raise LocalProtocolError(
                f"MARK reply at {server_version} before downloading past {state.sent_cursor}"
            )
        self._send(m.MarkReply(session, request_id, server_version))
        state.marks.discard(request_id)

    def query_error(self, session: int, query_version: int, message: str) -> None:
        """Refuse subscription set ``query_version``."""
        state = self._own(session, ServerSessionState.BOUND)
        if not 1 <= query_version <= state.query_version:
            raise LocalProtocolError(f"query version {query_version} was never received")
        self._send(m.QueryError(session, query_version, message))

    def error(
        self,
        code: ErrorCode | int,
        message: str,
        *,
        action: SyncAction | None = None,
        retry_delay_ms: int | None = None,
        session: int | None = None,
    ) -> None:
        """Queue ERROR. A connection-level code ends the connection (close it after
        sending); a session-level one suspends the session until the client unbinds,
        except a compensating write and a refused changeset (``NON_SUSPENDING_CODES``)."""
        if self.state is ServerState.CLOSED:
            raise LocalProtocolError("the connection is closed")
        if action is None:
            try:
                action = ErrorCode(code).default_action
            except ValueError:
                action = SyncAction.RETRY
        if is_connection_level_code(code):
            if session is not None:
                raise LocalProtocolError(f"code {code} is connection-level; give no session")
            self._send(m.Error(int(code), message, action, retry_delay_ms, None))
            self.state = ServerState.CLOSED
            return
        if not is_session_level_code(code) or session is None:
            raise LocalProtocolError(f"code {code} needs a session (session-level: 200-299)")
        if self.state is not ServerState.OPEN:
            raise LocalProtocolError(f"session error in state {self.state.value}")
        state = self._sessions.get(session)
        if state is None or (state.state is ServerSessionState.SUSPENDED and not state.error_owed):
            raise LocalProtocolError(f"session {session} is not bound or already failed")
        if state.state is ServerSessionState.UNBINDING:
            raise LocalProtocolError(f"session {session} is unbinding; answer unbound()")
        self._send(m.Error(int(code), message, action, retry_delay_ms, session))
        state.error_owed = False
        if code not in m.NON_SUSPENDING_CODES:
            state.state = ServerSessionState.SUSPENDED

    def error_for(self, exc: RemoteProtocolError) -> None:
        """Queue the ERROR that reports a violation raised by :meth:`receive_data`."""
        code = error_code_of(exc)
        session = session_of(exc) if is_session_level_code(code) else None
        reason = getattr(exc, "reason", None) or str(exc)
        self.error(code, reason, session=session)

    def ping(self, now_ms: int) -> None:
        """Queue PING carrying ``now_ms``."""
        if self.state is not ServerState.OPEN:
            raise LocalProtocolError(f"ping() in state {self.state.value}")
        self._send(m.Ping(now_ms))
        self._pings.add(now_ms)

    def data_to_send(self) -> list[bytes]:
        """Frames to write, in order; the queue is emptied."""
        out, self._outgoing = self._outgoing, []
        return out

    def is_bound(self, session: int) -> bool:
        """True if ``session`` is bound and may receive DOWNLOAD / MARK replies."""
        if self.state is not ServerState.OPEN:
            return False
        state = self._sessions.get(session)
        return state is not None and state.state is ServerSessionState.BOUND

    # -- helpers ------------------------------------------------------------------------

    def _own(self, session: int, expected: ServerSessionState) -> _Session:
        if self.state is not ServerState.OPEN:
            raise LocalProtocolError(f"connection is {self.state.value}, not open")
        state = self._sessions.get(session)
        if state is None:
            raise LocalProtocolError(f"no session {session}")
        if state.state is not expected:
            raise LocalProtocolError(
                f"session {session} is {state.state.value}, not {expected.value}"
            )
        return state

    def _frame(self, msg: m.Message) -> bytes:
        return encode_frame(msg, compress=self._compression, threshold=self.compression_threshold)

    def _sized_frame(self, msg: m.Message) -> tuple[bytes, int]:
        """The frame of ``msg`` and its uncompressed size (what the frame limit bounds)."""
        body = encode_message(msg)
        frame = frame_of_body(
            body, compress=self._compression, threshold=self.compression_threshold
        )
        return frame, len(body)

    def _send(self, msg: m.Message) -> None:
        self._outgoing.append(self._frame(msg))
