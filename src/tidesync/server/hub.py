"""Sync sessions, group commit and fan-out: the live part of the sync server.

One :class:`SyncHub` per server owns the storage's :class:`GroupCommitter` and every open
sync connection. Each connection (:class:`SyncConnection`) drives a sans-I/O
:class:`~tidesync.protocol.server.ServerProtocol` from its WebSocket: it authenticates the
HELLO, binds sessions, hands uploads to the committer and runs one *downloader* task per
session that pages the app's history to the client. When a commit integrates new server
versions the hub wakes every session of that app, on every connection, so each downloads
what it has not seen. The uploader's own changesets are never sent back to it.

Everything a client can get wrong ends in an ERROR frame with a clear message (and, for
connection-level codes, a close); tracebacks stay in the server log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any

from starlette.websockets import WebSocket

from ..core.changeset import Changeset
from ..core.packing import unpack_instructions
from ..core.schema import ModelSchema
from ..errors import (
    AuthError,
    LocalProtocolError,
    RemoteProtocolError,
    SchemaMismatchError,
    SyncAction,
)
from ..protocol.messages import (
    PARTS_VERSION,
    DownloadChangeset,
    ErrorCode,
    InvalidMessageError,
    PingReceived,
    PongReceived,
    clock_skew_message,
    error_code_of,
    is_session_level_code,
    refused_changesets_message,
    session_of,
)
from ..protocol.server import (
    BindReceived,
    HelloReceived,
    MarkReceived,
    QueryReceived,
    RefreshReceived,
    ServerEvent,
    ServerProtocol,
    ServerState,
    UnbindReceived,
    UploadReceived,
)
from ..support.gcpause import gc_paused
from . import flexsync, schemapin
from .auth import ACCESS, Authenticator, InvalidTokenError, TokenExpiredError, WrongAppError
from .config import ServerConfig
from .flexsync import FlexView
from .gate import open_frames
from .metrics import ServerMetrics
from .retention import HistoryTrimmer
from .rules import Permissions, user_fields
from .snapshot import (
    ACTIVE,
    AWAITING_HELLO,
    CONNECTED,
    DISCONNECTED,
    FAILED,
    RECENT_ENDED,
    UNBOUND,
    SessionSnapshot,
)
from .storage.base import (
    ClientOwnershipError,
    CursorAheadError,
    HistoryTrimmedError,
    ObjectKey,
    ServerStorage,
    StorageError,
    StorageFullError,
    UploadBatch,
    UploadResult,
)
from .users import LOGGED_OUT_REASON

log = logging.getLogger("tidesync.server.hub")

#: What a device is told when the server's storage is full (its upload was not stored).
DISK_FULL_MESSAGE = "the server's disk is full: the upload was not stored; try again later"

#: How many recently created objects the hub remembers per app (``SyncHub.recent_creates``),
#: from uploads that created at most ``RECENT_BATCH`` (interactive writes; a bulk upload
#: would only push the others out and cost more to remember than the reads it saves).
RECENT_CREATES = 50_000
RECENT_BATCH = 2_000

#: An instruction's HLC, an HLC's wall time (for the clock-skew bound of uploads).
_HLC, _WALL = itemgetter(3), itemgetter(0)

#: WebSocket close codes.
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR = 1000, 1001, 1002
CLOSE_POLICY_VIOLATION, CLOSE_TOO_BIG, CLOSE_INTERNAL_ERROR = 1008, 1009, 1011


class GroupCommitter:
    """One task that integrates uploads; those arriving during a commit share the next one.

    :meth:`submit` returns at once with a future for the batch's :class:`UploadResult`. A
    lone upload is committed immediately (there is no timer). ``on_commit`` is called with
    every committed group's batches and results, after their futures are resolved.
    """

    def __init__(
        self,
        storage: ServerStorage,
        on_commit: Callable[[list[UploadBatch], list[UploadResult]], None] | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._storage = storage
        self._on_commit = on_commit
        self._metrics = metrics or ServerMetrics()
        self._queue: list[tuple[UploadBatch, asyncio.Future[UploadResult]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: How many ``storage.integrate`` calls were made.
        self.commits = 0

    def start(self) -> None:
        """Start the committer task (call from the server's event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tidesync-group-committer")

    def submit(self, batch: UploadBatch) -> asyncio.Future[UploadResult]:
        """Queue a batch; the future resolves once its commit is durable (or failed)."""
        if self._closing or self._task is None:
            raise StorageError("the server is shutting down; the upload was not stored")
        future: asyncio.Future[UploadResult] = asyncio.get_running_loop().create_future()
        self._queue.append((batch, future))
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Commit everything queued, then stop the task."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            group, self._queue = self._queue, []
            batches = [batch for batch, _ in group]
            self.commits += 1
            started = time.perf_counter()
            try:
                results = await self._storage.integrate(batches)
            except Exception as exc:
                self._metrics.commit_failures_total += 1
                if isinstance(exc, StorageFullError):  # expected: one line, no traceback
                    log.warning("group commit of %d upload(s) refused: %s", len(batches), exc)
                else:
                    log.exception("group commit of %d upload(s) failed", len(batches))
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._metrics.commits_total += 1
            self._metrics.commit_seconds.observe(time.perf_counter() - started)
            self._metrics.upload_messages_total += len(batches)
            self._metrics.uploads_total += sum(len(r.server_versions) for r in results)
            for (_, future), result in zip(group, results):
                if not future.done():
                    future.set_result(result)
            if self._on_commit is not None:
                try:
                    self._on_commit(batches, results)
                except Exception:
                    log.exception("fan-out after a commit failed")


class _ConnectionGone(Exception):
    """The WebSocket can no longer be written to."""


@dataclass(eq=False)
class HubSession:
    """One bound session of a connection, and its downloader's bookkeeping."""

    number: int
    file_ident: str
    cursor: int  # last server version sent (or the client's cursor at BIND)
    latest: int  # latest_server_version last sent
    acked: int  # highest client version known integrated (what the next DOWNLOAD carries)
    sent_acked: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    marks: list[tuple[int, int]] = field(default_factory=list)  # (request id, version)
    query_version: int = 0
    sent_query_version: int = 0
    error: tuple[ErrorCode, str, SyncAction | None] | None = None
    active: bool = True
    first_sent: bool = False
    task: asyncio.Task[None] | None = None
    flex: FlexView | None = None  # flexible sync / rules (server/flexsync.py); None: all


class SyncHub:
    """Every sync connection of one server, the group committer and the fan-out."""

    def __init__(
        self,
        storage: ServerStorage,
        auth: Authenticator,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.auth = auth
        self.config = config
        self.clock = clock
        #: When this hub (the server process's sync service) was made, by ``clock``.
        self.started_at = clock()
        #: Counters for ``/metrics``.
        self.metrics = ServerMetrics()
        self.committer = GroupCommitter(storage, self._committed, self.metrics)
        self._connections: set[SyncConnection] = set()
        self._sessions: dict[str, set[HubSession]] = {}
        self._unwatch: dict[str, Callable[[], None]] = {}  # app -> stop watching storage
        #: Per app, the callbacks :meth:`listen` added (the change feed, webhooks).
        self._listeners: dict[str, set[Callable[[], None]]] = {}
        self._accepting = True
        #: The sessions that ended lately, newest last (the console shows them).
        self._ended: deque[SessionSnapshot] = deque(maxlen=RECENT_ENDED)
        #: Set when the server starts going away: long polls and event streams end.
        self.stopping = asyncio.Event()
        #: Per app, the objects recent uploads made with one CREATE alone (newest last, at
        #: most ``RECENT_CREATES`` per app): key -> the server version of that CREATE
        #: (``UploadResult.created``). Flexible sync sends such an object whole without
        #: reading it (``flexsync._filter_page``).
        self.recent_creates: dict[str, OrderedDict[ObjectKey, int]] = {}
        #: Flexible sync's memory of complete bootstraps: ``(app, device file) ->
        #: (bootstrap's target version, fingerprint)``, newest last (``flexsync._remember``).
        self.bootstraps: OrderedDict[tuple[str, str], tuple[int, tuple[Any, ...]]] = OrderedDict()
        #: Per app, the lock that makes a rule check and its commit one step
        #: (``flexsync.app_write_lock``).
        self.write_locks: dict[str, asyncio.Lock] = {}
        #: Trims history older than ``config.history_retention`` (None when off).
        self.trimmer: HistoryTrimmer | None = None
        if config.history_retention > 0:
            self.trimmer = HistoryTrimmer(storage, config.history_retention, clock)

    def start(self) -> None:
        """Start the committer and the history trimmer (call from the server's loop)."""
        self.committer.start()
        if self.trimmer is not None:
            self.trimmer.start()

    @property
    def connection_count(self) -> int:
        """How many sync connections are open."""
        return len(self._connections)

    async def handle(self, websocket: WebSocket, app_id: str) -> None:
        """Serve one sync WebSocket until it closes."""
        connection = SyncConnection(self, websocket, app_id)
        self._connections.add(connection)
        self.metrics.connections_total += 1
        try:
            await connection.run(going_away=not self._accepting)
        finally:
            self._connections.discard(connection)
            self.note_ended(connection.snapshot(DISCONNECTED))

    def note_ended(self, rows: list[SessionSnapshot]) -> None:
        """Remember ended sessions (rows without a session are dropped)."""
        self._ended.extend(r for r in rows if r.session is not None)

    def session_snapshot(self) -> list[SessionSnapshot]:
        """Every live device session, each connection without a bound session, then the
        sessions that ended lately whose device has no live session now (newest first).
        A copy, cheap enough to take every second with thousands of sessions."""
        rows = [row for c in list(self._connections) for row in c.snapshot()]
        seen = {(r.app_id, r.file_ident) for r in rows if r.file_ident}
        for row in reversed(self._ended):
            if (row.app_id, row.file_ident) not in seen:
                seen.add((row.app_id, row.file_ident))
                rows.append(row)
        return rows

    def notify(self, app_id: str, writers: frozenset[str] = frozenset()) -> None:
        """Wake every session of ``app_id`` so it downloads the new versions.

        Sessions of the files in ``writers`` (whose uploads were just committed) are woken
        last: the new changes reach the other devices first, then the writers get their
        acknowledgements. Downloaders run in the order they are woken; a fixed order keeps
        latency steady. (Measured on loopback with A's writes seen by B: sending A's
        acknowledgement first delayed B's download by 0.15-0.3 ms, the write of the frame
        to A's socket. Writers last used to cost more when the writer's device wrote its
        acknowledgement in a transaction of its own, as the app wrote next; it no longer
        does: see ``SessionWorker._note_cursors``.)
        """
        for listener in list(self._listeners.get(app_id, ())):
            try:
                listener()
            except Exception:
                log.exception("a commit listener of app %s failed", app_id)
        sessions = self._sessions.get(app_id, ())
        if writers:
            for session in sessions:
                if session.file_ident not in writers:
                    session.wake.set()
        for session in sessions:
            session.wake.set()

    def register(self, app_id: str, session: HubSession) -> None:
        """Add a bound session to the app's fan-out set."""
        self._sessions.setdefault(app_id, set()).add(session)
        self.metrics.sessions_total += 1
        if self.trimmer is not None:
            self.trimmer.note_app(app_id)
        self._watch(app_id)

    def _watch(self, app_id: str) -> None:
        if app_id not in self._unwatch:  # commits of other server processes wake it too
            self._unwatch[app_id] = self.storage.watch(app_id, partial(self._remote, app_id))

    def _unwatch_if_idle(self, app_id: str) -> None:
        if app_id in self._sessions or app_id in self._listeners:
            return
        unwatch = self._unwatch.pop(app_id, None)
        if unwatch is not None:
            unwatch()

    def unregister(self, app_id: str, session: HubSession) -> None:
        """Remove a session from the app's fan-out set."""
        sessions = self._sessions.get(app_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[app_id]
                self._unwatch_if_idle(app_id)

    def listener_count(self, app_id: str) -> int:
        """How many :meth:`listen` callbacks ``app_id`` has (open feeds, webhooks)."""
        return len(self._listeners.get(app_id, ()))

    def listen(self, app_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after each commit of new versions of ``app_id``, by this
        process or (through :meth:`ServerStorage.watch`) another one sharing the storage.
        It must not block. Returns the function that stops calling it."""
        self._listeners.setdefault(app_id, set()).add(callback)
        self._watch(app_id)

        def stop() -> None:
            callbacks = self._listeners.get(app_id)
            if callbacks is None or callback not in callbacks:
                return
            callbacks.discard(callback)
            if not callbacks:
                del self._listeners[app_id]
                self._unwatch_if_idle(app_id)

        return stop

    @property
    def session_count(self) -> int:
        """How many sessions are bound."""
        return sum(len(s) for s in self._sessions.values())

    @property
    def accepting(self) -> bool:
        """False once the server started draining (going away)."""
        return self._accepting

    def _remote(self, app_id: str) -> None:
        self.metrics.remote_wakeups_total += 1
        self.notify(app_id)

    def _committed(self, batches: list[UploadBatch], results: list[UploadResult]) -> None:
        for batch, result in zip(batches, results):
            if result.created and len(result.created) <= RECENT_BATCH:
                recent = self.recent_creates.setdefault(batch.app_id, OrderedDict())
                recent.update(result.created)
                while len(recent) > RECENT_CREATES:
                    recent.popitem(last=False)
        for app_id in {b.app_id for b, r in zip(batches, results) if r.server_versions}:
            writers = frozenset(b.origin for b in batches if b.app_id == app_id)
            self.notify(app_id, writers)

    async def going_away(self) -> None:
        """Stop accepting; send ERROR 115 and close (1001) every connection; wait for them."""
        self._accepting = False
        self.stopping.set()
        connections = list(self._connections)
        if not connections:
            return
        await asyncio.gather(*(c.going_away() for c in connections), return_exceptions=True)
        waits = [asyncio.ensure_future(c.done.wait()) for c in connections]
        _, pending = await asyncio.wait(waits, timeout=self.config.shutdown_grace)
        for waiter in pending:
            waiter.cancel()
        if pending:
            log.warning("%d connection(s) did not close in time", len(pending))

    async def disconnect_user(self, app_id: str, user_id: str, reason: str) -> int:
        """Close every sync connection of one user (disabled or deleted) with an auth
        error; returns how many were closed."""
        victims = [c for c in self._connections if c.app_id == app_id and c.user_id == user_id]
        await asyncio.gather(*(c.revoke(reason) for c in victims), return_exceptions=True)
        if victims:
            log.info("app %s: closed %d connection(s) of user %s", app_id, len(victims), user_id)
        return len(victims)

    async def disconnect_login(self, app_id: str, user_id: str, family: str) -> int:
        """Close every sync connection authenticated by one login (logged out) with an
        auth error; returns how many were closed."""
        victims = [
            c
            for c in self._connections
            if c.app_id == app_id and c.user_id == user_id and c.login == family
        ]
        await asyncio.gather(
            *(c.revoke(LOGGED_OUT_REASON) for c in victims), return_exceptions=True
        )
        if victims:
            log.info("app %s: closed %d connection(s) of a logged-out login", app_id, len(victims))
        return len(victims)

    def user_connections(self, app_id: str, user_id: str) -> int:
        """How many authenticated sync connections the user has open."""
        return sum(1 for c in self._connections if c.app_id == app_id and c.user_id == user_id)

    async def close(self) -> None:
        """Say goodbye to every connection, then finish the queued commits."""
        await self.going_away()
        if self.trimmer is not None:
            await self.trimmer.aclose()
        await self.committer.close()


#: The reconnect delay a shutting-down server prescribes to its clients (a restart is
#: expected; waiting a moment spares it a stampede of reconnects while it comes back).
GOING_AWAY_RETRY_DELAY_MS = 1000


class SyncConnection:
    """One client's sync WebSocket: the protocol state machine plus its sessions' tasks."""

    def __init__(self, hub: SyncHub, websocket: WebSocket, app_id: str) -> None:
        self.hub = hub
        self.ws = websocket
        self.app_id = app_id
        self.id = uuid.uuid4().hex
        #: When the WebSocket arrived (seconds since the epoch, the hub's clock).
        self.connected_at = hub.clock()
        self.proto = ServerProtocol(
            max_frame_size=hub.config.max_frame_size,
            max_changeset_bytes=hub.config.limits.max_changeset_bytes,
        )
        self.user_id: str | None = None
        #: ``(user id, the field values rules see)``, looked up once (HELLO's user) and
        #: again on REFRESH (``flexsync.user_of``).
        self.rule_user: tuple[str, dict[str, Any]] | None = None
        #: The login (token family) whose access token authenticated this connection.
        self.login: str | None = None
        self.token_expires_at = 0.0
        self.sessions: dict[int, HubSession] = {}
        self.done = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._closing = asyncio.Event()
        self._close_code = CLOSE_NORMAL
        self._peer_gone = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------

    def snapshot(self, ended: str | None = None) -> list[SessionSnapshot]:
        """This connection's sessions as :class:`SessionSnapshot` rows (one row with no
        session while none is bound); ``ended`` names the state of rows that just ended."""
        sessions = list(self.sessions.values())
        if not sessions:
            state = AWAITING_HELLO if self.user_id is None else CONNECTED
            return [self._row(None, ended or state)]
        return [self._row(s, ended) for s in sessions]

    def _row(self, session: HubSession | None, state: str | None) -> SessionSnapshot:
        ended_at = self.hub.clock() if state in (DISCONNECTED, UNBOUND) else None
        subscriptions: tuple[str, ...] = ()
        error = None
        if session is not None:
            if session.error is not None:
                error = f"{int(session.error[0])}: {session.error[1]}"
            if state is None:
                state = ACTIVE if session.active else FAILED
            view = session.flex
            if view is not None and view.queries is not None:
                queries = view.queries[0] or {}
                subscriptions = tuple(
                    f"{model}: {text}" for model, texts in queries.items() for text in texts
                )
        return SessionSnapshot(
            app_id=self.app_id,
            connection_id=self.id,
            user_id=self.user_id,
            file_ident=session.file_ident if session is not None else "",
            session=session.number if session is not None else None,
            state=state or CONNECTED,
            connected_at=self.connected_at,
            ended_at=ended_at,
            protocol_version=self.proto.protocol_version,
            download_cursor=session.cursor if session is not None else 0,
            latest_version=session.latest if session is not None else 0,
            upload_acked=session.acked if session is not None else 0,
            subscriptions=subscriptions,
            error=error,
        )

    async def run(self, *, going_away: bool = False) -> None:
        """Accept the WebSocket and serve it until either side ends it."""
        try:
            await self.ws.accept()
            if going_away:
                await self.going_away()
            self._spawn(self._hello_deadline(), "hello-deadline")
            receiver = asyncio.create_task(self._receive_loop())
            closing = asyncio.create_task(self._closing.wait())
            try:
                await asyncio.wait({receiver, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                receiver.cancel()
                closing.cancel()
                await asyncio.gather(receiver, closing, return_exceptions=True)
                await self._teardown()
        finally:
            self.done.set()

    async def _teardown(self) -> None:
        for session in list(self.sessions.values()):
            self._deactivate(session)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self._peer_gone:
            try:
                await self.ws.close(self._close_code)
            except Exception:  # the peer vanished meanwhile
                log.debug("connection %s: close failed", self.id, exc_info=True)

    async def going_away(self) -> None:
        """Send ERROR 115 (retry later) and close with 1001."""
        if self.done.is_set() or self._closing.is_set():
            return
        if self.proto.state is not ServerState.CLOSED:
            self.proto.error(
                ErrorCode.GOING_AWAY,
                "the server is shutting down; reconnect later",
                action=SyncAction.RETRY,
                retry_delay_ms=GOING_AWAY_RETRY_DELAY_MS,
            )
            self.hub.metrics.error(ErrorCode.GOING_AWAY)
        await self._close_after_flush(CLOSE_GOING_AWAY)

    async def revoke(self, reason: str) -> None:
        """End the connection because its user lost access (ERROR 113, close 1008)."""
        if self.done.is_set() or self._closing.is_set():
            return
        await self._fail(
            ErrorCode.BAD_TOKEN,
            f"access revoked: {reason}",
            CLOSE_POLICY_VIOLATION,
            SyncAction.REFRESH_TOKEN,
        )

    async def _close_after_flush(self, code: int) -> None:
        try:
            await self.flush()
        except _ConnectionGone:
            pass
        if not self._closing.is_set():
            self._close_code = code
            self._closing.set()

    async def _fail(
        self, code: ErrorCode, message: str, close_code: int, action: SyncAction | None = None
    ) -> None:
        """Send a connection-level ERROR and close."""
        if self.proto.state is not ServerState.CLOSED:
            self.proto.error(code, message, action=action)
            self.hub.metrics.error(code)
        await self._close_after_flush(close_code)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guard(coro), name=f"{name}-{self.id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except (_ConnectionGone, asyncio.CancelledError):
            pass
        except Exception:
            await self._internal_error()

    async def _internal_error(self) -> None:
        log.exception("connection %s (app %s): internal error", self.id, self.app_id)
        if self.proto.state is ServerState.CLOSED:
            await self._close_after_flush(CLOSE_INTERNAL_ERROR)
            return
        await self._fail(ErrorCode.OTHER_ERROR, "internal server error", CLOSE_INTERNAL_ERROR)

    async def flush(self) -> None:
        """Write every frame the protocol has queued to the socket (raises when the peer
        is gone)."""
        async with self._send_lock:
            for frame in self.proto.data_to_send():
                if self._peer_gone:
                    raise _ConnectionGone
                try:
                    await self.ws.send_bytes(frame)
                    self.hub.metrics.bytes_sent_total += len(frame)
                except Exception as exc:
                    self._peer_gone = True
                    self._closing.set()
                    raise _ConnectionGone from exc

    # -- receiving ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        try:
            while not self._closing.is_set():
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self._peer_gone = True
                    return
                data = message.get("bytes")
                if data is not None:
                    self.hub.metrics.bytes_received_total += len(data)
                if data is None:
                    await self._violation(
                        InvalidMessageError("text frames are not allowed; send binary frames")
                    )
                    return
                try:
                    events = self.proto.receive_data(data)
                except RemoteProtocolError as exc:
                    if not await self._violation(exc):
                        return
                    continue
                await self.flush()
                for event in events:
                    await self._dispatch(event)
        except _ConnectionGone:
            return
        except Exception:
            await self._internal_error()

    async def _violation(self, exc: RemoteProtocolError) -> bool:
        """Report a client's protocol violation; True if the connection stays open."""
        code = error_code_of(exc)
        log.info("connection %s (app %s): protocol violation: %s", self.id, self.app_id, exc)
        number = session_of(exc)
        if is_session_level_code(code) and number is not None:
            if self.proto.state is ServerState.OPEN:
                self._session_error_now(number, code, getattr(exc, "reason", None) or str(exc))
                await self.flush()
                return True
        close_code = CLOSE_TOO_BIG if code == ErrorCode.FRAME_TOO_LARGE else CLOSE_PROTOCOL_ERROR
        if self.proto.state is not ServerState.CLOSED:
            try:
                self.proto.error_for(exc)
            except LocalProtocolError:
                self.proto.error(ErrorCode.OTHER_ERROR, str(exc))
        await self._close_after_flush(close_code)
        return False

    async def _dispatch(self, event: ServerEvent) -> None:
        try:
            match event:
                case HelloReceived():
                    await self._on_hello(event)
                case RefreshReceived():
                    await self._on_refresh(event)
                case BindReceived():
                    await self._on_bind(event)
                case UnbindReceived():
                    await self._on_unbind(event)
                case UploadReceived():
                    await self._on_upload(event)
                case MarkReceived():
                    await self._on_mark(event)
                case QueryReceived():
                    await self._on_query(event)
                case PingReceived() | PongReceived():
                    pass
        except LocalProtocolError:
            if self.proto.state is ServerState.CLOSED or self._closing.is_set():
                return  # the connection ended while the event was handled
            raise

    # -- authentication -------------------------------------------------------------------

    async def _refuse_token(self, exc: AuthError) -> None:
        if isinstance(exc, TokenExpiredError):
            code = ErrorCode.TOKEN_EXPIRED
        elif isinstance(exc, WrongAppError):
            code = ErrorCode.OTHER_APP
        else:
            code = ErrorCode.BAD_TOKEN
        log.info("connection %s (app %s): token refused: %s", self.id, self.app_id, exc)
        action = SyncAction.STOP if code == ErrorCode.OTHER_APP else SyncAction.REFRESH_TOKEN
        await self._fail(code, f"access token refused: {exc}", CLOSE_POLICY_VIOLATION, action)

    async def _on_hello(self, event: HelloReceived) -> None:
        try:
            claims = self.hub.auth.verify(event.token, self.app_id, ACCESS)
        except AuthError as exc:
            await self._refuse_token(exc)
            return
        refusal = await self.hub.auth.access_refusal(self.app_id, claims)
        if refusal is not None:
            await self._refuse_token(InvalidTokenError(refusal))
            return
        most = self.hub.config.limits.max_connections_per_user
        if self.hub.user_connections(self.app_id, claims.user_id) >= most:
            await self._fail(
                ErrorCode.LIMITS_EXCEEDED,
                f"limit exceeded: at most {most} sync connections per user",
                CLOSE_POLICY_VIOLATION,
                SyncAction.RETRY,
            )
            return
        self.user_id = claims.user_id
        self.login = claims.family
        self.token_expires_at = claims.expires_at
        open_frames(self.ws.scope)  # logged in: frames up to max_frame_size from now on
        self.proto.welcome(int(self.hub.clock() * 1000), self.id)
        await self.flush()
        self._spawn(self._watch_token(), "token-watch")

    async def _on_refresh(self, event: RefreshReceived) -> None:
        try:
            claims = self.hub.auth.verify(event.token, self.app_id, ACCESS)
            if claims.user_id != self.user_id:
                raise InvalidTokenError("the new token belongs to another user")
            refusal = await self.hub.auth.access_refusal(self.app_id, claims)
            if refusal is not None:
                raise InvalidTokenError(refusal)
        except AuthError as exc:
            await self._refuse_token(exc)
            return
        self.login = claims.family
        self.token_expires_at = claims.expires_at
        await flexsync.on_refresh(self)  # rules see the user's fields as they are now

    async def _hello_deadline(self) -> None:
        await asyncio.sleep(self.hub.config.hello_timeout)
        if self.proto.state is ServerState.AWAITING_HELLO:
            await self._fail(
                ErrorCode.OTHER_ERROR,
                f"no HELLO within {self.hub.config.hello_timeout:g} s",
                CLOSE_POLICY_VIOLATION,
            )

    async def _watch_token(self) -> None:
        while True:
            delay = self.token_expires_at - self.hub.clock()
            if delay <= 0:
                log.info("connection %s: access token expired", self.id)
                await self._fail(
                    ErrorCode.TOKEN_EXPIRED,
                    "the access token expired; send REFRESH with a new one or reconnect",
                    CLOSE_POLICY_VIOLATION,
                    SyncAction.REFRESH_TOKEN,
                )
                return
            await asyncio.sleep(delay)

    # -- sessions -------------------------------------------------------------------------

    def _session_error_now(
        self, number: int, code: ErrorCode, message: str, action: SyncAction | None = None
    ) -> None:
        """Queue a session ERROR (if the session can still take one) and stop the session."""
        session = self.sessions.get(number)
        if session is not None:
            self._deactivate(session)
        if self.proto.state is not ServerState.OPEN:
            return
        try:
            self.proto.error(code, message, action=action, session=number)
            self.hub.metrics.error(code)
        except LocalProtocolError:
            log.debug("session %d: error %d not sent (session ended)", number, code)

    async def _session_error(
        self, number: int, code: ErrorCode, message: str, action: SyncAction | None = None
    ) -> None:
        log.info("connection %s session %d: error %d: %s", self.id, number, code, message)
        self._session_error_now(number, code, message, action)
        await self.flush()

    def _deactivate(self, session: HubSession) -> None:
        session.active = False
        session.wake.set()
        self.hub.unregister(self.app_id, session)
        task = session.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _on_bind(self, event: BindReceived) -> None:
        number, storage, app = event.session, self.hub.storage, self.app_id
        assert self.user_id is not None
        most = self.hub.config.limits.max_sessions_per_connection
        if len(self.sessions) >= most:
            await self._session_error(
                number,
                ErrorCode.OTHER_SESSION_ERROR,
                f"limit exceeded: at most {most} sessions per connection",
            )
            return
        try:
            schemapin.precheck_bind(self.hub.config, app, event.schema)
            schemas = [ModelSchema.from_dict(d) for d in event.schema]
        except SchemaMismatchError as exc:  # refused by names and sizes, before parsing
            await self._session_error(number, ErrorCode.BAD_SCHEMA, str(exc))
            return
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            await self._session_error(number, ErrorCode.BAD_SCHEMA, f"invalid schema: {exc}")
            return
        try:
            await schemapin.check_bind(self.hub.config, storage, app, schemas)
            await storage.put_schemas(app, schemas)
            known = True
            if event.download_cursor > 0:  # a file that synced before must be on record
                known = await storage.client_known(app, event.file_ident)
            acked = await storage.register_client(app, event.file_ident, self.user_id)
            latest = await storage.latest_version(app)
            trimmed = event.download_cursor == 0 and await _history_trimmed(storage, app, latest)
        except SchemaMismatchError as exc:
            await self._session_error(number, ErrorCode.BAD_SCHEMA, str(exc))
            return
        except ClientOwnershipError as exc:
            await self._session_error(number, ErrorCode.BAD_CLIENT_FILE_IDENT, str(exc))
            return
        except StorageFullError as exc:
            log.warning("connection %s: bind of session %d refused: %s", self.id, number, exc)
            await self._session_error(
                number, ErrorCode.OTHER_SESSION_ERROR, "the server's disk is full; try again later"
            )
            return
        except StorageError:
            log.exception("connection %s: bind of session %d failed", self.id, number)
            await self._session_error(
                number, ErrorCode.OTHER_SESSION_ERROR, "server storage error; try again later"
            )
            return
        if event.download_cursor > latest or not known:
            why = (
                f"download cursor {event.download_cursor} is beyond the server's latest "
                f"version {latest}"
                if known
                else f"client file {event.file_ident} is unknown to the server"
            )
            await self._session_error(
                number,
                ErrorCode.CLIENT_RESET_NEEDED,
                f"{why} (the server's data was wiped or replaced); reset the client file",
            )
            return
        if event.upload_acked > acked:
            await self._session_error(
                number,
                ErrorCode.CLIENT_RESET_NEEDED,
                f"the client says version {event.upload_acked} was acknowledged but the "
                f"server has only {acked}; reset the client file",
            )
            return
        view = await flexsync.open_view(self, event.flexible)
        if trimmed:  # the log no longer starts at 0: a fresh file gets the whole state
            view = await _bootstrap_view(self, view)
        if self.proto.state is not ServerState.OPEN:
            return
        self.proto.bound(number, latest, acked)
        session = HubSession(number, event.file_ident, event.download_cursor, latest, acked, acked)
        session.flex = view
        session.wake.set()
        self.sessions[number] = session
        self.hub.register(app, session)
        session.task = self._spawn(self._downloader(session), f"download-{number}")
        await self.flush()

    async def _on_unbind(self, event: UnbindReceived) -> None:
        session = self.sessions.pop(event.session, None)
        if session is not None:
            self._deactivate(session)
            self.hub.note_ended([self._row(session, UNBOUND)])
        self.proto.unbound(event.session)
        await self.flush()

    async def _on_upload(self, event: UploadReceived) -> None:
        session = self.sessions.get(event.session)
        if session is None or not session.active:
            return
        changesets: list[Changeset] = []
        refused: list[tuple[int, str]] = []
        most = self.hub.config.limits.max_changeset_bytes
        oversized = event.oversized
        for cs in event.changesets:
            size = oversized.get(cs.version) if oversized else None
            if size is None and len(cs.instructions) > most:
                size = len(cs.instructions)
            reason = None
            instructions: tuple[Any, ...] = ()
            if size is not None:
                reason = (
                    f"limit exceeded: changeset version {cs.version} has {size} bytes, "
                    f"more than the server's limit of {most} (limits.max_changeset_bytes)"
                )
            else:
                try:
                    with gc_paused:
                        instructions = unpack_instructions(
                            cs.instructions, origin=session.file_ident
                        )
                except ValueError as exc:
                    reason = f"changeset version {cs.version} is malformed: {exc}"
            if reason is not None:
                if (self.proto.protocol_version or 0) < PARTS_VERSION:
                    # a v2 client knows no ERROR 232: its session stops, as it always did
                    await self._session_error(event.session, ErrorCode.BAD_CHANGESET, reason)
                    return
                refused.append((cs.version, reason))
            elif instructions:
                # one comparison per changeset: its greatest wall time (a C-level max)
                wall = max(map(_WALL, map(_HLC, instructions)))
                server_ms = int(self.hub.clock() * 1000)
                skew = self.hub.config.limits.max_clock_skew_ms
                if wall > server_ms + skew:  # the device re-stamps and uploads again
                    await self._session_error(
                        event.session,
                        ErrorCode.CLOCK_SKEW,
                        clock_skew_message(cs.version, wall, server_ms, skew),
                        SyncAction.RETRY,
                    )
                    return
            changesets.append(Changeset(session.file_ident, cs.version, instructions))
        if refused:
            # integrated as nothing (so the versions after it go on), and reported first:
            # the device reads what the refused changesets held before they are acknowledged
            await self._refuse_changesets(event.session, refused)
        if not changesets:
            return
        # a rule check and its commit are one step (server/flexsync.py, writecheck.py)
        async with flexsync.write_guard(self, session, changesets) as guard:
            check = None
            if session.flex is not None:
                changesets, check = await flexsync.check_upload(self, session, changesets)
            batch = UploadBatch(self.app_id, session.file_ident, changesets, check)
            try:
                future = self.hub.committer.submit(batch)
            except StorageError as exc:
                await self._session_error(
                    event.session, ErrorCode.OTHER_SESSION_ERROR, str(exc), SyncAction.RETRY
                )
                return
            future.add_done_callback(partial(_upload_done, session, changesets[-1].version))
            guard.until(future)

    async def _refuse_changesets(self, number: int, refused: list[tuple[int, str]]) -> None:
        """Send ERROR 232 for changesets integrated as nothing (the session stays bound)."""
        log.info("connection %s session %d: refused changesets %s", self.id, number, refused)
        if self.proto.state is not ServerState.OPEN:
            return
        try:
            self.proto.error(
                ErrorCode.CHANGESET_REFUSED,
                refused_changesets_message(refused),
                action=SyncAction.RETRY,
                session=number,
            )
            self.hub.metrics.error(ErrorCode.CHANGESET_REFUSED)
        except LocalProtocolError:
            log.debug("session %d: ERROR 232 not sent (session ended)", number)
            return
        await self.flush()

    async def _on_mark(self, event: MarkReceived) -> None:
        session = self.sessions.get(event.session)
        if session is None or not session.active:
            return
        target = await self.hub.storage.latest_version(self.app_id)
        session.marks.append((event.request_id, target))
        session.wake.set()

    async def _on_query(self, event: QueryReceived) -> None:
        # The new set is bound and bootstrapped by server/flexsync.py.
        session = self.sessions.get(event.session)
        if session is None or not session.active:
            return
        most = self.hub.config.limits.max_query_length
        longest = max((len(q) for qs in event.queries.values() for q in qs), default=0)
        if longest > most:
            self.proto.query_error(
                event.session,
                event.query_version,
                f"limit exceeded: a subscription query has {longest} characters, "
                f"more than the limit of {most}",
            )
            self._spawn(self.flush(), "flush")
            return
        await flexsync.on_query(
            self, session, event.query_version, event.queries, event.args, event.bootstrapped
        )

    # -- downloading ----------------------------------------------------------------------

    async def _downloader(self, session: HubSession) -> None:
        while session.active:
            await session.wake.wait()
            session.wake.clear()
            if not session.active:
                return
            if session.error is not None:
                code, message, action = session.error
                await self._session_error(session.number, code, message, action)
                return
            try:
                await self._catch_up(session)
            except HistoryTrimmedError as exc:
                await self._session_error(session.number, ErrorCode.CLIENT_RESET_NEEDED, str(exc))
                return
            except CursorAheadError as exc:
                await self._session_error(session.number, ErrorCode.BAD_SERVER_VERSION, str(exc))
                return
            except StorageError:
                log.exception("connection %s: download failed", self.id)
                await self._session_error(
                    session.number,
                    ErrorCode.OTHER_SESSION_ERROR,
                    "server storage error; try again later",
                )
                return
            self._answer_marks(session)
            await self.flush()

    def sendable(self, session: HubSession) -> bool:
        """May messages of ``session`` be sent now (active, bound, the connection open)?"""
        return (
            session.active
            and self.proto.state is ServerState.OPEN
            and self.proto.is_bound(session.number)
        )

    async def _catch_up(self, session: HubSession) -> None:
        if session.flex is not None:
            await flexsync.catch_up(self, session)
            return
        force = not session.first_sent or session.query_version > session.sent_query_version
        page_bytes = self.hub.config.page_bytes
        while True:
            start = session.cursor
            # the acknowledgement as of before the read: the page then holds every version
            # it acknowledges (one acknowledged during the read wakes the session again)
            acked = session.acked
            page = await self.hub.storage.read_log(
                self.app_id, start, page_bytes, exclude_origin=session.file_ident
            )
            if not self.sendable(session) or session.error is not None:
                return
            latest = max(page.latest_version, session.latest)
            moved = page.cursor > start or latest > session.latest or acked > session.sent_acked
            if moved or force:
                self.proto.download(
                    session.number,
                    [
                        DownloadChangeset(
                            e.server_version, e.origin, e.client_version, e.instructions
                        )
                        for e in page.entries
                    ],
                    page.cursor,
                    latest,
                    page.remaining_bytes,
                    acked,
                    session.query_version,
                )
                session.cursor, session.latest, session.sent_acked = page.cursor, latest, acked
                session.sent_query_version = session.query_version
                session.first_sent = True
                self.hub.metrics.download_messages_total += 1
                self.hub.metrics.downloads_total += len(page.entries)
                force = False
                await self.flush()
            if page.cursor >= page.latest_version or page.cursor <= start:
                return

    def _answer_marks(self, session: HubSession) -> None:
        if not session.marks or not self.sendable(session):
            return
        waiting: list[tuple[int, int]] = []
        for request_id, target in session.marks:
            if target <= session.cursor:
                self.proto.mark_reply(session.number, request_id, target)
            else:
                waiting.append((request_id, target))
        session.marks = waiting


async def _history_trimmed(storage: ServerStorage, app_id: str, latest: int) -> bool:
    """True when the app's log no longer starts at version 0 (history was trimmed)."""
    if latest == 0:
        return False
    try:
        await storage.read_log(app_id, 0, 1)
    except HistoryTrimmedError:
        return True
    return False


async def _bootstrap_view(conn: SyncConnection, view: FlexView | None) -> FlexView:
    """A view that owes the device a bootstrap of the whole current state (a fresh or reset
    file after the history was trimmed: the log cannot rebuild it, the objects can)."""
    if view is None:
        assert conn.user_id is not None
        schemas = await conn.hub.storage.get_schemas(conn.app_id)
        perms = Permissions(None, user_fields(conn.user_id), schemas)
        return FlexView(perms, schemas, None, bootstrap=0)
    if view.bootstrap is None:
        view.bootstrap = view.subs.version if view.subs is not None else 0
    return view


def _upload_done(
    session: HubSession, last_version: int, future: asyncio.Future[UploadResult]
) -> None:
    """Record an upload's outcome on its session and wake the session's downloader."""
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        if session.error is None:
            full = isinstance(exc, StorageFullError)
            session.error = (
                ErrorCode.OTHER_SESSION_ERROR,
                DISK_FULL_MESSAGE
                if full
                else "the server could not store the upload; try again later",
                SyncAction.RETRY,
            )
    else:
        result = future.result()
        if result.ok:
            if session.flex is not None:
                flexsync.note_committed(session.flex, last_version, result)
            session.acked = max(session.acked, min(result.acked_version, last_version))
        elif session.error is None:
            session.error = (ErrorCode.BAD_CHANGESET, f"upload refused: {result.error}", None)
    session.wake.set()
