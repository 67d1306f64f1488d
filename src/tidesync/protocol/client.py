"""The client side of the sync protocol as a pure state machine (no sockets, no clock).

The sync client's connection task feeds received frames to :meth:`ClientProtocol.receive_data`
and acts on the events it returns; it calls :meth:`~ClientProtocol.bind`,
:meth:`~ClientProtocol.upload` and friends to say what to send, and writes out whatever
:meth:`~ClientProtocol.data_to_send` returns. Everything the server sends is checked here
(order, sessions, cursors, acknowledgements), so a misbehaving server becomes a
:class:`~tidesync.protocol.messages.ProtocolViolationError` that ends the connection, never
a corrupt local database. Misusing this object raises :class:`~tidesync.errors.LocalProtocolError`.
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
    MAX_INT,
    DownloadChangeset,
    DownloadProgress,
    ErrorCode,
    PingReceived,
    PongReceived,
    ProtocolViolationError,
    UploadChangeset,
    changeset_size,
    download_violation,
)
from .parts import (
    PartOrderError,
    PartsTooLargeError,
    group_by_size,
    join_download_parts,
    part_size_for,
    split_parts,
)


class ClientState(Enum):
    """Where the connection is."""

    IDLE = "idle"  # start() not called
    HELLO_SENT = "hello_sent"  # waiting for WELCOME
    OPEN = "open"
    CLOSED = "closed"  # connection-level ERROR received, or the server broke the protocol


class BindingState(Enum):
    """Where one session number is on the connection, as the client sees it (the wire's
    view; the file's own session phase is protocol/session.py's SessionPhase)."""

    BINDING = "binding"  # BIND sent, waiting for BOUND
    BOUND = "bound"
    SUSPENDED = "suspended"  # a session ERROR arrived; only unbind() is allowed
    UNBINDING = "unbinding"  # UNBIND sent, waiting for UNBOUND


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The server accepted HELLO."""

    protocol_version: int
    max_frame_size: int
    server_time_ms: int
    connection_id: str


@dataclass(frozen=True, slots=True)
class SessionBound:
    """The server bound a session: its latest version and the last upload it integrated."""

    session: int
    server_version: int
    upload_acked: int


@dataclass(frozen=True, slots=True)
class SessionUnbound:
    """The server confirmed UNBIND; the session number is free again."""

    session: int


@dataclass(frozen=True, slots=True)
class DownloadReceived:
    """A checked DOWNLOAD: changesets to integrate, then the cursors to persist with them."""

    session: int
    changesets: list[DownloadChangeset]
    cursor: int
    latest_server_version: int
    downloadable_bytes: int
    upload_acked: int
    query_version: int
    #: Whole objects and evictions (flexible sync), applied after ``changesets``.
    objects: list[m.ObjectUpdate] = field(default_factory=list)
    #: ``m.BOOTSTRAP_NONE`` / ``BOOTSTRAP_PAGE`` / ``BOOTSTRAP_LAST``.
    bootstrap: int = 0
    #: New objects as rows (flexible sync's bootstrap), applied before ``objects``.
    rows: list[m.ObjectRows] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes in this batch, in :func:`changeset_size` units (whole objects count their
        state bytes, rows the bytes of the states they stand for)."""
        return (
            sum(changeset_size(cs) for cs in self.changesets)
            + sum(len(o.state) for o in self.objects if o.state is not None)
            + sum(block.size for block in self.rows)
        )


@dataclass(frozen=True, slots=True)
class MarkReplied:
    """The server has sent every DOWNLOAD up to ``server_version`` for this MARK."""

    session: int
    request_id: int
    server_version: int


@dataclass(frozen=True, slots=True)
class QueryErrorReceived:
    """The server refused the subscription set ``query_version``."""

    session: int
    query_version: int
    message: str


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The server reported an error (``session`` None: the connection is over)."""

    code: int
    message: str
    action: SyncAction
    retry_delay_ms: int | None
    session: int | None

    @property
    def error_code(self) -> ErrorCode | None:
        """The code as an :class:`ErrorCode`, or None if this version does not know it."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


#: Anything :meth:`ClientProtocol.receive_data` returns.
ClientEvent = (
    Welcomed
    | SessionBound
    | SessionUnbound
    | DownloadReceived
    | MarkReplied
    | QueryErrorReceived
    | ErrorReceived
    | PingReceived
    | PongReceived
)


@dataclass(frozen=True, slots=True)
class SessionProgress:
    """A snapshot of one session's cursors, for the sync client's bookkeeping."""

    session: int
    state: BindingState
    download_cursor: int
    latest_server_version: int
    upload_acked: int
    last_uploaded: int


@dataclass(slots=True)
class _Session:
    state: BindingState
    file_ident: str
    cursor: int  # last server version received (or the one given to bind)
    reported_cursor: int  # last download_cursor sent to the server
    latest: int = 0
    upload_acked: int = 0
    upload_limit: int | None = None  # highest ack the server may send
    last_uploaded: int = 0
    query_version: int = 0
    marks: set[int] = field(default_factory=set)
    pending: list[m.Download] | None = None  # a split DOWNLOAD's first messages (v3)
    pending_bytes: int = 0


class ClientProtocol:
    """Sans-I/O client state machine for one connection (many sessions)."""

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        compression_threshold: int = DEFAULT_COMPRESSION_THRESHOLD,
        max_assembled_bytes: int = DEFAULT_MAX_ASSEMBLED_BYTES,
    ) -> None:
        """``max_frame_size`` bounds received frames; the server's WELCOME bounds sent ones.
        ``max_assembled_bytes`` bounds one downloaded changeset joined from parts."""
        self.max_frame_size = max_frame_size
        self.max_assembled_bytes = max_assembled_bytes
        self.compression_threshold = compression_threshold
        self.state = ClientState.IDLE
        self.protocol_version: int | None = None
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self._offered: tuple[int, ...] = ()
        self._compression = False
        self._sessions: dict[int, _Session] = {}
        self._next_request_id = 1
        self._pings: set[int] = set()
        self._outgoing: list[bytes] = []

    # -- sending ------------------------------------------------------------------------

    def start(
        self, token: str, versions: Sequence[int] = m.SUPPORTED_VERSIONS, compression: bool = True
    ) -> None:
        """Queue HELLO, the connection's first frame."""
        if self.state is not ClientState.IDLE:
            raise LocalProtocolError("start() was already called")
        offered = tuple(versions)
        if not offered or any(v < 1 for v in offered):
            raise LocalProtocolError("versions must be a non-empty list of positive ints")
        self._offered = offered
        # HELLO itself is never compressed: the server does not know yet that we can.
        self._outgoing.append(encode_frame(m.Hello(list(offered), token, compression)))
        self._compression = compression
        self.state = ClientState.HELLO_SENT

    def refresh(self, token: str) -> None:
        """Queue REFRESH: a new access token for this connection."""
        self._require_open()
        self._send(m.Refresh(token))

    def bind(
        self,
        session: int,
        file_ident: str,
        schema: list[dict[str, Any]],
        download_cursor: int,
        upload_acked: int,
        *,
        local_version: int | None = None,
        flexible: bool = False,
    ) -> None:
        """Queue BIND for a local file (``schema`` holds ``ModelSchema.to_dict()`` values).

        ``local_version``, the newest version in the local file, lets the client refuse a
        BOUND that acknowledges versions the file never had.
        """
        self._require_open()
        if not 1 <= session <= MAX_INT:
            raise LocalProtocolError(f"session number {session} is out of range")
        if session in self._sessions:
            raise LocalProtocolError(f"session {session} is already in use")
        if not file_ident:
            raise LocalProtocolError("file_ident must not be empty")
        if any(s.file_ident == file_ident for s in self._sessions.values()):
            raise LocalProtocolError(f"file {file_ident!r} is already bound on this connection")
        if download_cursor < 0 or upload_acked < 0:
            raise LocalProtocolError("cursors must not be negative")
        self._send(
            m.Bind(session, file_ident, list(schema), download_cursor, upload_acked, flexible)
        )
        self._sessions[session] = _Session(
            state=BindingState.BINDING,
            file_ident=file_ident,
            cursor=download_cursor,
            reported_cursor=download_cursor,
            upload_acked=upload_acked,
            upload_limit=local_version,
        )

    def unbind(self, session: int) -> None:
        """Queue UNBIND; the session ends when UNBOUND arrives."""
        self._require_open()
        state = self._session(session)
        if state.state is BindingState.UNBINDING:
            raise LocalProtocolError(f"session {session} is already unbinding")
        self._send(m.Unbind(session))
        state.state = BindingState.UNBINDING

    def upload(
        self, session: int, changesets: Sequence[UploadChangeset], download_cursor: int
    ) -> None:
        """Queue UPLOAD: changesets in strictly increasing versions, above any sent before.

        ``download_cursor`` is the last server version integrated locally. What does not
        fit the server's frame limit is sent in several UPLOADs, a changeset larger than a
        frame in parts (protocol v3, docs/protocol.md "Changeset parts"); with a v2 server
        that raises :class:`LocalProtocolError`.
        """
        state = self._bound(session)
        previous = max(state.last_uploaded, state.upload_acked)
        for cs in changesets:
            if cs.version <= previous:
                raise LocalProtocolError(
                    f"upload version {cs.version} is not above {previous} (session {session})"
                )
            previous = cs.version
        if not state.reported_cursor <= download_cursor <= state.cursor:
            raise LocalProtocolError(
                f"download_cursor {download_cursor} outside [{state.reported_cursor}, "
                f"{state.cursor}] (session {session})"
            )
        frame, size = self._sized_frame(m.Upload(session, list(changesets), download_cursor))
        if size <= self.peer_max_frame_size:
            self._outgoing.append(frame)
        else:  # the one size comparison the usual upload pays for parts
            self._outgoing.extend(self._split_upload(session, changesets, download_cursor))
        state.reported_cursor = download_cursor
        if changesets:
            state.last_uploaded = previous
            state.upload_limit = max(state.upload_limit or 0, previous, state.upload_acked)

    def _split_upload(
        self, session: int, changesets: Sequence[UploadChangeset], download_cursor: int
    ) -> list[bytes]:
        """The frames of an UPLOAD too large for one: runs of changesets that fit, and each
        changeset larger than a frame as parts, each part alone in its UPLOAD."""
        limit = self.peer_max_frame_size
        if (self.protocol_version or 0) < m.PARTS_VERSION:
            raise LocalProtocolError(
                f"an UPLOAD of more than {limit} bytes needs protocol version "
                f"{m.PARTS_VERSION}; the server speaks {self.protocol_version}"
            )
        budget = part_size_for(limit)
        frames: list[bytes] = []
        cs_list = list(changesets)
        for start, stop in group_by_size([len(cs.instructions) for cs in cs_list], budget):
            run = cs_list[start:stop]
            pieces = split_parts(run[0].instructions, budget) if len(run) == 1 else []
            if len(pieces) > 1:
                last = len(pieces) - 1
                run_msgs = [
                    m.Upload(
                        session,
                        [UploadChangeset(run[0].version, piece, more=i < last)],
                        download_cursor,
                    )
                    for i, piece in enumerate(pieces)
                ]
            else:
                run_msgs = [m.Upload(session, run, download_cursor)]
            for msg in run_msgs:
                frame, size = self._sized_frame(msg)
                if size > limit:  # cannot happen: parts leave room for the message
                    raise LocalProtocolError(f"an UPLOAD part of {size} bytes is too large")
                frames.append(frame)
        return frames

    def mark(self, session: int) -> int:
        """Queue MARK and return its request id (answered by :class:`MarkReplied`)."""
        state = self._bound(session)
        request_id = self._next_request_id
        self._next_request_id += 1
        self._send(m.Mark(session, request_id))
        state.marks.add(request_id)
        return request_id

    def query(
        self,
        session: int,
        query_version: int,
        queries: dict[str, list[str]],
        args: dict[str, list[list[Any]]] | None = None,
        bootstrapped: bool = False,
    ) -> None:
        """Queue QUERY: subscription set ``query_version`` (above any sent before);
        ``bootstrapped``: the device already holds this set's complete bootstrap."""
        state = self._bound(session)
        if query_version <= state.query_version:
            raise LocalProtocolError(
                f"query_version {query_version} is not above {state.query_version}"
            )
        self._send(
            m.Query(
                session,
                query_version,
                {k: list(v) for k, v in queries.items()},
                {k: [list(a) for a in v] for k, v in (args or {}).items()},
                bootstrapped,
            )
        )
        state.query_version = query_version

    def ping(self, now_ms: int) -> None:
        """Queue PING carrying ``now_ms``; the PONG comes back as :class:`PongReceived`."""
        self._require_open()
        self._send(m.Ping(now_ms))
        self._pings.add(now_ms)

    def data_to_send(self) -> list[bytes]:
        """Frames to write, in order; the queue is emptied."""
        out, self._outgoing = self._outgoing, []
        return out

    # -- inspecting ---------------------------------------------------------------------

    def progress(self, session: int) -> SessionProgress:
        """The session's cursors as last received."""
        state = self._session(session)
        return SessionProgress(
            session,
            state.state,
            state.cursor,
            state.latest,
            state.upload_acked,
            state.last_uploaded,
        )

    def has_session(self, session: int) -> bool:
        """True while ``session`` is in use (from bind() until UNBOUND)."""
        return session in self._sessions

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, frame: bytes) -> list[ClientEvent]:
        """Decode and check one frame from the server; return what happened.

        Raises a :class:`~tidesync.errors.RemoteProtocolError` subclass (read its code with
        :func:`~tidesync.protocol.messages.error_code_of`) if the server broke the protocol;
        the connection is then closed.
        """
        if self.state is ClientState.IDLE:
            raise LocalProtocolError("start() must be called before receiving data")
        try:
            if self.state is ClientState.CLOSED:
                raise ProtocolViolationError(
                    ErrorCode.BAD_MESSAGE_ORDER, "frame received after the connection ended"
                )
            msg = decode_frame(
                frame, max_frame_size=self.max_frame_size, allow_compressed=self._compression
            )
            if msg.TYPE not in m.SERVER_MESSAGE_TYPES:
                raise ProtocolViolationError(
                    ErrorCode.UNKNOWN_MESSAGE, f"{msg.TYPE.name} is not a server message"
                )
            return self._handle(msg)
        except RemoteProtocolError:
            self.state = ClientState.CLOSED
            raise

    def _handle(self, msg: m.Message) -> list[ClientEvent]:
        if self.state is ClientState.HELLO_SENT and not isinstance(msg, m.Welcome | m.Error):
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER, f"{msg.TYPE.name} before WELCOME"
            )
        match msg:
            case m.Welcome():
                return self._on_welcome(msg)
            case m.Error():
                return self._on_error(msg)
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
            case m.Bound():
                return self._on_bound(msg)
            case m.Unbound():
                return self._on_unbound(msg)
            case m.Download():
                return self._on_download(msg)
            case m.MarkReply():
                return self._on_mark_reply(msg)
            case m.QueryError():
                return self._on_query_error(msg)
        raise ProtocolViolationError(ErrorCode.UNKNOWN_MESSAGE, f"unexpected {msg.TYPE.name}")

    def _on_welcome(self, msg: m.Welcome) -> list[ClientEvent]:
        if self.state is not ClientState.HELLO_SENT:
            raise ProtocolViolationError(ErrorCode.BAD_MESSAGE_ORDER, "second WELCOME")
        if msg.protocol_version not in self._offered:
            raise ProtocolViolationError(
                ErrorCode.WRONG_PROTOCOL_VERSION,
                f"server chose version {msg.protocol_version}, offered {list(self._offered)}",
            )
        self.state = ClientState.OPEN
        self.protocol_version = msg.protocol_version
        self.peer_max_frame_size = msg.max_frame_size
        return [
            Welcomed(
                msg.protocol_version, msg.max_frame_size, msg.server_time_ms, msg.connection_id
            )
        ]

    def _on_error(self, msg: m.Error) -> list[ClientEvent]:
        event = ErrorReceived(msg.code, msg.message, msg.action, msg.retry_delay_ms, msg.session)
        if msg.session is None:
            self.state = ClientState.CLOSED
            return [event]
        if self.state is not ClientState.OPEN:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER, "session ERROR before WELCOME"
            )
        state = self._received_for(msg.session, "ERROR")
        if state.state is BindingState.SUSPENDED:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER,
                f"ERROR for session {msg.session}, already suspended",
                msg.session,
            )
        if state.state is not BindingState.UNBINDING and msg.code not in m.NON_SUSPENDING_CODES:
            state.state = BindingState.SUSPENDED
        return [event]

    def _on_bound(self, msg: m.Bound) -> list[ClientEvent]:
        state = self._received_for(msg.session, "BOUND")
        if state.state is BindingState.UNBINDING:
            return []
        if state.state is not BindingState.BINDING:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER, f"BOUND for bound session {msg.session}", msg.session
            )
        if msg.server_version < state.cursor:
            raise ProtocolViolationError(
                ErrorCode.BAD_SERVER_VERSION,
                f"server version {msg.server_version} is behind the client's cursor {state.cursor}",
                msg.session,
            )
        if msg.upload_acked < state.upload_acked or (
            state.upload_limit is not None and msg.upload_acked > state.upload_limit
        ):
            raise ProtocolViolationError(
                ErrorCode.BAD_SERVER_VERSION,
                f"upload_acked {msg.upload_acked} is impossible (known {state.upload_acked}, "
                f"local {state.upload_limit})",
                msg.session,
            )
        state.state = BindingState.BOUND
        state.latest = msg.server_version
        state.upload_acked = msg.upload_acked
        state.upload_limit = msg.upload_acked
        return [SessionBound(msg.session, msg.server_version, msg.upload_acked)]

    def _on_unbound(self, msg: m.Unbound) -> list[ClientEvent]:
        state = self._received_for(msg.session, "UNBOUND")
        if state.state is not BindingState.UNBINDING:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER, f"UNBOUND without UNBIND ({msg.session})", msg.session
            )
        del self._sessions[msg.session]
        return [SessionUnbound(msg.session)]

    def _on_download(self, msg: m.Download) -> list[ClientEvent]:
        state = self._active_for(msg.session, "DOWNLOAD")
        if state is None:
            return []
        if (
            msg.continued
            or state.pending is not None
            or (msg.changesets and msg.changesets[-1].more)
        ):
            joined = self._continue(state, msg)
            if joined is None:
                return []  # continued: nothing happens until the last DOWNLOAD of the run
            msg = joined
        before = DownloadProgress(
            cursor=state.cursor,
            latest_server_version=state.latest,
            upload_acked=state.upload_acked,
            upload_limit=state.upload_limit,
            own_origin=state.file_ident,
            query_version=state.query_version,
        )
        problem = download_violation(msg, before)
        if problem is not None:
            raise ProtocolViolationError(problem[0], problem[1], msg.session)
        state.cursor = msg.cursor
        state.latest = msg.latest_server_version
        state.upload_acked = msg.upload_acked
        return [
            DownloadReceived(
                msg.session,
                msg.changesets,
                msg.cursor,
                msg.latest_server_version,
                msg.downloadable_bytes,
                msg.upload_acked,
                msg.query_version,
                msg.objects,
                msg.bootstrap,
                msg.rows,
            )
        ]

    def _continue(self, state: _Session, msg: m.Download) -> m.Download | None:
        """Take one DOWNLOAD of a run the server split (protocol v3): None while the run
        is ``continued``, else one DOWNLOAD holding the whole run (changesets with their
        parts joined, objects, rows) with the last one's cursors, checked as any other."""
        pending = state.pending
        if pending is None:
            pending = state.pending = []
        pending.append(msg)
        state.pending_bytes += sum(len(cs.instructions) for cs in msg.changesets) + sum(
            len(o.state) for o in msg.objects if o.state is not None
        )
        if state.pending_bytes > self.max_assembled_bytes:
            raise ProtocolViolationError(
                ErrorCode.BAD_CHANGESET,
                f"a split DOWNLOAD passed {self.max_assembled_bytes} bytes",
                msg.session,
            )
        if msg.continued:
            return None
        state.pending, state.pending_bytes = None, 0
        changesets = [cs for part in pending for cs in part.changesets]
        try:
            whole = join_download_parts(changesets, self.max_assembled_bytes)
        except (PartOrderError, PartsTooLargeError) as exc:
            raise ProtocolViolationError(ErrorCode.BAD_CHANGESET, str(exc), msg.session) from exc
        if len(pending) == 1:
            return replace(msg, changesets=whole)
        return replace(
            msg,
            changesets=whole,
            objects=[o for part in pending for o in part.objects],
            rows=[r for part in pending for r in part.rows],
        )

    def _on_mark_reply(self, msg: m.MarkReply) -> list[ClientEvent]:
        state = self._active_for(msg.session, "MARK")
        if state is None:
            return []
        if msg.request_id not in state.marks:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER,
                f"MARK reply for unknown request {msg.request_id}",
                msg.session,
            )
        if msg.server_version > state.cursor:
            raise ProtocolViolationError(
                ErrorCode.BAD_SERVER_VERSION,
                f"MARK reply at version {msg.server_version} before downloading past "
                f"{state.cursor}",
                msg.session,
            )
        state.marks.discard(msg.request_id)
        return [MarkReplied(msg.session, msg.request_id, msg.server_version)]

    def _on_query_error(self, msg: m.QueryError) -> list[ClientEvent]:
        state = self._active_for(msg.session, "QUERY_ERROR")
        if state is None:
            return []
        if not 1 <= msg.query_version <= state.query_version:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER,
                f"QUERY_ERROR for query version {msg.query_version} never sent",
                msg.session,
            )
        return [QueryErrorReceived(msg.session, msg.query_version, msg.message)]

    # -- helpers ------------------------------------------------------------------------

    def _received_for(self, session: int, what: str) -> _Session:
        state = self._sessions.get(session)
        if state is None:
            raise ProtocolViolationError(
                ErrorCode.BAD_SESSION_IDENT, f"{what} for unknown session {session}", session
            )
        return state

    def _active_for(self, session: int, what: str) -> _Session | None:
        """The session if bound; None if unbinding (late message, dropped); else violation."""
        state = self._received_for(session, what)
        if state.state is BindingState.UNBINDING:
            return None
        if state.state is not BindingState.BOUND:
            raise ProtocolViolationError(
                ErrorCode.BAD_MESSAGE_ORDER,
                f"{what} for session {session} in state {state.state.value}",
                session,
            )
        return state

    def _require_open(self) -> None:
        if self.state is not ClientState.OPEN:
            raise LocalProtocolError(f"connection is {self.state.value}, not open")

    def _session(self, session: int) -> _Session:
        state = self._sessions.get(session)
        if state is None:
            raise LocalProtocolError(f"session {session} is not bound")
        return state

    def _bound(self, session: int) -> _Session:
        self._require_open()
        state = self._session(session)
        if state.state is not BindingState.BOUND:
            raise LocalProtocolError(f"session {session} is {state.state.value}, not bound")
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
