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
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection, connect

from ..core.backoff import Backoff
from ..core.clocks import measure_offset
from ..errors import (
    AuthError,
    DatabaseClosedError,
    ProtocolError,
    SyncAction,
    SyncError,
    TidesyncError,
)
from ..eventloop import new_event_loop
from ..protocol import client as pc
from ..protocol.messages import ErrorCode, PongReceived, error_code_of
from ..protocol.session import UPLOAD_BATCH_BYTES, UPLOAD_WINDOW_BYTES, ConnectionState
from ..store import engine as store_engine
from ..support.diskfull import is_disk_full
from ..support.gcpause import gc_paused
from .progress import ProgressListener
from .urls import host_and_port
from .wording import describe_failure
from .worker import (
    CURSOR_SAVE_DELAY,
    DISK_FULL_MAX_DELAY,
    OFFSET_TOLERANCE_MS,
    SessionWorker,
)

if TYPE_CHECKING:
    from .app import App, User
    from .config import SyncConfiguration
    from .database import Database
    from .session import Session

log = logging.getLogger("tidesync.sync")
T = TypeVar("T")


class SyncClient:
    """One per App: the sync thread, its event loop, and a connection per user."""

    def __init__(self, app: App, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        #: the monotonic clock (seconds) of every connection and session of this client
        self.clock = clock
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
        self.connected_at: float | None = None
        self.disconnected_at: float | None = None
        #: connection attempts made (for tests and diagnostics)
        self.attempts = 0
        #: the server's time minus this machine's (ms), measured at the last WELCOME
        self.clock_offset: int | None = None

    # --- sessions ------------------------------------------------------------------------

    def attach(self, worker: SessionWorker) -> None:
        """Add a session under a new number; it binds now if connected (or once the file's
        previous session here is UNBOUND), else the connection (re)connects."""
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
            worker.on_connected()
        else:
            worker.on_connecting()
            self._ensure_running(immediate=True)

    def _learn_offset(self, worker: SessionWorker) -> None:
        if self.clock_offset is not None:
            worker.learn_offset(self.clock_offset)

    def detach(self, worker: SessionWorker) -> None:
        """Remove a session (unbinding it if on the connection); the socket lingers, then
        closes."""
        no = worker.session_no
        if no is None or self.workers.get(no) is not worker:
            return
        del self.workers[no]
        self._unbind(worker, no)
        if not self.workers:
            self._linger = self.client.loop.call_later(
                self.timeouts.connection_linger_time, self._linger_expired
            )

    def unbind(self, worker: SessionWorker) -> None:
        """Send UNBIND for a session that stays attached (its file cannot store downloads
        now: what still comes for it is dropped)."""
        no = worker.session_no
        if no is not None and self.workers.get(no) is worker:
            self._unbind(worker, no)

    def _linger_expired(self) -> None:
        self._linger = None
        if not self.workers:
            self._spawn(self._drop_idle())

    def _unbind(self, worker: SessionWorker, no: int) -> None:
        """Send UNBIND for session ``no`` (if the connection still has it, not unbinding);
        ``worker``'s core then waits for the UNBOUND before its file binds again."""
        proto = self.proto
        if proto is not None and proto.has_session(no):
            try:
                proto.unbind(no)
            except ProtocolError:
                return
            worker.core.unbind_sent(no)
            self.flush_soon()

    def _on_unbound(self, session: int) -> None:
        for no, w in list(self.workers.items()):
            if w.core.unbound_awaited == session:
                self._worker_call(no, lambda w: w.on_unbound(session))

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
        for worker in list(self.workers.values()):
            worker.rebind_now()
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
        sent_at = self.client.clock()
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
                self._urgent_ping_at = None
                if self._urgent_check is not None:
                    self._urgent_check.cancel()
                    self._urgent_check = None
                if self.connected_at is not None:
                    self.disconnected_at = self.client.clock()
                    self.connected_at = None
                self.set_state(ConnectionState.DISCONNECTED)
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
            now = self.client.clock()
            gone = self.disconnected_at
            slow = gone is not None and now - gone > timeouts.fast_reconnect_limit
            self.connected_at = now
            self._last_pong = now
            for no, w in list(self.workers.items()):
                self._worker_call(no, self._learn_offset)
                if self.workers.get(no) is w:  # (a failure there stopped the session)
                    w.on_connected(slow_reconnect=slow)
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
        return self.client.clock() - self.connected_at >= 1.0

    async def _on_connection_error(self, ev: pc.ErrorReceived) -> None:
        if ev.action is SyncAction.REFRESH_TOKEN or ev.code in (
            ErrorCode.BAD_TOKEN,
            ErrorCode.TOKEN_EXPIRED,
        ):
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
            self._last_pong = self.client.clock()
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
        for w in list(self.workers.values()):
            w.deactivate("the sync client was closed")
        self.workers.clear()
        if self._linger is not None:
            self._linger.cancel()
        if self._urgent_check is not None:
            self._urgent_check.cancel()
        if self.ws is not None:
            await self.ws.close()
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = [
    "CURSOR_SAVE_DELAY",
    "DISK_FULL_MAX_DELAY",
    "OFFSET_TOLERANCE_MS",
    "UPLOAD_BATCH_BYTES",
    "UPLOAD_WINDOW_BYTES",
    "Connection",
    "ConnectionState",
    "ProgressListener",
    "SessionWorker",
    "SyncClient",
    "TidesyncError",
]
