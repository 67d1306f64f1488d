"""The sync client: a background thread with its own event loop, one WebSocket per user.

``SyncClient`` owns the thread. A :class:`Connection` per user connects, reconnects with
backoff, keeps the connection alive with pings, and multiplexes every session of that user;
a :class:`SessionWorker` per synced database uploads its change log and applies downloads,
through a :class:`~tidesync.store.engine.StoreEngine` of its own on the database file.
Everything in this module runs on the sync thread except the ``SyncClient`` entry points
(which hand work to it) and the ``Session`` facade in ``session.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection, connect

from ..core.backoff import Backoff
from ..core.clocks import measure_offset
from ..core.packing import unpack_instructions
from ..core.progress import ProgressDirection, ProgressMode, ProgressTracker, SyncProgress
from ..errors import (
    AuthError,
    ClientResetError,
    DatabaseClosedError,
    LocalProtocolError,
    ProtocolError,
    SessionInactiveError,
    SyncAction,
    SyncDiskFullError,
    SyncError,
    TidesyncError,
)
from ..eventloop import new_event_loop
from ..protocol import client as pc
from ..protocol.messages import (
    BOOTSTRAP_NONE,
    ErrorCode,
    PongReceived,
    UploadChangeset,
    clock_skew_of,
    error_code_of,
)
from ..store import engine as store_engine
from ..store.diskfull import is_disk_full
from ..store.engine import StoreEngine, add_waker, remove_waker
from ..store.gcpause import gc_paused
from ..store.restamp import clock_ahead, restamp_unsent
from .refusals import refused_error
from .reset import (
    DiscardUnsyncedChanges,
    ManualRecovery,
    RecoverUnsyncedChanges,
    ResetGuard,
    backup_copy,
    backup_path_for,
    manual_error,
    open_copy,
    remove_copy,
    reset_file,
    too_many_error,
)
from .subscriptions import (
    FlexApplier,
    SubscriptionSetState,
    compensating_error,
    latest_row,
    query_error,
)
from .urls import host_and_port
from .wording import describe_failure

if TYPE_CHECKING:
    from .app import App, User
    from .config import SyncConfiguration
    from .database import Database
    from .session import Session

log = logging.getLogger("tidesync.sync")
T = TypeVar("T")

#: Upload at most this many bytes of changesets per UPLOAD message.
UPLOAD_BATCH_BYTES = 256 * 1024
#: Keep at most this many bytes uploaded but not yet acknowledged.
UPLOAD_WINDOW_BYTES = 4 * 1024 * 1024
#: Seconds a DOWNLOAD that only moves the cursors (an acknowledgement of this device's own
#: upload) waits before they are written to the file; sooner if another transaction comes.
CURSOR_SAVE_DELAY = 0.5
#: Longest wait between two tries of a session whose file's disk is full (the waits start
#: at ``reconnect_initial_delay`` and double, also capped by ``reconnect_max_delay``).
DISK_FULL_MAX_DELAY = 30.0
#: A clock offset measured at WELCOME is written to the file only when it differs from
#: the stored one by more than this (ms): measurements of a right clock differ by noise.
OFFSET_TOLERANCE_MS = 250


class ConnectionState(enum.Enum):
    """A session's view of its connection to the server."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class _Waker:
    """Bridges a commit on any thread to a callback on the sync loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback

    def set(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._callback)
        except RuntimeError:
            pass  # loop closed


class SyncClient:
    """One per App: the sync thread, its event loop, and a connection per user."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.timeouts = app.config.sync_timeouts
        self.loop = new_event_loop()
        self._connections: dict[str, Connection] = {}
        self._closed = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tidesync-sync", daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def is_closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the sync loop and return its result (blocking the caller)."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the sync loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def connection_for(self, user: User) -> Connection:
        """The (sync-loop) connection of a user, created on first use."""
        conn = self._connections.get(user.id)
        if conn is None or conn.closed:
            conn = Connection(self, user)
            self._connections[user.id] = conn
        return conn

    def open_session(self, db: Database, sync: SyncConfiguration, start: bool = True) -> Session:
        """Start syncing a database (or only make its session, with ``start=False``; its
        ``_start`` starts it); returns its :class:`Session`."""
        from .session import Session

        if self._closed:
            raise DatabaseClosedError("the app's sync client is closed")
        worker = self.call(lambda: SessionWorker(self, db, sync))
        session = Session(self, worker, db, sync)
        worker.session = session
        if start:
            self.call(worker.activate)
        return session

    def reconnect(self) -> None:
        """Every connection tries at once (see ``App.reconnect``)."""
        if self._closed:
            return

        def all_now() -> None:
            for conn in list(self._connections.values()):
                conn.reconnect_now()

        self.loop.call_soon_threadsafe(all_now)

    def close(self) -> None:
        """Stop every connection and the thread; returns when the thread has ended."""
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            for conn in list(self._connections.values()):
                await conn.close()
            self._connections.clear()

        if self._thread.is_alive():
            try:
                self.submit(shutdown()).result(timeout=30)
            except (concurrent.futures.TimeoutError, RuntimeError):
                log.warning("sync client shutdown timed out")
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()


class SessionWorker:
    """The sync-thread side of one synced database."""

    def __init__(self, client: SyncClient, db: Database, sync: SyncConfiguration) -> None:
        self.client = client
        self.loop = client.loop
        self.user = sync.user
        self.sync = sync
        self.path = db.path
        self.session: Session | None = None
        self.engine = StoreEngine(db.path, db.schemas)
        self.flex = FlexApplier(self.engine)  # flexible sync (client/subscriptions.py)
        self.query_sent = 0  # subscription set version sent on the current binding
        self.schema = [s.to_dict() for s in db.schemas.values()]
        self.file_ident = self.engine.origin
        self.upload_acked = int(self.engine.get_meta("upload_acked", 0) or 0)
        self.download_cursor = int(self.engine.get_meta("download_cursor", 0) or 0)
        self.upload_sent = self.upload_acked
        # the cursors as the file holds them; memory may be ahead (see _note_cursors)
        self._saved_cursor, self._saved_acked = self.download_cursor, self.upload_acked
        self._save_timer: asyncio.TimerHandle | None = None
        self.in_flight: list[tuple[int, int]] = []  # (version, size) uploaded, not acked
        self.active = False
        #: Why the session is inactive (what a wait started meanwhile fails with).
        self.inactive_reason = "the session is paused"
        self.closed = False
        self.bound = False
        self.session_no: int | None = None
        self.connection: Connection | None = None
        self.conn_state = ConnectionState.DISCONNECTED
        self.server_latest = 0
        self.downloadable_bytes = 0
        self.upload_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.download_waiters: list[asyncio.Future[None]] = []
        self.marks: dict[int, list[asyncio.Future[None]]] = {}
        self.listeners: list[Callable[[str], None]] = []  # notified of "state", "progress"
        # progress counters (cumulative, since this worker started; see core/progress.py)
        self._up_scanned = self.upload_acked
        self._up_pending: list[tuple[int, int]] = []  # (version, size) not yet acknowledged
        self._up_head = 0
        self.up_transferred = 0
        self.up_transferable = 0
        self.down_transferred = 0
        self.down_remaining = 0
        self.down_known = False
        self.progress_listeners: list[_ProgressListener] = []
        # an old (v2) server cannot take a changeset larger than a frame: reported once
        self.upload_blocked = False
        # uploads held back after a slow reconnect until the download has caught up
        self.hold_uploads = False
        self.held_upload_count = 0
        self.models = db.config.models  # for the client reset callbacks' copies
        self.reset_guard = ResetGuard()  # client resets (client/reset.py)
        self.resets = 0  # automatic client resets done (for tests and diagnostics)
        self.gap_check = False  # after a reset: renumber the change log to follow the server
        #: set while the file's disk is too full for a download (see wait_for_space)
        self.disk_full: SyncDiskFullError | None = None
        timeouts = client.timeouts
        self._disk_backoff = Backoff(
            timeouts.reconnect_initial_delay,
            min(timeouts.reconnect_max_delay, DISK_FULL_MAX_DELAY),
        )
        self._disk_rng = random.Random()
        self._waker = _Waker(self.loop, self._on_local_commit)
        add_waker(self.path, self._waker)  # type: ignore[arg-type]

    # --- lifecycle (sync loop) -----------------------------------------------------------

    def activate(self) -> None:
        """Start (or resume) syncing: attach to the user's connection."""
        if self.active or self.closed:
            return
        self.active = True
        self.connection = self.client.connection_for(self.user)
        self.connection.attach(self)

    def deactivate(self, reason: str) -> None:
        """Stop syncing (pause or close): detach and fail pending waits."""
        if not self.active:
            return
        self.active = False
        self.inactive_reason = reason
        self.save_cursors()
        if self.connection is not None:
            self.connection.detach(self)
        self.bound = False
        self.down_known = False  # until the next binding's first DOWNLOAD says (item 5)
        self.in_flight.clear()
        self.upload_sent = self.upload_acked
        self.set_conn_state(ConnectionState.DISCONNECTED)
        err = SessionInactiveError(reason)
        for _, fut in self.upload_waiters:
            if not fut.done():
                fut.set_exception(err)
        for fut in self.download_waiters:
            if not fut.done():
                fut.set_exception(err)
        for futs in self.marks.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(err)
        self.upload_waiters.clear()
        self.download_waiters.clear()
        self.marks.clear()

    def close(self) -> None:
        """End the session for good and close its engine."""
        if self.closed:
            return
        self.deactivate("the database was closed")
        self.closed = True
        remove_waker(self.path, self._waker)  # type: ignore[arg-type]
        listeners, self.progress_listeners = self.progress_listeners, []
        for listener in listeners:
            listener.end()
        self.engine.close()

    # --- progress ------------------------------------------------------------------------

    def _on_local_commit(self) -> None:
        """A local transaction committed (called on the sync loop): upload it. A failure
        is reported to the error handler, never left to the loop's exception handler."""
        if self.closed:
            return
        self._pump_reporting(progress=True)

    def _pump_reporting(self, *, progress: bool = False) -> bool:
        """:meth:`pump_upload` (and :meth:`update_progress`); a failure is logged and
        reported, never raised (False)."""
        try:
            self.pump_upload()
            if progress:
                self.update_progress()
        except Exception as exc:
            log.exception("sync session %s: uploading failed", self.path)
            self.report_error(
                SyncError(int(ErrorCode.OTHER_SESSION_ERROR), repr(exc), SyncAction.RETRY)
            )
            return False
        return True

    def _scan_uploads(self) -> None:
        """Count local changesets committed since the last scan, and acknowledged ones."""
        rows = self.engine.conn.execute(
            "SELECT version, size FROM _changelog WHERE version > ? ORDER BY version",
            (max(self._up_scanned, self.upload_acked),),
        ).fetchall()
        for version, size in rows:
            self._up_pending.append((int(version), int(size)))
            self.up_transferable += int(size)
            self._up_scanned = int(version)
        pending = self._up_pending
        n = 0
        while n < len(pending) and pending[n][0] <= self.upload_acked:
            self.up_transferred += pending[n][1]
            n += 1
        if n:
            del pending[:n]

    def counters(self, direction: ProgressDirection) -> tuple[int, int, bool]:
        """``(transferred, transferable, known)`` for a direction (cumulative bytes)."""
        if direction is ProgressDirection.UPLOAD:
            if not self.closed:
                self._scan_uploads()
            return self.up_transferred, self.up_transferable, True
        # flexible sync: a subscription set the server has not answered makes the download
        # unknown, one being bootstrapped is never finished before its last page
        # (client/subscriptions.py; docs/flexible-sync.md "Progress")
        sub_state = self.flex.download_state() if not self.closed else None
        if sub_state is SubscriptionSetState.PENDING:
            return self.down_transferred, self.down_transferred, False
        remaining = self.down_remaining
        if sub_state is SubscriptionSetState.BOOTSTRAPPING:
            remaining = max(remaining, 1)
        return (
            self.down_transferred,
            self.down_transferred + remaining,
            self.down_known,
        )

    def _position(self, direction: ProgressDirection) -> tuple[int, int]:
        """``(download cursor, server's latest version)`` for the download (the outstanding
        work is done once the cursor reaches the latest version of when it was fixed;
        core/progress.py); ``(0, 0)`` for the upload, whose bytes are exact."""
        if direction is ProgressDirection.UPLOAD:
            return 0, 0
        return self.download_cursor, self.server_latest

    def add_progress_listener(self, listener: _ProgressListener) -> None:
        """Register a listener and report its first value at once."""
        if self.closed:
            raise DatabaseClosedError("the session ended: its database was closed")
        t, total, known = self.counters(listener.direction)
        _, latest = self._position(listener.direction)
        listener.tracker = ProgressTracker(
            listener.mode, t, total, known=known, from_start=listener.from_start, latest=latest
        )
        self.progress_listeners.append(listener)
        self._feed(listener, t, total, known, False)

    def remove_progress_listener(self, listener: _ProgressListener) -> None:
        """Stop reporting to a listener."""
        if listener in self.progress_listeners:
            self.progress_listeners.remove(listener)

    def update_progress(self, download_complete: bool = False) -> None:
        """Report the current counters to every progress listener."""
        if not self.progress_listeners or self.closed:
            return
        values = {d: self.counters(d) for d in ProgressDirection}
        if download_complete:  # a MARK reply does not finish a pending bootstrap
            download_complete = self.flex.download_state() is SubscriptionSetState.COMPLETE
        for listener in list(self.progress_listeners):
            t, total, known = values[listener.direction]
            complete = download_complete and listener.direction is ProgressDirection.DOWNLOAD
            self._feed(listener, t, total, known, complete)

    def _feed(
        self, listener: _ProgressListener, t: int, total: int, known: bool, complete: bool
    ) -> None:
        tracker = listener.tracker
        assert tracker is not None
        cursor, latest = self._position(listener.direction)
        progress = tracker.update(
            t, total, known=known, complete=complete, cursor=cursor, latest=latest
        )
        if progress is not None:
            listener.deliver(progress)
        if tracker.done:
            self.remove_progress_listener(listener)
            listener.end()

    # --- state ---------------------------------------------------------------------------

    def set_conn_state(self, state: ConnectionState, reason: str | None = None) -> None:
        """Change the session's connection state and tell listeners (``reason``: why it
        went DISCONNECTED, in words)."""
        if state is self.conn_state:
            return
        previous, self.conn_state = self.conn_state, state
        if self.session is not None:
            self.session._connection_changed(previous, state, reason)

    def _emit(self, what: str) -> None:
        for cb in list(self.listeners):
            try:
                cb(what)
            except Exception:
                log.exception("a sync listener failed")

    def has_error_handler(self) -> bool:
        """Whether a ``sync_error_handler`` will be told of this session's errors."""
        session = self.session
        return session is not None and bool(session.error_handlers())

    def report_error(self, error: SyncError, *, logged: bool = False) -> None:
        """Hand an error to the configuration's error handler (never lost in a task);
        logged at WARNING unless the caller ``logged`` it already (connection failures:
        :meth:`Connection.connection_failed`)."""
        if not logged:
            log.warning("sync error on %s: %s", self.path, error)
        session = self.session
        if session is None:
            return
        for handler in session.error_handlers():  # of every Database sharing the session
            try:
                handler(session, error)
            except Exception:
                log.exception("the sync error handler failed")

    # --- connection events ---------------------------------------------------------------

    def on_connecting(self) -> None:
        """The connection is being (re)established."""
        self.bound = False
        self.set_conn_state(ConnectionState.CONNECTING)

    def on_disconnected(self, reason: str | None = None) -> None:
        """The connection dropped (``reason``: why, in words); uploads not acknowledged
        will be sent again."""
        self.bound = False
        self.down_known = False  # the server says what is outstanding again after BIND
        self.in_flight.clear()
        self.upload_sent = self.upload_acked
        self.marks.clear()  # MARK replies are lost; waiters re-ask on rebind
        if self.active:
            self.set_conn_state(ConnectionState.DISCONNECTED, reason)

    def bind(self, proto: pc.ClientProtocol, session_no: int, slow_reconnect: bool = False) -> None:
        """Send BIND for this file on a fresh connection. After a slow reconnect (offline
        longer than ``fast_reconnect_limit``) uploads wait until the download caught up."""
        self.session_no = session_no
        if slow_reconnect and not self.hold_uploads:
            self._hold_uploads_until_downloaded()
        last_version = int(self.engine.get_meta("last_version", 0) or 0)
        proto.bind(
            session_no,
            self.file_ident,
            self.schema,
            self.download_cursor,
            self.upload_acked,
            local_version=last_version,
            flexible=self.flex.flexible(),
        )
        self.query_sent = 0
        self.flex.reset()
        self.down_known = False  # a new binding: its first DOWNLOAD says what is outstanding
        self.set_conn_state(ConnectionState.CONNECTING)

    def send_query(self) -> None:
        """Send the newest subscription set as QUERY if this binding has not sent it yet."""
        conn = self.connection
        if self.closed or conn is None or conn.proto is None or self.session_no is None:
            return
        if not self.bound or not conn.proto.has_session(self.session_no):
            return
        version, queries, args = self.flex.latest_query()
        if version <= self.query_sent:
            return
        # a set whose bootstrap this file applied in full: the server may skip sending it again
        bootstrapped = latest_row(self.engine.conn)[1] == SubscriptionSetState.COMPLETE.value
        conn.proto.query(self.session_no, version, queries, args, bootstrapped)
        self.query_sent = version
        conn.flush_soon()

    def on_query_error(self, ev: pc.QueryErrorReceived) -> None:
        """QUERY_ERROR: the set goes to ERROR with the server's message (the older set
        keeps syncing)."""
        query_error(self.engine, ev.query_version, ev.message)
        self.update_progress()  # the refused set no longer holds the download open

    def _hold_uploads_until_downloaded(self) -> None:
        self.hold_uploads = True
        self.held_upload_count += 1
        fut = self.wait_download()

        def release(f: asyncio.Future[None]) -> None:
            if not f.cancelled():
                f.exception()  # retrieved: a paused session fails it, which is fine here
            self.hold_uploads = False
            self.pump_upload()

        fut.add_done_callback(release)

    def learn_offset(self, offset_ms: int) -> None:
        """The server's time minus this machine's, measured at WELCOME: the file stamps
        its HLCs with local time plus it from now on (docs/merge.md, "Clocks")."""
        engine = self.engine
        stored = int(engine.get_meta("clock_offset", 0) or 0)
        if abs(offset_ms - stored) <= OFFSET_TOLERANCE_MS:
            engine.clock_offset = stored
            return
        self._persist(clock_offset=offset_ms)
        engine.clock_offset = offset_ms
        log.info("%s: clock offset to the server's time is %d ms", self.path, offset_ms)

    def _set_clock_back(self) -> None:
        """At BOUND: a file whose clock is far ahead of the corrected time (timestamps it
        took in before the server bounded them) and that has nothing unsent sets its
        clock back now, so its next writes are not refused (docs/merge.md, "Clocks")."""
        engine = self.engine
        last_version = int(engine.get_meta("last_version", 0) or 0)
        if last_version <= self.upload_acked and clock_ahead(engine, engine.now()):
            restamp_unsent(engine, self.upload_acked, last_version + 1, engine.now())

    def on_bound(self, ev: pc.SessionBound) -> None:
        """BOUND: the server's view of our uploads; start uploading and re-ask marks."""
        self.bound = True
        self.server_latest = ev.server_version
        if ev.upload_acked > self.upload_acked:
            self._set_acked(ev.upload_acked)
        self.upload_sent = self.upload_acked
        self._set_clock_back()
        self.set_conn_state(ConnectionState.CONNECTED)
        self.send_query()  # the subscription set first: the server checks uploads against it
        self.pump_upload()
        if self.download_waiters:
            self._send_mark()
        self._emit("progress")

    def _persist(self, *, durable: bool = True, **values: int) -> None:
        engine = self.engine
        with engine.transaction(durable=durable):
            for k, v in values.items():
                engine.set_meta(k, v)

    def _set_acked(self, acked: int) -> None:
        if acked <= self.upload_acked:
            return
        try:
            self._persist(upload_acked=acked)
        except sqlite3.Error as exc:
            if not is_disk_full(exc, self.path):
                raise
            # a full disk: kept in memory and saved later, which is harmless to lose (see
            # _note_cursors), so uploads go on while downloads wait for space
            log.info("the disk of %s is full: upload_acked %d kept in memory", self.path, acked)
            self._acked(acked)
            if self._save_timer is None and not self.closed:
                self._save_timer = self.loop.call_later(CURSOR_SAVE_DELAY, self.save_cursors)
            return
        self._saved_acked = acked
        self._acked(acked)

    def save_cursors(self) -> None:
        """Write the cursors that only memory holds (see :meth:`_note_cursors`) now."""
        self._cancel_save()
        if self.closed:
            return
        cursor, acked = self.download_cursor, self.upload_acked
        if cursor == self._saved_cursor and acked <= self._saved_acked:
            return
        values = {"download_cursor": cursor}
        if acked > self._saved_acked:
            values["upload_acked"] = acked
        try:
            self._persist(durable=False, **values)
        except (sqlite3.Error, TidesyncError) as exc:
            # harmless to lose (see _note_cursors); the next download's transaction or
            # the next save writes them
            full = is_disk_full(exc, self.path)
            log.warning(
                "could not save the sync cursors of %s: %s", self.path, exc, exc_info=not full
            )
            return
        self._saved_cursor, self._saved_acked = cursor, max(acked, self._saved_acked)

    def _cancel_save(self) -> None:
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None

    def _note_cursors(self, ev: pc.DownloadReceived) -> None:
        """A DOWNLOAD with nothing to apply (the acknowledgement of this device's upload):
        its cursors are taken in memory and written later, with the next download's
        transaction or after ``CURSOR_SAVE_DELAY``. A write transaction per
        acknowledgement would take the file's write lock just as the app writes next.
        Losing them (a crash first) is harmless: the server is asked again from the
        older cursor and sends nothing new, and uploads it already integrated are
        acknowledged again without being applied twice."""
        self.download_cursor = ev.cursor
        if self._save_timer is None and not self.closed:
            self._save_timer = self.loop.call_later(CURSOR_SAVE_DELAY, self.save_cursors)

    def _acked(self, acked: int) -> None:
        """Everything up to ``acked`` is acknowledged: resolve waits. (``acked`` is in the
        file already, or will be soon: see :meth:`_note_cursors`.)"""
        self.upload_acked = acked
        self.in_flight = [(v, s) for v, s in self.in_flight if v > acked]
        self.update_progress()
        for target, fut in list(self.upload_waiters):
            if target <= acked and not fut.done():
                fut.set_result(None)
        self.upload_waiters = [(t, f) for t, f in self.upload_waiters if not f.done()]

    def on_download(self, ev: pc.DownloadReceived) -> None:
        """Apply a DOWNLOAD's changesets and cursors in one local transaction."""
        if not ev.changesets and not ev.objects and ev.bootstrap == BOOTSTRAP_NONE:
            self._note_cursors(ev)
            self._downloaded(ev)
            return
        engine = self.engine
        acked = max(ev.upload_acked, self.upload_acked)
        engine.begin(durable=False)  # no fsync: see docs/local-database.md
        try:
            # a DOWNLOAD's instructions, states and rows are many short-lived objects
            # without cycles: the collector would walk every live object again and again
            # (a third of a whole-app pull's apply); it runs after, if it was on
            with gc_paused:
                for cs in ev.changesets:
                    instructions = unpack_instructions(cs.instructions, cs.origin)
                    engine.apply(instructions)
                    if instructions:
                        engine.observe(max(i.hlc for i in instructions))
                self.flex.apply(ev.objects, ev.bootstrap, ev.query_version, acked, ev.rows)
            cursors: dict[str, int] = {"download_cursor": ev.cursor}
            if acked > self._saved_acked:
                cursors["upload_acked"] = acked
            # exact: every row written (engine.apply, the flex applier's rows, saves and
            # evictions) was recorded with the engine's _touch, so notifiers may patch;
            # skip: this worker pumps uploads and progress below, no need to wake itself
            engine.commit((), exact=True, skip=self._waker, meta=cursors)
        except BaseException:
            engine.rollback()
            raise
        self.download_cursor = ev.cursor
        self._saved_cursor, self._saved_acked = ev.cursor, max(acked, self._saved_acked)
        self._cancel_save()
        if self.disk_full is not None:
            self._space_again()
        self._downloaded(ev)

    def wait_for_space(self, exc: BaseException, operation: str) -> None:
        """The file's disk is full, so what the server sent could not be stored (it was
        rolled back). The session stays active: it leaves the connection at once (nothing
        more is applied out of order), and binds again after a backoff delay, so the
        server sends again from the stored cursor. The error handler hears of it once per
        outage, then every retry is a log line."""
        delay = self._disk_backoff.next_delay(self._disk_rng.random())
        if self.disk_full is None:
            self.disk_full = SyncDiskFullError(
                int(ErrorCode.OTHER_SESSION_ERROR), self.path, operation, str(exc)
            )
            self.report_error(self.disk_full)
        log.info("sync of %s waits for disk space: next try in %.1f s", self.path, delay)
        self.bound = False
        self.in_flight.clear()
        self.upload_sent = self.upload_acked
        self.marks.clear()  # MARK replies are lost; waiters re-ask on rebind
        self.set_conn_state(ConnectionState.CONNECTING)
        conn = self.connection
        if conn is not None:
            conn.hold(self, delay)

    def _space_again(self) -> None:
        """A download was stored after a full disk: the outage is over."""
        log.info("the disk of %s has space again: sync goes on", self.path)
        self.disk_full = None
        self._disk_backoff.reset()

    def _downloaded(self, ev: pc.DownloadReceived) -> None:
        """After a DOWNLOAD was applied: progress, acknowledgements, the next upload."""
        self.server_latest = ev.latest_server_version
        self.downloadable_bytes = ev.downloadable_bytes
        self.down_transferred += ev.size
        self.down_remaining = ev.downloadable_bytes
        self.down_known = True
        if ev.upload_acked > self.upload_acked:
            self._acked(ev.upload_acked)  # in the file, or soon (_note_cursors)
        self.pump_upload()
        self.update_progress()
        self._emit("progress")

    def on_mark(self, ev: pc.MarkReplied) -> None:
        """A MARK reply: everything up to its version has been downloaded and applied."""
        self.update_progress(download_complete=True)
        for fut in self.marks.pop(ev.request_id, []):
            if not fut.done():
                fut.set_result(None)

    def on_session_error(self, ev: pc.ErrorReceived) -> None:
        """A session-level ERROR: report it; retry after a delay unless told to stop."""
        if ev.code == ErrorCode.COMPENSATING_WRITE:  # the session stays bound
            self.report_error(compensating_error(ev.message))
            return
        if ev.code == ErrorCode.CHANGESET_REFUSED:  # integrated as nothing; stays bound
            self.report_error(refused_error(self.engine, ev.message))
            return
        if ev.code == ErrorCode.CLIENT_RESET_NEEDED:
            self.bound = False
            self.client_reset(ev.message)
            return
        if ev.code == ErrorCode.CLOCK_SKEW:
            self._on_clock_skew(ev.message)
        error = SyncError(ev.code, ev.message, ev.action)
        self.report_error(error)
        self.bound = False
        self.marks.clear()  # the suspended session answers none: waiters re-ask on rebind
        if ev.action in (SyncAction.STOP, SyncAction.CLIENT_RESET):
            self.deactivate(f"the server stopped this session: {ev.message}")
            return
        delay = (ev.retry_delay_ms or 1000) / 1000.0
        conn = self.connection
        if conn is not None:
            conn.rebind_later(self, delay)

    def _on_clock_skew(self, message: str) -> None:
        """ERROR 236: the server refused an upload whose timestamps were too far ahead of
        its clock. Learn the offset from the server's time in the error, and re-stamp the
        refused changeset and those after it (the server integrated none of them) at the
        corrected time; the session then binds again and uploads them (the report and
        the rebind follow in :meth:`on_session_error`)."""
        parsed = clock_skew_of(message)
        if parsed is None:
            return
        version, server_ms = parsed
        self.learn_offset(server_ms - store_engine.now_ms())
        self.in_flight.clear()
        self.upload_sent = self.upload_acked
        self.save_cursors()  # the re-stamp reads which changes were acknowledged from the file
        if restamp_unsent(self.engine, self.upload_acked, version, self.engine.now()):
            # the objects were reset and the unsent changes applied again (store/restamp.py):
            # the download starts over, as after a client reset that recovers them
            self._after_reset(True)
        self.flex.reset()  # its cache of the change log holds the old timestamps

    def client_reset(self, message: str) -> None:
        """ERROR 211: reset the file by the configured mode (``client/reset.py``), then
        bind again; manual mode, a failure or too many resets stop the session."""
        mode = self.sync.client_reset
        if not self.reset_guard.allow(mode):
            self.report_error(too_many_error(mode))
            self.deactivate("the server keeps demanding client resets")
            return
        if isinstance(mode, ManualRecovery):
            self.report_error(manual_error(self.engine, message))
            self.deactivate(f"client reset needed (manual recovery): {message}")
            return
        log.warning("client reset of %s (%s): %s", self.path, type(mode).__name__, message)
        self.save_cursors()  # the reset reads which changes were acknowledged from the file
        copy: tuple[Database, str] | None = None
        try:
            if mode.on_before is not None or mode.on_after is not None:
                before_path = backup_copy(self.engine, backup_path_for(self.path, "before"))
                try:
                    copy = (open_copy(self.models, before_path), before_path)
                except BaseException:
                    remove_copy(before_path)
                    raise
            if mode.on_before is not None and copy is not None:
                mode.on_before(copy[0])
            recover = isinstance(mode, RecoverUnsyncedChanges)
            reset_file(self.engine, recover=recover)
        except Exception as exc:
            log.exception("the client reset of %s failed", self.path)
            _drop_copy(copy)
            error = manual_error(self.engine, f"{message} (the automatic reset failed: {exc!r})")
            self.report_error(error)
            self.deactivate(f"the client reset failed: {exc!r}")
            return
        self._after_reset(recover)
        if copy is not None:  # on_after runs once the server's current state is downloaded
            done = self.wait_download()
            done.add_done_callback(lambda f: self._finish_reset(mode, copy, f))
        conn = self.connection
        if conn is not None and self.active:
            conn.rebind_later(self, 0.0)

    def _finish_reset(
        self,
        mode: RecoverUnsyncedChanges | DiscardUnsyncedChanges,
        copy: tuple[Database, str],
        done: asyncio.Future[None],
    ) -> None:
        """Call ``on_after(before, after)`` once the reset file caught up, then delete the
        copy of the old file (also when the session stopped first)."""
        try:
            if done.cancelled() or done.exception() is not None or self.closed:
                return
            if mode.on_after is not None:
                after = open_copy(self.models, self.path)
                try:
                    mode.on_after(copy[0], after)
                finally:
                    after.close()
        except Exception:
            log.exception("the client reset's on_after callback failed")
        finally:
            _drop_copy(copy)

    def _close_gap(self) -> None:
        """After a reset the server may expect a lower next version than the change log's
        first unacknowledged one (its data was wiped, or discarded versions were never
        uploaded): renumber those changesets to follow the server's acknowledged version."""
        self.gap_check = False
        acked = self.upload_acked
        with self.engine.transaction() as conn:
            first = conn.execute(
                "SELECT MIN(version) FROM _changelog WHERE version > ?", (acked,)
            ).fetchone()[0]
            last = int(self.engine.get_meta("last_version", 0) or 0)
            gap = (int(first) if first is not None else last + 1) - (acked + 1)
            if gap > 0:
                conn.execute(
                    "UPDATE _changelog SET version = -(version - ?) WHERE version > ?",
                    (gap, acked),
                )
                conn.execute("UPDATE _changelog SET version = -version WHERE version < 0")
                self.engine.set_meta("last_version", last - gap)
        if gap <= 0:
            return
        log.info("client reset: %s renumbered its changesets by -%d", self.path, gap)
        self.upload_waiters = [(t - gap if t > acked else t, f) for t, f in self.upload_waiters]
        self._up_pending = [(v - gap if v > acked else v, n) for v, n in self._up_pending]
        self._up_scanned = max(acked, self._up_scanned - gap)

    def _after_reset(self, recovered: bool) -> None:
        """Bring the worker's cursors in line with the reset file."""
        self.resets += 1
        self.gap_check = True
        self.download_cursor = 0
        self.upload_acked = 0
        self._saved_cursor = self._saved_acked = 0
        self.upload_sent = 0
        self.in_flight.clear()
        self.flex.reset()
        if not recovered:  # the discarded writes will never be acknowledged
            self.up_transferred += sum(size for _, size in self._up_pending)
            self._up_pending.clear()
            self._up_scanned = int(self.engine.get_meta("last_version", 0) or 0)
            err = ClientResetError("the unsynced changes were discarded by a client reset")
            for _, fut in self.upload_waiters:
                if not fut.done():
                    fut.set_exception(err)
            self.upload_waiters.clear()
        self.update_progress()

    # --- upload --------------------------------------------------------------------------

    def pump_upload(self) -> None:
        """Upload what the change log holds beyond what was sent, within the window."""
        conn = self.connection
        if not (self.active and self.bound and conn is not None and conn.proto is not None):
            return
        if self.hold_uploads:
            return
        if self.gap_check and self.upload_sent == self.upload_acked:
            self._close_gap()
        proto = conn.proto
        assert self.session_no is not None
        sent_any = False
        while sum(s for _, s in self.in_flight) < UPLOAD_WINDOW_BYTES:
            entries = self.engine.read_changelog(self.upload_sent, UPLOAD_BATCH_BYTES)
            if not entries:
                break
            batch = [UploadChangeset(v, data) for v, data in entries]
            try:  # a changeset larger than a frame goes in parts (protocol/parts.py)
                proto.upload(self.session_no, batch, self.download_cursor)
            except LocalProtocolError as exc:  # only an old (v2) server cannot take it
                if not self.upload_blocked:
                    self.upload_blocked = True
                    self.report_error(
                        SyncError(int(ErrorCode.LIMITS_EXCEEDED), str(exc), SyncAction.RETRY)
                    )
                break
            self.upload_sent = entries[-1][0]
            self.in_flight.extend((v, len(d)) for v, d in entries)
            sent_any = True
        if sent_any:
            conn.flush_soon()

    # --- waits (sync loop side) ----------------------------------------------------------

    def wait_upload(self, target: int) -> asyncio.Future[None]:
        """A future done when every local version up to ``target`` is acknowledged."""
        fut: asyncio.Future[None] = self.loop.create_future()
        if not self.active:
            fut.set_exception(SessionInactiveError(self.inactive_reason))
        elif target <= self.upload_acked:
            fut.set_result(None)
        else:
            self.upload_waiters.append((target, fut))
            self._pump_reporting()  # the future is returned whatever happens
        return fut

    def wait_download(self) -> asyncio.Future[None]:
        """A future done when everything the server holds now is applied locally."""
        fut: asyncio.Future[None] = self.loop.create_future()
        if not self.active:
            fut.set_exception(SessionInactiveError(self.inactive_reason))
            return fut
        self.download_waiters.append(fut)
        fut.add_done_callback(lambda f: self._drop_waiter(f))
        if self.bound:
            self._send_mark()
        return fut

    def _drop_waiter(self, fut: asyncio.Future[None]) -> None:
        if fut in self.download_waiters:
            self.download_waiters.remove(fut)

    def _send_mark(self) -> None:
        conn = self.connection
        if conn is None or conn.proto is None or self.session_no is None:
            return
        waiting = [f for f in self.download_waiters if not f.done() and not _in_marks(self, f)]
        if not waiting:
            return
        request_id = conn.proto.mark(self.session_no)
        self.marks[request_id] = waiting
        conn.flush_soon()


class _ProgressListener:
    """A progress listener as the sync loop keeps it: ``deliver`` gets each value, ``end``
    is called once when the listener is finished (done, or the session closed)."""

    def __init__(
        self,
        direction: ProgressDirection,
        mode: ProgressMode,
        deliver: Callable[[SyncProgress], None],
        end: Callable[[], None] | None = None,
        *,
        from_start: bool = False,
    ) -> None:
        self.direction = direction
        self.mode = mode
        self._deliver = deliver
        self._end = end
        self.from_start = from_start
        self.tracker: ProgressTracker | None = None
        self.cancelled = False
        self.ended = False

    def deliver(self, progress: SyncProgress) -> None:
        """Hand a value to the listener (errors in it are logged, never raised here)."""
        if self.cancelled:
            return
        try:
            self._deliver(progress)
        except Exception:
            log.exception("a progress listener failed")

    def end(self) -> None:
        """Tell the listener no more values come (once)."""
        if self.ended:
            return
        self.ended = True
        if self._end is not None:
            try:
                self._end()
            except Exception:
                log.exception("a progress listener failed")


def _drop_copy(copy: tuple[Database, str] | None) -> None:
    """Close and delete the reset's copy of the old file."""
    if copy is not None:
        try:
            copy[0].close()
        finally:
            remove_copy(copy[1])


def _in_marks(worker: SessionWorker, fut: asyncio.Future[None]) -> bool:
    return any(fut in futs for futs in worker.marks.values())


class Connection:
    """One WebSocket to the server for one user, shared by all of that user's sessions."""

    def __init__(self, client: SyncClient, user: User) -> None:
        self.client = client
        self.user = user
        self.timeouts = client.timeouts
        self.workers: dict[int, SessionWorker] = {}
        self.proto: pc.ClientProtocol | None = None
        self.ws: ClientConnection | None = None
        self.state = ConnectionState.DISCONNECTED
        self.closed = False
        self._next_session = 1
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._flush_pending = False
        self._send_lock = asyncio.Lock()
        self._backoff = Backoff(
            self.timeouts.reconnect_initial_delay, self.timeouts.reconnect_max_delay
        )
        self._rng = random.Random()
        self._linger: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_pong = 0.0
        self._pong = asyncio.Event()
        self._urgent_ping_at: float | None = None
        self._urgent_check: asyncio.TimerHandle | None = None
        self._reconnect_at_once = False
        self._server_delay: float | None = None
        self._error_reported = False
        self._target = host_and_port(client.app.base_url)
        #: failed attempts since the last good connection, and whether that outage's one
        #: INFO (or WARNING) line was logged (docs/sync-session.md, "Logging")
        self.outage_failures = 0
        self._outage_logged = False
        self._failure: str | None = None  # why this attempt failed, in words
        self._rebinds: dict[SessionWorker, asyncio.TimerHandle] = {}
        self._unbinding: dict[int, SessionWorker] = {}  # session no -> worker to rebind
        self._detaching: dict[str, int] = {}  # file ident -> session no of its UNBIND in flight
        self._bind_after_unbound: dict[int, SessionWorker] = {}  # old session no -> worker
        self.connected_at: float | None = None
        self.disconnected_at: float | None = None
        #: connection attempts made (for tests and diagnostics)
        self.attempts = 0
        #: the server's time minus this machine's (ms), measured at the last WELCOME
        self.clock_offset: int | None = None

    # --- sessions ------------------------------------------------------------------------

    def attach(self, worker: SessionWorker) -> None:
        """Add a session; binds it now if connected, else (re)connects."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        no = self._next_session
        self._next_session += 1
        self.workers[no] = worker
        worker.session_no = no
        if self.state is ConnectionState.CONNECTED and self.proto is not None:
            self._worker_call(no, self._learn_offset)
            if self.workers.get(no) is not worker:  # a failure there stopped the session
                return
            unbinding = self._detaching.get(worker.file_ident)
            if unbinding is not None and self.proto.has_session(unbinding):
                # paused and resumed before the server confirmed the UNBIND: the file binds
                # again once UNBOUND arrives (a file is bound once per connection)
                worker.on_connecting()
                self._bind_after_unbound[unbinding] = worker
                return
            worker.bind(self.proto, no)
            self.flush_soon()
        else:
            worker.on_connecting()
            self._ensure_running(immediate=True)

    def _learn_offset(self, worker: SessionWorker) -> None:
        if self.clock_offset is not None:
            worker.learn_offset(self.clock_offset)

    def detach(self, worker: SessionWorker) -> None:
        """Remove a session (unbinding it if bound); the socket lingers, then closes."""
        pending = self._rebinds.pop(worker, None)
        if pending is not None:
            pending.cancel()
        no = worker.session_no
        if no is None or self.workers.get(no) is not worker:
            if pending is not None and not self.workers and self._linger is None:
                self._linger = self.client.loop.call_later(  # it was held (see hold)
                    self.timeouts.connection_linger_time, self._linger_expired
                )
            return
        del self.workers[no]
        self._unbind(worker, no)
        if not self.workers:
            self._linger = self.client.loop.call_later(
                self.timeouts.connection_linger_time, self._linger_expired
            )

    def _linger_expired(self) -> None:
        self._linger = None
        if not self.workers:
            self._spawn(self._drop_idle())

    def rebind_later(self, worker: SessionWorker, delay: float) -> None:
        """Re-bind a session after a session-level error (a new session number);
        ``App.reconnect()`` cuts the delay short."""
        old = self._rebinds.pop(worker, None)
        if old is not None:
            old.cancel()
        self._rebinds[worker] = self.client.loop.call_later(delay, self._rebind, worker)

    def hold(self, worker: SessionWorker, delay: float) -> None:
        """Take a session off the connection for ``delay`` seconds (its file cannot store
        downloads now): UNBIND it at once and drop what still comes for it, so nothing is
        applied past the stored cursor; then bind it again (``App.reconnect()`` cuts the
        delay short)."""
        no = worker.session_no
        if no is not None and self.workers.get(no) is worker:
            del self.workers[no]
            self._unbind(worker, no)
        self.rebind_later(worker, delay)

    def _unbind(self, worker: SessionWorker, no: int) -> None:
        """Send UNBIND for session ``no`` (if the connection still has it) and note that
        ``worker``'s file waits for the UNBOUND before it may bind again."""
        proto = self.proto
        if proto is not None and proto.has_session(no):
            try:
                proto.unbind(no)
                self._detaching[worker.file_ident] = no
                self.flush_soon()
            except ProtocolError:
                pass

    def _rebind(self, worker: SessionWorker) -> None:
        self._rebinds.pop(worker, None)
        if worker.active and worker.connection is self:
            no = worker.session_no
            proto = self.proto
            if no is not None and proto is not None and proto.has_session(no):
                try:  # the suspended session must end (UNBOUND) before the file binds again
                    proto.unbind(no)
                except ProtocolError:
                    pass
                else:
                    self._unbinding[no] = worker  # attached again on UNBOUND
                    self.flush_soon()
                    return
            if no is not None and self.workers.get(no) is worker:
                del self.workers[no]
            self.attach(worker)

    def _on_unbound(self, session: int) -> None:
        for ident, no in list(self._detaching.items()):
            if no == session:
                del self._detaching[ident]
        waiting = self._bind_after_unbound.pop(session, None)
        if waiting is not None and waiting.active and waiting.connection is self:
            new_no = waiting.session_no
            if new_no is not None and self.workers.get(new_no) is waiting and self.proto:
                waiting.bind(self.proto, new_no)
                self.flush_soon()
        worker = self._unbinding.pop(session, None)
        if worker is not None and self.workers.get(session) is worker:
            del self.workers[session]
            if worker.active and worker.connection is self:
                self.attach(worker)

    # --- running -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # never lost: logged, reported, and the connection retried
            log.error("a sync task failed", exc_info=exc)
            words = describe_failure(exc, self._target)
            self._report(
                SyncError(
                    int(ErrorCode.OTHER_ERROR), f"a sync task failed: {words}", SyncAction.RETRY
                )
            )
            if self.ws is not None:
                self.ws.transport.abort()

    def _report(self, error: SyncError) -> None:
        for w in list(self.workers.values()):
            w.report_error(error)

    def connection_failed(self, error: SyncError) -> None:
        """Report a connection failure that will be retried: to every session's error
        handler, and to the log once per outage (INFO with a handler, WARNING without)
        and at DEBUG for every retry after; the outage ends at the next WELCOME."""
        self.outage_failures += 1
        self._failure = error.message
        workers = list(self.workers.values())
        if self._outage_logged:
            level = logging.DEBUG
        else:
            handled = any(w.has_error_handler() for w in workers)
            level = logging.INFO if handled else logging.WARNING
            self._outage_logged = True
        log.log(
            level,
            "sync connection to %s failed: %s (attempt %d since the last good connection)",
            self.client.app.base_url,
            error.message,
            self.outage_failures,
        )
        for w in workers:
            w.report_error(error, logged=True)

    def _connected(self) -> None:
        if self.outage_failures:
            log.info(
                "sync connection to %s is up again after %d failed attempts",
                self.client.app.base_url,
                self.outage_failures,
            )
        self.outage_failures = 0
        self._outage_logged = False

    def _ensure_running(self, immediate: bool = False) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        elif immediate:
            self._wake.set()

    def reconnect_now(self) -> None:
        """Reset the backoff and try at once (also cutting short a server-prescribed delay
        and session retry delays); probe an open connection with an urgent ping."""
        self._backoff.reset()
        self._server_delay = None
        for worker, handle in list(self._rebinds.items()):
            handle.cancel()
            self._rebind(worker)
        if not self.workers:
            return
        if self.state is ConnectionState.CONNECTED and self.proto is not None:
            self._urgent_ping()
        else:
            self._ensure_running(immediate=True)
            self._wake.set()

    def _urgent_ping(self) -> None:
        proto, ws = self.proto, self.ws
        if proto is None or ws is None or self._urgent_ping_at is not None:
            return
        sent_at = time.monotonic()
        self._urgent_ping_at = sent_at
        proto.ping(int(time.time() * 1000))
        self.flush_soon()
        wait = self.timeouts.reconnect_urgent_ping_timeout

        def check() -> None:
            self._urgent_check = None
            if self._urgent_ping_at == sent_at and self.ws is ws:
                self._urgent_ping_at = None
                self.connection_failed(
                    SyncError(
                        int(ErrorCode.CONNECTION_CLOSED),
                        f"no answer to an urgent ping within {wait} s: the connection is dead",
                        SyncAction.RETRY,
                    )
                )
                self._error_reported = True
                self._reconnect_at_once = True
                ws.transport.abort()

        self._urgent_check = self.client.loop.call_later(wait, check)

    def set_state(self, state: ConnectionState) -> None:
        """Record the connection's state."""
        self.state = state

    async def _run(self) -> None:
        while self.workers and not self.closed:
            self.set_state(ConnectionState.CONNECTING)
            for w in list(self.workers.values()):
                w.on_connecting()
            worked = False
            self._error_reported = False
            self._failure = None
            self._reconnect_at_once = False
            self.attempts += 1
            try:
                worked = await self._connect_and_serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure ends this attempt; we retry
                words = describe_failure(exc, self._target)
                if not self._error_reported and self.workers and not self.closed:
                    self.connection_failed(
                        SyncError(int(ErrorCode.CONNECTION_CLOSED), words, SyncAction.RETRY)
                    )
                else:  # reported already (a dead ping, a server ERROR) or dropped on purpose
                    log.debug("sync connection to %s ended: %s", self.client.app.base_url, words)
            finally:
                self.ws = None
                self.proto = None
                self._detaching.clear()  # a new connection binds every attached session
                self._bind_after_unbound.clear()
                self._urgent_ping_at = None
                if self._urgent_check is not None:
                    self._urgent_check.cancel()
                    self._urgent_check = None
                if self.connected_at is not None:
                    self.disconnected_at = time.monotonic()
                    self.connected_at = None
                self.set_state(ConnectionState.DISCONNECTED)
                self._unbinding.clear()  # those workers bind afresh on the next connection
                for w in list(self.workers.values()):
                    w.on_disconnected(self._failure)
            if not self.workers or self.closed:
                break
            if worked:
                self._backoff.reset()
            delay = self._backoff.next_delay(self._rng.random())
            if self._server_delay is not None:  # the server prescribed the delay
                delay = min(self._server_delay, self.timeouts.reconnect_max_delay)
                self._server_delay = None
            if self._wake.is_set() or self._reconnect_at_once:
                delay = 0.0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()
        for w in list(self.workers.values()):
            w.set_conn_state(ConnectionState.DISCONNECTED)

    async def _connect_and_serve(self) -> bool:
        """One connection attempt and, if it opens, its whole life. Returns True if the
        connection was established and stayed up (so the backoff restarts)."""
        timeouts = self.timeouts
        token = await self.user.valid_access_token()
        ws = await asyncio.wait_for(
            connect(
                self.client.app.sync_url(),
                ssl=self.client.app.ssl_context()
                if self.client.app.sync_url().startswith("wss://")
                else None,
                max_size=None,
                ping_interval=None,
                compression=None,
                open_timeout=timeouts.connect_timeout,
                close_timeout=2,
            ),
            timeouts.connect_timeout,
        )
        self.ws = ws
        proto = pc.ClientProtocol()
        self.proto = proto
        sent_at = store_engine.now_ms()
        proto.start(token)
        await self._flush()
        try:
            first = await asyncio.wait_for(ws.recv(decode=False), timeouts.connect_timeout)
            received_at = store_engine.now_ms()
            events = proto.receive_data(first)
            for ev in events:
                if isinstance(ev, pc.ErrorReceived):
                    await self._on_connection_error(ev)
                    return False
                if isinstance(ev, pc.Welcomed):
                    self.clock_offset = measure_offset(ev.server_time_ms, sent_at, received_at)
            self.set_state(ConnectionState.CONNECTED)
            self._connected()
            now = time.monotonic()
            gone = self.disconnected_at
            slow = gone is not None and now - gone > timeouts.fast_reconnect_limit
            self.connected_at = now
            self._last_pong = now
            for no, w in list(self.workers.items()):
                self._worker_call(no, self._learn_offset)
                if self.workers.get(no) is w:  # (a failure there stopped the session)
                    w.bind(proto, no, slow_reconnect=slow)
            await self._flush()
            keepalive = asyncio.ensure_future(self._keepalive())
            refresher = asyncio.ensure_future(self._token_refresher())
            try:
                async for frame in ws:
                    if isinstance(frame, str):
                        raise ProtocolError("the server sent a text frame")
                    with gc_paused:  # decoding: many objects, no cycles (see on_download)
                        events = proto.receive_data(frame)
                    for ev in events:
                        await self._dispatch(ev)
                    await self._flush()
            finally:
                keepalive.cancel()
                refresher.cancel()
                await asyncio.gather(keepalive, refresher, return_exceptions=True)
            return self._stayed_up()
        except ProtocolError as exc:
            code = error_code_of(exc) if hasattr(exc, "code") else None  # type: ignore[arg-type]
            log.warning("the server broke the protocol (%s): %s", code, exc)
            self._failure = f"the server broke the protocol: {exc}"
            self._report(SyncError(int(code or 101), str(exc), SyncAction.RETRY))
            self._error_reported = True
            return False
        finally:
            await ws.close()

    def _stayed_up(self) -> bool:
        if self.connected_at is None:
            return False
        return time.monotonic() - self.connected_at >= 1.0

    async def _on_connection_error(self, ev: pc.ErrorReceived) -> None:
        if ev.action is SyncAction.REFRESH_TOKEN or ev.code in (113, 114):
            try:
                await self.user.refresh_access_token()
                self._wake.set()  # reconnect at once with the new token
                return
            except AuthError as exc:
                error = SyncError(
                    ev.code, f"{ev.message} (refreshing failed: {exc})", SyncAction.STOP
                )
                for w in list(self.workers.values()):
                    w.report_error(error)
                    w.deactivate(str(error))
                return
        error = SyncError(ev.code, ev.message, ev.action)
        if ev.action is SyncAction.RETRY:
            self.connection_failed(error)
        else:
            self._failure = error.message
            self._report(error)
        self._error_reported = True
        if ev.action is SyncAction.STOP:
            for w in list(self.workers.values()):
                w.deactivate(f"the server stopped the connection: {ev.message}")
        if ev.retry_delay_ms:
            self._server_delay = ev.retry_delay_ms / 1000.0

    def _worker_call(
        self,
        session: int,
        fn: Callable[[SessionWorker], None],
        what: str = "storing what the server sent",
    ) -> None:
        """Run a worker's handler. If its file's disk is full, the session waits for space
        and tries again (:meth:`SessionWorker.wait_for_space`); if it fails otherwise (the
        local file cannot take the data), that session stops with a reported fatal error.
        The other sessions go on."""
        w = self.workers.get(session)
        if w is None:
            return
        try:
            fn(w)
        except Exception as exc:
            if w.active and is_disk_full(exc, w.path):
                w.wait_for_space(exc, what)
                return
            log.exception("sync session %s failed", w.path)
            w.report_error(
                SyncError(
                    int(ErrorCode.OTHER_SESSION_ERROR),
                    f"the session failed and was stopped: {exc!r}",
                    SyncAction.STOP,
                )
            )
            w.deactivate(f"the session failed: {exc!r}")

    async def _dispatch(self, ev: pc.ClientEvent) -> None:
        if isinstance(ev, pc.DownloadReceived):
            self._worker_call(ev.session, lambda w: w.on_download(ev), "applying a download")
        elif isinstance(ev, pc.SessionBound):
            self._worker_call(ev.session, lambda w: w.on_bound(ev))
        elif isinstance(ev, pc.MarkReplied):
            self._worker_call(ev.session, lambda w: w.on_mark(ev))
        elif isinstance(ev, pc.SessionUnbound):
            self._on_unbound(ev.session)
        elif isinstance(ev, pc.QueryErrorReceived):
            self._worker_call(ev.session, lambda w: w.on_query_error(ev))
        elif isinstance(ev, pc.ErrorReceived):
            if ev.session is None:
                await self._on_connection_error(ev)
                if self.ws is not None:
                    await self.ws.close()
            else:
                self._worker_call(ev.session, lambda w: w.on_session_error(ev))
        elif isinstance(ev, PongReceived):
            self._last_pong = time.monotonic()
            self._urgent_ping_at = None
            self._pong.set()

    async def _keepalive(self) -> None:
        """Ping every ``ping_keep_alive_period``; a ping unanswered within
        ``pong_keep_alive_timeout`` means the connection is dead (silent network, half-open
        socket): report it and drop the socket so the reconnect starts."""
        timeouts = self.timeouts
        while True:
            await asyncio.sleep(timeouts.ping_keep_alive_period)
            proto, ws = self.proto, self.ws
            if proto is None or ws is None:
                return
            self._pong.clear()
            proto.ping(int(time.time() * 1000))
            await self._flush()
            try:
                await asyncio.wait_for(self._pong.wait(), timeouts.pong_keep_alive_timeout)
            except TimeoutError:
                self.connection_failed(
                    SyncError(
                        int(ErrorCode.CONNECTION_CLOSED),
                        f"no answer to a ping within {timeouts.pong_keep_alive_timeout} s: "
                        "the connection is dead",
                        SyncAction.RETRY,
                    )
                )
                self._error_reported = True
                ws.transport.abort()
                return

    async def _token_refresher(self) -> None:
        while True:
            exp = self.user.access_token_expires_at()
            if not exp:
                return
            await asyncio.sleep(max(0.5, (exp - time.time()) * 0.8))
            try:
                token = await self.user.refresh_access_token()
            except AuthError as exc:
                log.warning("refreshing the access token failed: %s", exc)
                return
            if self.proto is None:
                return
            self.proto.refresh(token)
            await self._flush()

    def flush_soon(self) -> None:
        """Write out queued frames soon (coalescing several calls)."""
        if self._flush_pending:
            return
        self._flush_pending = True
        self._spawn(self._flush())

    async def _flush(self) -> None:
        self._flush_pending = False
        proto, ws = self.proto, self.ws
        if proto is None or ws is None:
            return
        async with self._send_lock:
            for frame in proto.data_to_send():
                try:
                    await ws.send(frame)
                except websockets.ConnectionClosed:
                    return

    async def _drop_idle(self) -> None:
        """Close a connection no session used for the linger time. A session that attached
        meanwhile keeps it; a drop on purpose is not reported as a failed connection."""
        ws = self.ws
        if ws is None or self.workers:
            return
        log.info("dropping the sync connection: no sessions left")
        self._error_reported = True
        ws.transport.abort()

    async def close(self) -> None:
        """Close the socket and stop every task of this connection."""
        self.closed = True
        for w in [*self.workers.values(), *self._rebinds]:  # with those held (see hold)
            w.deactivate("the sync client was closed")
        self.workers.clear()
        if self._linger is not None:
            self._linger.cancel()
        if self._urgent_check is not None:
            self._urgent_check.cancel()
        for handle in self._rebinds.values():
            handle.cancel()
        self._rebinds.clear()
        if self.ws is not None:
            await self.ws.close()
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["ConnectionState", "SessionWorker", "SyncClient", "TidesyncError"]
