"""``Session``: the sync session of one synced database, as the application sees it.

The work happens on the sync thread (``syncclient.SessionWorker``); this facade reads its
state and hands requests over. Every coroutine here works from any asyncio event loop, and
the streams have callback forms for code without one.

One session per synced file in a process: the first synced ``Database`` of a file starts
it, later ones opened meanwhile (from any thread) join it (:func:`open_shared`), and it
ends when the last of them closes (:func:`release_shared`). A file is bound once per
connection, and two sessions of one file would upload its change log twice over. The
configurations must agree on what the session is (the App, the user, the models, the client
reset mode), else :class:`~tidesync.errors.MismatchedConfigurationError` names the file
and what differs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.progress import ProgressDirection, ProgressMode, SyncProgress
from ..errors import (
    DatabaseClosedError,
    MismatchedConfigurationError,
    OperationCancelledError,
    SessionInactiveError,
    SyncDiskFullError,
)
from ..eventloop import stream_loop
from .calls import awaitable, blocking_form
from .cancellation import CancellationToken, await_with_token
from .progress import ProgressListener
from .syncclient import ConnectionState, SessionWorker, SyncClient

if TYPE_CHECKING:
    from .app import User
    from .config import SyncConfiguration
    from .database import Database

log = logging.getLogger("tidesync.session")


class SessionState(enum.Enum):
    """Whether a session is syncing (ACTIVE) or paused/ended (INACTIVE)."""

    ACTIVE = "active"
    INACTIVE = "inactive"


@dataclass(frozen=True)
class ConnectionStateChange:
    """One change of a session's connection state. ``reason`` says in words why a
    connection went ``DISCONNECTED`` (e.g. "connection refused by 127.0.0.1:8765 (is the
    server running?)"); None for the other changes and for a drop on purpose."""

    previous: ConnectionState
    current: ConnectionState
    reason: str | None = None


class _Token:
    """Returned by the ``add_*_listener`` methods; :meth:`cancel` removes the listener."""

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove = remove
        self.is_cancelled = False

    def cancel(self) -> None:
        """Stop the notifications (idempotent)."""
        if not self.is_cancelled:
            self.is_cancelled = True
            self._remove()


class Session:
    """The sync session of a synced :class:`~tidesync.Database` (``db.sync_session``)."""

    def __init__(
        self, client: SyncClient, worker: SessionWorker, db: Database, sync: SyncConfiguration
    ) -> None:
        self._client = client
        self._worker = worker
        self._db_path = db.path
        self.user: User = sync.user
        self._closed = False
        self._lock = threading.Lock()
        self._conn_listeners: list[Callable[[ConnectionStateChange], Any]] = []
        self._last_version_sql = "SELECT value FROM _meta WHERE key = 'last_version'"
        self._db = db  # an open one of _dbs (for reads of the change log's head)
        self._dbs: list[Database] = [db]  # the open databases sharing this session
        self._schemas = db.schemas
        self._reset_mode = sync.client_reset
        self._streams: set[_Stream] = set()

    @property
    def path(self) -> str:
        """The path of the database file this session syncs."""
        return self._db_path

    def error_handlers(self) -> list[Callable[[Any, Exception], Any]]:
        """The ``sync_error_handler`` of every database sharing the session, each once."""
        handlers: list[Callable[[Any, Exception], Any]] = []
        for db in list(self._dbs):
            sync = db.config.sync
            handler = sync.error_handler if sync is not None else None
            if handler is not None and handler not in handlers:
                handlers.append(handler)
        return handlers

    def _check(self) -> SessionWorker:
        if self._closed:
            raise DatabaseClosedError("the session ended: its database was closed")
        return self._worker

    @property
    def state(self) -> SessionState:
        """ACTIVE while syncing, INACTIVE while paused (or stopped by a fatal error)."""
        worker = self._check()
        return SessionState.ACTIVE if worker.active else SessionState.INACTIVE

    @property
    def disk_full(self) -> SyncDiskFullError | None:
        """While the device's disk is too full to store what the session downloads: the
        error the session waits out (it retries with backoff by itself and stays ACTIVE;
        the error handler was told once). ``None`` otherwise."""
        return self._check().disk_full

    @property
    def connection_state(self) -> ConnectionState:
        """DISCONNECTED, CONNECTING or CONNECTED, read synchronously."""
        return self._check().conn_state

    def pause(self) -> None:
        """Stop syncing this database (others are untouched); local writes go on. When this
        returns, ``state`` is INACTIVE and ``connection_state`` DISCONNECTED."""
        worker = self._check()
        self._client.call(lambda: worker.deactivate("the session was paused"))

    def resume(self) -> None:
        """Sync again: reconnect at once and upload what was written meanwhile."""
        worker = self._check()
        self._client.call(worker.activate)

    def _local_version(self) -> int:
        db = self._db
        with db._lock:
            row = db._engine.conn.execute(self._last_version_sql).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    @awaitable
    async def wait_for_upload(self, cancellation_token: CancellationToken | None = None) -> None:
        """Return once the server has acknowledged every local change committed before the
        call. Fails at once with :class:`SessionInactiveError` while paused; while offline it
        waits (give it a ``TimeoutCancellationToken`` for a deadline)."""
        worker = self._check()
        if cancellation_token is not None and cancellation_token.is_cancelled:
            raise OperationCancelledError("wait_for_upload was cancelled")
        target = self._local_version()
        inner = self._client.call(lambda: worker.wait_upload(target))
        await self._await_inner(inner, cancellation_token, "wait_for_upload")

    wait_for_upload_blocking = blocking_form(wait_for_upload)

    @awaitable
    async def wait_for_download(self, cancellation_token: CancellationToken | None = None) -> None:
        """Return once everything the server held when asked is applied locally."""
        worker = self._check()
        if cancellation_token is not None and cancellation_token.is_cancelled:
            raise OperationCancelledError("wait_for_download was cancelled")
        inner = self._client.call(worker.wait_download)
        await self._await_inner(inner, cancellation_token, "wait_for_download")

    wait_for_download_blocking = blocking_form(wait_for_download)

    async def _await_inner(
        self, inner: asyncio.Future[None], token: CancellationToken | None, what: str
    ) -> None:
        loop = self._client.loop
        cf = asyncio.run_coroutine_threadsafe(_wait_future(inner), loop)
        wrapped = asyncio.wrap_future(cf)
        try:
            await await_with_token(wrapped, token, what)
        except OperationCancelledError:
            loop.call_soon_threadsafe(_cancel_if_pending, inner)
            raise
        except asyncio.CancelledError:
            loop.call_soon_threadsafe(_cancel_if_pending, inner)
            raise

    async def _wait_initial_download(
        self,
        on_progress: Callable[[SyncProgress], Any] | None,
        token: CancellationToken | None,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Wait for the initial download (and ``then()``, e.g. a flexible sync bootstrap),
        reporting monotone progress that ends at 1.0."""
        if on_progress is None:
            await self.wait_for_download(token)
            if then is not None:
                await then()
            return
        last = [-1.0]

        def report(p: SyncProgress) -> None:
            if p.progress_estimate > last[0]:
                last[0] = p.progress_estimate
                on_progress(p)

        listener = self._register_progress(
            report,
            None,
            ProgressDirection.DOWNLOAD,
            ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK,
            from_start=True,
        )
        try:
            await self.wait_for_download(token)
            if then is not None:
                await then()
        finally:
            listener.cancelled = True
            self._client.loop.call_soon_threadsafe(self._worker.remove_progress_listener, listener)
        if last[0] < 1.0:  # downloaded: the server answered the completion request
            try:
                on_progress(SyncProgress(1.0))
            except Exception:
                log.exception("the on_progress callback failed")

    # --- progress ------------------------------------------------------------------------

    def _register_progress(
        self,
        deliver: Callable[[SyncProgress], Any],
        end: Callable[[], None] | None,
        direction: ProgressDirection,
        mode: ProgressMode,
        *,
        from_start: bool = False,
    ) -> ProgressListener:
        if not isinstance(direction, ProgressDirection):
            raise TypeError("direction must be a tidesync.ProgressDirection")
        if not isinstance(mode, ProgressMode):
            raise TypeError("mode must be a tidesync.ProgressMode")
        worker = self._check()
        listener = ProgressListener(direction, mode, deliver, end, from_start=from_start)
        self._client.call(lambda: worker.add_progress_listener(listener))
        return listener

    def add_progress_listener(
        self,
        callback: Callable[[SyncProgress], Any],
        direction: ProgressDirection,
        mode: ProgressMode,
    ) -> _Token:
        """Call ``callback(SyncProgress)`` (on the sync thread) with the first value at once
        and then at every change; ``token.cancel()`` stops it. In
        ``FOR_CURRENTLY_OUTSTANDING_WORK`` mode the calls end after the one with 1.0."""
        listener = self._register_progress(callback, None, direction, mode)
        worker = self._worker

        def remove() -> None:
            listener.cancelled = True
            try:
                self._client.loop.call_soon_threadsafe(worker.remove_progress_listener, listener)
            except RuntimeError:
                pass  # the sync loop is closed: nothing left to remove

        return _Token(remove)

    def get_progress_stream(
        self, direction: ProgressDirection, mode: ProgressMode
    ) -> AsyncIterator[SyncProgress]:
        """An async iterator of :class:`SyncProgress` (the first value at once). In
        ``FOR_CURRENTLY_OUTSTANDING_WORK`` mode it ends right after yielding 1.0; in
        ``REPORT_INDEFINITELY`` mode it ends when you ``break`` or call ``aclose()`` (or the
        database closes)."""
        stream: _Stream = _Stream(None)

        def register(deliver: Callable[[Any], Any]) -> _Token:
            found = self._register_progress(deliver, stream.end, direction, mode)
            worker = self._worker

            def remove() -> None:
                found.cancelled = True
                try:
                    self._client.loop.call_soon_threadsafe(worker.remove_progress_listener, found)
                except RuntimeError:
                    pass

            return _Token(remove)

        stream.start(register)
        self._track(stream)
        return stream

    def _track(self, stream: _Stream) -> None:
        self._streams.add(stream)
        stream.on_close = self._streams.discard

    # --- connection state changes --------------------------------------------------------

    def _connection_changed(
        self, previous: ConnectionState, current: ConnectionState, reason: str | None = None
    ) -> None:
        change = ConnectionStateChange(previous, current, reason)
        for cb in list(self._conn_listeners):
            try:
                cb(change)
            except Exception:
                log.exception("a connection state listener failed")

    def add_connection_state_listener(
        self, callback: Callable[[ConnectionStateChange], Any]
    ) -> _Token:
        """Call ``callback(change)`` (on the sync thread) at every connection state change."""
        self._check()
        self._conn_listeners.append(callback)

        def remove() -> None:
            if callback in self._conn_listeners:
                self._conn_listeners.remove(callback)

        return _Token(remove)

    @property
    def connection_state_changes(self) -> AsyncIterator[ConnectionStateChange]:
        """An async iterator of :class:`ConnectionStateChange`, one per change (no initial
        value); stop it with ``break`` or ``aclose()``."""
        stream: _Stream = _Stream(self.add_connection_state_listener)
        self._track(stream)
        return stream

    # --- sharing (see open_shared) ------------------------------------------------------

    @property
    def _usable(self) -> bool:
        return not self._closed and not self._client.is_closed

    def _join(self, db: Database) -> None:
        self._dbs.append(db)

    def _leave(self, db: Database) -> bool:
        """``db`` no longer uses the session; True if it was the last one."""
        self._dbs = [d for d in self._dbs if d is not db]
        if self._dbs:
            self._db = self._dbs[0]
        return not self._dbs

    def _subscriptions_changed(self) -> None:
        """A new subscription set is in the file: send it if the session is bound."""
        worker = self._worker
        self._client.loop.call_soon_threadsafe(worker.send_query)

    def _start(self) -> None:
        worker = self._worker
        self._client.call(worker.activate)

    def _close(self) -> None:
        if self._closed:
            return
        worker = self._worker
        try:
            self._client.call(worker.close)
        finally:
            self._closed = True
            self._conn_listeners.clear()
            for stream in list(self._streams):
                stream.end()
            self._streams.clear()


_SHARED: dict[str, Session] = {}  # file path -> the live session syncing it
_SHARED_LOCK = threading.Lock()


def open_shared(client: SyncClient, db: Database, sync: SyncConfiguration) -> Session:
    """The session syncing ``db``'s file: the one already running in this process (``db``
    joins it), or a new one. Raises :class:`MismatchedConfigurationError` if ``db`` was
    opened with a configuration the running session cannot serve."""
    with _SHARED_LOCK:
        running = _live_session(db.path)
        if running is not None:
            _check_same(running, db, sync)
            running._join(db)
            return running
    # not under the lock: starting a session waits for the sync thread, which may be
    # running a callback that opens or closes a database itself
    session = client.open_session(db, sync, start=False)
    with _SHARED_LOCK:
        running = _live_session(db.path)
        if running is None:
            _SHARED[db.path] = session
    if running is not None:  # another thread started one meanwhile: join that one
        session._close()  # (never started)
        return open_shared(client, db, sync)
    session._start()
    return session


def release_shared(session: Session, db: Database) -> None:
    """``db`` closes: the session ends with the last of its databases."""
    with _SHARED_LOCK:
        last = session._leave(db)
        if last and _SHARED.get(session.path) is session:
            del _SHARED[session.path]
    if last:
        session._close()


def _live_session(path: str) -> Session | None:
    session = _SHARED.get(path)
    if session is not None and not session._usable:
        del _SHARED[path]  # its App's sync client was closed: start afresh
        return None
    return session


def _check_same(session: Session, db: Database, sync: SyncConfiguration) -> None:
    problem = _difference(session, db, sync)
    if problem is not None:
        raise MismatchedConfigurationError(
            f"the file {db.path} is already open in this process with another "
            f"configuration: {problem}; open it with the same configuration, or close the "
            "other database first"
        )


def _difference(session: Session, db: Database, sync: SyncConfiguration) -> str | None:
    """What makes ``db`` (opened with ``sync``) unlike the running session, or None."""
    first = session.user
    if sync.user.app is not first.app:
        return f"it is synced through another App (base URL {first.app.config.base_url})"
    if sync.user.id != first.id:
        return f"it is synced as user {first.id}, not {sync.user.id}"
    mine, theirs = session._schemas, db.schemas
    if mine != theirs:
        parts = []
        added = sorted(set(theirs) - set(mine))
        missing = sorted(set(mine) - set(theirs))
        changed = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        if added:
            parts.append(f"{', '.join(added)} not among the open one's models")
        if missing:
            parts.append(f"{', '.join(missing)} missing")
        if changed:
            parts.append(f"the fields of {', '.join(changed)} differ")
        return "other models (" + "; ".join(parts) + ")"
    mode, other = type(session._reset_mode).__name__, type(sync.client_reset).__name__
    if mode != other:
        return f"its client reset mode is {mode}, not {other}"
    return None


async def _wait_future(fut: asyncio.Future[None]) -> None:
    await asyncio.shield(fut)


def _cancel_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.cancel()


_END = object()


class _Stream(AsyncIterator[Any]):
    """An async iterator fed from the sync thread through a callback registration; it ends
    when :meth:`end` is called (from any thread) or the consumer calls :meth:`aclose`."""

    def __init__(self, register: Callable[[Callable[[Any], Any]], _Token] | None) -> None:
        self._loop = stream_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._token: _Token | None = None
        self._finished = False
        self.on_close: Callable[[_Stream], None] | None = None
        if register is not None:
            self.start(register)

    def start(self, register: Callable[[Callable[[Any], Any]], _Token]) -> None:
        """Register with the source (the first value may arrive during registration)."""
        self._token = register(self._deliver)

    def _deliver(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            if self._token is not None:
                self._token.cancel()

    def end(self) -> None:
        """No more items: the iterator stops after the queued ones (callable from any thread)."""
        self._deliver(_END)

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._stop()
            raise StopAsyncIteration
        return item

    def _stop(self) -> None:
        self._finished = True
        if self._token is not None:
            self._token.cancel()
        if self.on_close is not None:
            self.on_close(self)

    async def aclose(self) -> None:
        """Stop the stream."""
        self._stop()


__all__ = [
    "ConnectionState",
    "ConnectionStateChange",
    "ProgressDirection",
    "ProgressMode",
    "Session",
    "SessionInactiveError",
    "SessionState",
    "SyncProgress",
]
