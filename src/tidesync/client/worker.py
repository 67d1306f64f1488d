"""One synced database's side of the sync thread: the executor of its session core.

A :class:`SessionWorker` owns a :class:`~tidesync.protocol.session.SessionProtocol` (the
pure session machine: phase, cursors, uploads in flight, waiters) and carries out the
instructions it returns with the things the core may not touch: the file's
:class:`~tidesync.store.engine.StoreEngine` (applying downloads, reading the change log,
storing cursors, resets), the user's :class:`~tidesync.client.syncclient.Connection` (the
socket), the loop's timers and the app's callbacks (error handlers, progress listeners,
connection-state listeners). docs/architecture.md, "The client session core".
Everything here runs on the sync thread. (About 840 lines, one class: the executor of
every instruction kind; progress listeners are in progress.py, the reset procedure in
reset.py, the decisions in the core.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..core.backoff import Backoff
from ..core.packing import unpack_instructions
from ..core.progress import ProgressDirection, ProgressTracker
from ..errors import (
    DatabaseClosedError,
    LocalProtocolError,
    SyncAction,
    SyncDiskFullError,
    SyncError,
    TidesyncError,
)
from ..protocol import client as pc
from ..protocol import session as ps
from ..protocol.messages import BOOTSTRAP_NONE, ErrorCode, UploadChangeset, clock_skew_of
from ..protocol.session import (
    UPLOAD_BATCH_BYTES,
    ConnectionState,
    Instruction,
    ResetMode,
    SessionProtocol,
)
from ..store import engine as store_engine
from ..store.engine import StoreEngine, add_waker, remove_waker
from ..store.restamp import clock_ahead, restamp_unsent
from ..support.diskfull import is_disk_full
from ..support.gcpause import gc_paused
from .progress import ProgressListener, UploadCounter
from .refusals import refused_error
from .reset import (
    DiscardUnsyncedChanges,
    ManualRecovery,
    RecoverUnsyncedChanges,
    backup_copy,
    backup_path_for,
    drop_copy,
    manual_error,
    open_copy,
    remove_copy,
    reset_file,
)
from .subscriptions import (
    FlexApplier,
    SubscriptionSetState,
    compensating_error,
    latest_row,
    query_error,
)

if TYPE_CHECKING:
    from .config import SyncConfiguration
    from .database import Database
    from .session import Session
    from .syncclient import Connection, SyncClient

log = logging.getLogger("tidesync.sync")

#: Seconds a DOWNLOAD that only moves the cursors (an acknowledgement of this device's own
#: upload) waits before they are written to the file; sooner if another transaction comes.
CURSOR_SAVE_DELAY = 0.5
#: Longest wait between two tries of a session whose file's disk is full (the waits start
#: at ``reconnect_initial_delay`` and double, also capped by ``reconnect_max_delay``).
DISK_FULL_MAX_DELAY = 30.0
#: A clock offset measured at WELCOME is written to the file only when it differs from
#: the stored one by more than this (ms): measurements of a right clock differ by noise.
OFFSET_TOLERANCE_MS = 250


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


def _reset_mode(mode: object) -> ResetMode:
    if isinstance(mode, ManualRecovery):
        return ResetMode.MANUAL
    if isinstance(mode, DiscardUnsyncedChanges):
        return ResetMode.DISCARD
    return ResetMode.RECOVER


class SessionWorker:
    """The sync-thread side of one synced database: executes its :class:`SessionProtocol`."""

    def __init__(self, client: SyncClient, db: Database, sync: SyncConfiguration) -> None:
        self.client = client
        self.loop = client.loop
        self.clock = client.clock
        self.user = sync.user
        self.sync = sync
        self.path = db.path
        self.session: Session | None = None
        self.engine = StoreEngine(db.path, db.schemas)
        self.flex = FlexApplier(self.engine)  # flexible sync (client/subscriptions.py)
        self.query_sent = 0  # subscription set version sent on the current binding
        self.schema = [s.to_dict() for s in db.schemas.values()]
        self.file_ident = self.engine.origin
        acked = int(self.engine.get_meta("upload_acked", 0) or 0)
        cursor = int(self.engine.get_meta("download_cursor", 0) or 0)
        #: the session's state machine (protocol/session.py): this worker carries out what
        #: it returns
        self.core = SessionProtocol(cursor, acked)
        # the cursors as the file holds them; memory may be ahead (see _note_cursors)
        self._saved_cursor, self._saved_acked = cursor, acked
        self._save_timer: asyncio.TimerHandle | None = None
        self._rebind_timer: asyncio.TimerHandle | None = None
        self._waits: dict[int, asyncio.Future[None]] = {}  # the core's waiter keys
        self._next_key = 0
        self.session_no: int | None = None
        self.connection: Connection | None = None
        self.conn_state = ConnectionState.DISCONNECTED
        # upload progress counters (cumulative, since this worker started; core/progress.py)
        self.uploads = UploadCounter(acked)
        self.progress_listeners: list[ProgressListener] = []
        self.models = db.config.models  # for the client reset callbacks' copies
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

    # --- the core's state, read -----------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the session syncs (started, not paused, stopped or closed)."""
        return self.core.active

    @property
    def closed(self) -> bool:
        """Whether the session ended for good."""
        return self.core.phase is ps.SessionPhase.CLOSED

    @property
    def bound(self) -> bool:
        """Whether the current binding is BOUND."""
        return self.core.is_bound

    @property
    def upload_acked(self) -> int:
        """The newest local version the server acknowledged."""
        return self.core.upload_acked

    @property
    def download_cursor(self) -> int:
        """The server version downloaded and applied."""
        return self.core.download_cursor

    @property
    def server_latest(self) -> int:
        """The server's latest version, as last heard."""
        return self.core.server_latest

    @property
    def hold_uploads(self) -> bool:
        """Whether uploads wait for the download to catch up (after a slow reconnect)."""
        return self.core.holding_uploads

    @property
    def held_upload_count(self) -> int:
        """How many slow reconnects held uploads back."""
        return self.core.held_count

    @property
    def resets(self) -> int:
        """Automatic client resets done (for tests and diagnostics)."""
        return self.core.resets

    @property
    def inactive_reason(self) -> str:
        """Why the session is inactive (what a wait started meanwhile fails with)."""
        return self.core.inactive_reason

    # --- executing the core's instructions -------------------------------------------------

    def run(self, instructions: Sequence[Instruction]) -> None:
        """Carry out the core's instructions, in order."""
        for instruction in instructions:
            self._do(instruction)

    def _do(self, ins: Instruction) -> None:
        match ins:
            case ps.SendUploads():
                self.pump_upload()
            case ps.Progress(download_complete=complete):
                self.update_progress(complete)
            case ps.ResolveWaiter(key=key):
                fut = self._waits.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            case ps.FailWaiter(key=key, error=error):
                fut = self._waits.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_exception(error)
            case ps.SendMark(waiters=keys):
                self._send_mark(keys)
            case ps.SendBind(download_cursor=cursor, upload_acked=acked):
                self._send_bind(cursor, acked)
            case ps.SendQuery():
                self.send_query()
            case ps.ConnectionChanged(state=state, reason=reason):
                self.set_conn_state(state, reason)
            case ps.StoreAcked(upload_acked=acked):
                self._store_acked(acked)
            case ps.SaveCursors():
                self.save_cursors()
            case ps.Bound():
                self._set_clock_back()
            case ps.Attach():
                self.connection = self.client.connection_for(self.user)
                self.connection.attach(self)
            case ps.Detach():
                if self.connection is not None:
                    self.connection.detach(self)
            case ps.Unbind():
                if self.connection is not None:
                    self.connection.unbind(self)
            case ps.RebindAfter(delay=delay):
                self._cancel_rebind()
                if not self.closed:
                    self._rebind_timer = self.loop.call_later(delay, self._rebind_due)
            case ps.ResetFile(recover=recover, message=message):
                self._reset_file(recover, message)
            case ps.ReportError(error=error):
                self.report_error(error)
            case ps.ReportManualReset(message=message):
                self.report_error(manual_error(self.engine, message))
            case _:  # pragma: no cover (the match is exhaustive)
                raise AssertionError(f"unknown instruction {ins!r}")

    def _run_reporting(self, instructions: Sequence[Instruction]) -> bool:
        """:meth:`run`; a failure is logged and reported, never raised (False)."""
        try:
            self.run(instructions)
        except Exception as exc:
            log.exception("sync session %s: uploading failed", self.path)
            self.report_error(
                SyncError(int(ErrorCode.OTHER_SESSION_ERROR), repr(exc), SyncAction.RETRY)
            )
            return False
        return True

    def _new_wait(self) -> tuple[int, asyncio.Future[None]]:
        self._next_key += 1
        key = self._next_key
        fut: asyncio.Future[None] = self.loop.create_future()
        self._waits[key] = fut
        fut.add_done_callback(lambda _: self._forget(key))
        return key, fut

    def _forget(self, key: int) -> None:
        """A wait ended (resolved, failed or cancelled by its caller)."""
        self._waits.pop(key, None)
        self.core.forget(key)

    # --- lifecycle (sync loop) -----------------------------------------------------------

    def activate(self) -> None:
        """Start (or resume) syncing: attach to the user's connection."""
        self.run(self.core.activate())

    def deactivate(self, reason: str) -> None:
        """Stop syncing (pause or close): detach and fail pending waits."""
        self._cancel_rebind()
        self.run(self.core.pause(reason))

    def close(self) -> None:
        """End the session for good and close its engine."""
        if self.closed:
            return
        self.deactivate("the database was closed")
        self.run(self.core.close())
        remove_waker(self.path, self._waker)  # type: ignore[arg-type]
        listeners, self.progress_listeners = self.progress_listeners, []
        for listener in listeners:
            listener.end()
        self.engine.close()

    def _cancel_rebind(self) -> None:
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
            self._rebind_timer = None

    def _rebind_due(self) -> None:
        self._rebind_timer = None
        now = self.clock()
        left = self.core.rebind_due_in(now)
        if left is not None and left > 0:  # the loop's timer fired a little early
            self._rebind_timer = self.loop.call_later(left, self._rebind_due)
            return
        self.run(self.core.tick(now))

    def rebind_now(self) -> None:
        """Cut a rebind delay short (``App.reconnect()``)."""
        if self._rebind_timer is not None:
            self._cancel_rebind()
            self.run(self.core.rebind_now(self.clock()))

    # --- progress ------------------------------------------------------------------------

    def _on_local_commit(self) -> None:
        """A local transaction committed (called on the sync loop): upload it. A failure
        is reported to the error handler, never left to the loop's exception handler."""
        if self.closed:
            return
        self._run_reporting(self.core.local_committed())

    def counters(self, direction: ProgressDirection) -> tuple[int, int, bool]:
        """``(transferred, transferable, known)`` for a direction (cumulative bytes)."""
        if direction is ProgressDirection.UPLOAD:
            up = self.uploads
            if not self.closed:
                up.scan(self.engine, self.core.upload_acked)
            return up.transferred, up.transferable, True
        # flexible sync: a subscription set the server has not answered makes the download
        # unknown, one being bootstrapped is never finished before its last page
        # (client/subscriptions.py; docs/flexible-sync.md "Progress")
        core = self.core
        sub_state = self.flex.download_state() if not self.closed else None
        if sub_state is SubscriptionSetState.PENDING:
            return core.down_transferred, core.down_transferred, False
        remaining = core.down_remaining
        if sub_state is SubscriptionSetState.BOOTSTRAPPING:
            remaining = max(remaining, 1)
        return core.down_transferred, core.down_transferred + remaining, core.down_known

    def _position(self, direction: ProgressDirection) -> tuple[int, int]:
        """``(download cursor, server's latest version)`` for the download (the outstanding
        work is done once the cursor reaches the latest version of when it was fixed;
        core/progress.py); ``(0, 0)`` for the upload, whose bytes are exact."""
        if direction is ProgressDirection.UPLOAD:
            return 0, 0
        return self.core.download_cursor, self.core.server_latest

    def add_progress_listener(self, listener: ProgressListener) -> None:
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

    def remove_progress_listener(self, listener: ProgressListener) -> None:
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
        self, listener: ProgressListener, t: int, total: int, known: bool, complete: bool
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
        self.run(self.core.connecting())

    def on_disconnected(self, reason: str | None = None) -> None:
        """The connection dropped (``reason``: why, in words); uploads not acknowledged
        will be sent again."""
        self.run(self.core.disconnected(reason))

    def on_connected(self, slow_reconnect: bool = False) -> None:
        """The connection is open with this session on it: bind (or wait for the UNBOUND of
        the file's previous session). After a slow reconnect (offline longer than
        ``fast_reconnect_limit``) uploads wait until the download caught up."""
        conn = self.connection
        awaited = self.core.unbound_awaited
        still_unbinding = (
            awaited is not None
            and conn is not None
            and conn.proto is not None
            and conn.proto.has_session(awaited)
        )
        self.run(self.core.connected(slow=slow_reconnect, unbind_open=still_unbinding))

    def on_unbound(self, session_no: int) -> None:
        """UNBOUND arrived for one of this file's former session numbers."""
        self.run(self.core.unbound(session_no))

    def _send_bind(self, download_cursor: int, upload_acked: int) -> None:
        conn, no = self.connection, self.session_no
        if conn is None or conn.proto is None or no is None:
            return
        last_version = int(self.engine.get_meta("last_version", 0) or 0)
        conn.proto.bind(
            no,
            self.file_ident,
            self.schema,
            download_cursor,
            upload_acked,
            local_version=last_version,
            flexible=self.flex.flexible(),
        )
        self.query_sent = 0
        self.flex.reset()
        conn.flush_soon()

    def send_query(self) -> None:
        """Send the newest subscription set as QUERY if this binding has not sent it yet."""
        conn = self.connection
        if self.closed or conn is None or conn.proto is None or self.session_no is None:
            return
        if not self.core.is_bound or not conn.proto.has_session(self.session_no):
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
        acked = self.core.upload_acked
        if last_version <= acked and clock_ahead(engine, engine.now()):
            restamp_unsent(engine, acked, last_version + 1, engine.now())

    def on_bound(self, ev: pc.SessionBound) -> None:
        """BOUND: the server's view of our uploads; start uploading and re-ask marks."""
        self.run(self.core.bound(ev.server_version, ev.upload_acked))

    # --- cursors -------------------------------------------------------------------------

    def _persist(self, *, durable: bool = True, **values: int) -> None:
        engine = self.engine
        with engine.transaction(durable=durable):
            for k, v in values.items():
                engine.set_meta(k, v)

    def _store_acked(self, acked: int) -> None:
        """Write ``upload_acked`` (the core has it already); on a full disk it stays in
        memory and is saved later, which is harmless to lose (see _note_cursors), so
        uploads go on while downloads wait for space."""
        try:
            self._persist(upload_acked=acked)
        except sqlite3.Error as exc:
            if not is_disk_full(exc, self.path):
                raise
            log.info("the disk of %s is full: upload_acked %d kept in memory", self.path, acked)
            self._save_soon()
            return
        self._saved_acked = acked

    def _save_soon(self) -> None:
        if self._save_timer is None and not self.closed:
            self._save_timer = self.loop.call_later(CURSOR_SAVE_DELAY, self.save_cursors)

    def save_cursors(self) -> None:
        """Write the cursors that only memory holds (see :meth:`_note_cursors`) now."""
        self._cancel_save()
        if self.closed:
            return
        cursor, acked = self.core.download_cursor, self.core.upload_acked
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

    # --- downloads -----------------------------------------------------------------------

    def on_download(self, ev: pc.DownloadReceived) -> None:
        """Apply a DOWNLOAD's changesets and cursors in one local transaction (one with
        nothing to apply: :meth:`_note_cursors`)."""
        if not ev.changesets and not ev.objects and ev.bootstrap == BOOTSTRAP_NONE:
            self._note_cursors(ev)
            return
        engine = self.engine
        acked = max(ev.upload_acked, self.core.upload_acked)
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
        self._saved_cursor, self._saved_acked = ev.cursor, max(acked, self._saved_acked)
        self._cancel_save()
        if self.disk_full is not None:
            self._space_again()
        self._downloaded(ev)

    def _note_cursors(self, ev: pc.DownloadReceived) -> None:
        """A DOWNLOAD with nothing to apply (the acknowledgement of this device's upload):
        its cursors are taken in memory (the core's) and written later, with the next
        download's transaction or after ``CURSOR_SAVE_DELAY``. A write transaction per
        acknowledgement would take the file's write lock just as the app writes next.
        Losing them (a crash first) is harmless: the server is asked again from the older
        cursor and sends nothing new, and uploads it already integrated are acknowledged
        again without being applied twice."""
        self._save_soon()
        self._downloaded(ev)

    def _downloaded(self, ev: pc.DownloadReceived) -> None:
        """After a DOWNLOAD was applied (or noted): progress, acknowledgements, uploads."""
        self.run(
            self.core.downloaded(
                ev.cursor,
                ev.upload_acked,
                ev.latest_server_version,
                ev.downloadable_bytes,
                ev.size,
            )
        )

    def wait_for_space(self, exc: BaseException, operation: str) -> None:
        """The file's disk is full, so what the server sent could not be stored (it was
        rolled back). The session stays active: it leaves the binding at once (nothing
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
        self.run(self.core.disk_full(delay, self.clock()))

    def _space_again(self) -> None:
        """A download was stored after a full disk: the outage is over."""
        log.info("the disk of %s has space again: sync goes on", self.path)
        self.disk_full = None
        self._disk_backoff.reset()

    def on_mark(self, ev: pc.MarkReplied) -> None:
        """A MARK reply: everything up to its version has been downloaded and applied."""
        self.run(self.core.mark_replied(ev.request_id))

    # --- errors and resets ---------------------------------------------------------------

    def on_session_error(self, ev: pc.ErrorReceived) -> None:
        """A session-level ERROR: report it; retry after a delay unless told to stop."""
        if ev.code == ErrorCode.COMPENSATING_WRITE:  # the session stays bound
            self.report_error(compensating_error(ev.message))
            return
        if ev.code == ErrorCode.CHANGESET_REFUSED:  # integrated as nothing; stays bound
            self.report_error(refused_error(self.engine, ev.message))
            return
        if ev.code == ErrorCode.CLIENT_RESET_NEEDED:
            self.client_reset(ev.message)
            return
        if ev.code == ErrorCode.CLOCK_SKEW:
            self._on_clock_skew(ev.message)
        now = self.clock()
        self.run(self.core.error(ev.code, ev.message, ev.action, ev.retry_delay_ms, now))

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
        self.core.resend()
        self.save_cursors()  # the re-stamp reads which changes were acknowledged from the file
        if restamp_unsent(self.engine, self.core.upload_acked, version, self.engine.now()):
            # the objects were reset and the unsent changes applied again (store/restamp.py):
            # the download starts over, as after a client reset that recovers them
            self._after_reset(True)
            self.run(self.core.reset_done(True))
        self.flex.reset()  # its cache of the change log holds the old timestamps

    def client_reset(self, message: str) -> None:
        """ERROR 211: reset the file by the configured mode (``client/reset.py``), then
        bind again; manual mode, a failure or too many resets stop the session."""
        mode = self.sync.client_reset
        self.run(
            self.core.reset_needed(
                message, _reset_mode(mode), mode.max_resets, mode.window, self.clock()
            )
        )

    def _reset_file(self, recover: bool, message: str) -> None:
        """Carry out :class:`~tidesync.protocol.session.ResetFile`: copy the file for the
        callbacks, reset it, and tell the core (``reset_done`` / ``reset_failed``)."""
        mode = self.sync.client_reset
        assert isinstance(mode, RecoverUnsyncedChanges | DiscardUnsyncedChanges)
        log.warning("client reset of %s (%s): %s", self.path, type(mode).__name__, message)
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
            reset_file(self.engine, recover=recover)
        except Exception as exc:
            log.exception("the client reset of %s failed", self.path)
            drop_copy(copy)
            self.run(self.core.reset_failed(message, repr(exc)))
            return
        self._after_reset(recover)
        self.run(self.core.reset_done(recover, self.clock()))
        if copy is not None:  # on_after runs once the server's current state is downloaded
            done = self.wait_download()
            done.add_done_callback(lambda f: self._finish_reset(mode, copy, f))

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
            drop_copy(copy)

    def _after_reset(self, recovered: bool) -> None:
        """The file was reset: the worker's own view of it (saved cursors, the subscription
        cache, upload progress) follows; the core's cursors follow in ``reset_done``."""
        self._saved_cursor = self._saved_acked = 0
        self.flex.reset()
        if not recovered:  # the discarded writes will never be acknowledged
            self.uploads.discarded(int(self.engine.get_meta("last_version", 0) or 0))

    def _close_gap(self) -> int:
        """After a reset the server may expect a lower next version than the change log's
        first unacknowledged one (its data was wiped, or discarded versions were never
        uploaded): renumber those changesets to follow the server's acknowledged version.
        Returns by how much (0: no gap)."""
        acked = self.core.upload_acked
        gap = self.engine.close_changelog_gap(acked)
        if gap > 0:
            log.info("client reset: %s renumbered its changesets by -%d", self.path, gap)
            self.uploads.renumbered(acked, gap)
        return gap

    # --- upload --------------------------------------------------------------------------

    def pump_upload(self) -> None:
        """Upload what the change log holds beyond what was sent, while the core's window
        allows."""
        conn, no = self.connection, self.session_no
        if conn is None or conn.proto is None or no is None:
            return
        proto = conn.proto
        sent_any = False
        while (room := self.core.upload_room()) is not None:
            if room.renumber_first:
                self.core.renumbered(self._close_gap())
                continue
            entries = self.engine.read_changelog(room.after, UPLOAD_BATCH_BYTES)
            if not entries:
                break
            batch = [UploadChangeset(v, data) for v, data in entries]
            try:  # a changeset larger than a frame goes in parts (protocol/parts.py)
                proto.upload(no, batch, self.core.download_cursor)
            except LocalProtocolError as exc:  # only an old (v2) server cannot take it
                self.run(self.core.upload_refused(str(exc)))
                break
            self.core.uploads_sent([(v, len(d)) for v, d in entries])
            sent_any = True
        if sent_any:
            conn.flush_soon()

    # --- waits (sync loop side) ----------------------------------------------------------

    def wait_upload(self, target: int) -> asyncio.Future[None]:
        """A future done when every local version up to ``target`` is acknowledged."""
        key, fut = self._new_wait()
        self._run_reporting(self.core.wait_upload(key, target))  # the future is returned
        return fut

    def wait_download(self) -> asyncio.Future[None]:
        """A future done when everything the server holds now is applied locally."""
        key, fut = self._new_wait()
        self.run(self.core.wait_download(key))
        return fut

    def _send_mark(self, keys: Sequence[int]) -> None:
        conn, no = self.connection, self.session_no
        if conn is None or conn.proto is None or no is None:
            return
        request_id = conn.proto.mark(no)
        self.core.mark_sent(request_id, keys)
        conn.flush_soon()
