"""Running the sync server on uvicorn: in-process (tests, demos, embedding) or as a command.

:class:`InProcessServer` binds its own listening socket (so ``port=0`` picks a free port
and the URL is known before the first request), runs uvicorn on the current event loop and
stops cleanly: stop accepting, ERROR 115 + close 1001 to every sync connection, finish the
queued commits, close the storage. ``start_in_thread`` runs the same thing on a private
thread and loop for synchronous code. :func:`serve_forever` is what ``tidesync serve`` runs:
it prints the URL once accepting and stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import uvicorn

from ..errors import ServerStartError as ServerStartError  # (was defined here)
from ..eventloop import new_event_loop
from .app import StorageFactory, create_app, storage_for
from .config import ServerConfig
from .datalock import DataFolderLock
from .gate import ConnectionGate, protocol_classes
from .hub import SyncHub
from .schemapin import check_declared_schemas, declared_apps
from .storage.base import ServerStorage, StorageError

log = logging.getLogger("tidesync.server.runner")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, saying goodbye to sync clients before it drops connections."""

    def __init__(
        self,
        config: uvicorn.Config,
        before_shutdown: Callable[[], Awaitable[None]],
        handle_signals: bool,
    ) -> None:
        super().__init__(config)
        self._before_shutdown = before_shutdown
        self._handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Turn SIGINT/SIGTERM into a clean stop (and do not re-raise them afterwards)."""
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, let the app close its sync connections, then shut uvicorn down."""
        for server in getattr(self, "servers", []):
            server.close()
        try:
            await self._before_shutdown()
        except Exception:
            log.exception("closing sync connections failed")
        await super().shutdown(sockets)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0 picks a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ServerStartError(f"cannot resolve {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.setblocking(False)
    return sock


class InProcessServer:
    """A sync server on this process's event loop (or a private thread).

    ``async with InProcessServer(tmp_path) as server: ... server.url ...``

    With SQLite storage (no ``config.storage_url``) it holds the data folder's lock
    (``server/datalock.py``) from :meth:`start` to :meth:`stop`: a second server on the
    folder, in this process or another, fails to start with
    :class:`~tidesync.errors.DataFolderInUseError`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        config: ServerConfig | None = None,
        *,
        storage_factory: StorageFactory | None = None,
        handle_signals: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.config = config or ServerConfig()
        self._requested_port = port
        self._storage_factory = storage_factory
        self._handle_signals = handle_signals
        self._port: int | None = None
        self._app: Any = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        #: Counts connections per client address (``server/gate.py``); made at start.
        self.gate: ConnectionGate | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread_stop: asyncio.Event | None = None
        # PostgreSQL storage keeps nothing in the folder: processes may share it
        self._folder_lock = None if self.config.storage_url else DataFolderLock(self.data_dir)

    # -- properties -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` (``https://`` with TLS), the base URL clients use."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://host:port``, the base of the sync WebSocket URL."""
        return "ws" + self.url[len("http") :]

    @property
    def hub(self) -> SyncHub:
        """The running server's hub (connections, committer)."""
        hub = getattr(self._app.state, "hub", None) if self._app is not None else None
        if not isinstance(hub, SyncHub):
            raise RuntimeError("the server is not started")
        return hub

    @property
    def console_link(self) -> str | None:
        """The one-time console sign-in link of a development-mode server (None once used,
        or without one)."""
        console = getattr(self._app.state, "console", None) if self._app is not None else None
        token = console.auth.one_time_token if console is not None else None
        return f"{self.url}/admin/signin?token={token}" if token else None

    @property
    def storage(self) -> ServerStorage:
        """The running server's storage (use it from the server's event loop)."""
        return self.hub.storage

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._task is not None and not self._task.done()

    # -- async lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start serving; returns once the socket accepts connections."""
        if self._task is not None:
            raise RuntimeError("the server was already started")
        if self._folder_lock is not None:
            self._folder_lock.acquire()  # before the port: the folder is the clearer error
        try:
            if declared_apps(self.config):
                await self._check_schemas()
            sock = bind_socket(self.host, self._requested_port)
        except BaseException:
            self._cleanup()
            raise
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        self._app = create_app(self.data_dir, self.config, storage_factory=self._storage_factory)
        limits = self.config.limits
        self.gate = ConnectionGate(limits.max_connections_per_address, self.config.trusted_proxies)
        http_protocol, ws_protocol = protocol_classes(
            self.gate, self.config.request_head_timeout, limits.max_frame_bytes_before_hello
        )
        uconfig = uvicorn.Config(
            self._app,
            ssl_certfile=self.config.tls_cert,
            ssl_keyfile=self.config.tls_key,
            lifespan="on",
            log_level=self.config.log_level,
            access_log=False,
            http=http_protocol,
            ws=ws_protocol,
            ws_max_size=self.config.ws_max_size,
            ws_ping_interval=None,
            # X-Forwarded-* only from the operator's listed proxies (never from any peer)
            proxy_headers=bool(self.config.trusted_proxies),
            forwarded_allow_ips=list(self.config.trusted_proxies) or None,
            timeout_graceful_shutdown=math.ceil(self.config.shutdown_grace),
        )
        server = _Uvicorn(uconfig, self._going_away, self._handle_signals)
        self._server = server
        self._task = asyncio.create_task(self._serve(server, sock), name="tidesync-uvicorn")
        while not server.started:
            if self._task.done():
                error = self._task.exception()
                self._cleanup()
                if isinstance(error, ServerStartError):
                    raise error
                raise ServerStartError(f"the server failed to start: {error}") from error
            await asyncio.sleep(0.01)

    async def _check_schemas(self) -> None:
        """Raise :class:`SchemaPinError` (one clear line, no traceback in the log) before
        anything starts if a declared schema cannot serve the stored data; the app's
        lifespan checks again and stores the declared schemas."""
        factory = self._storage_factory or storage_for(self.config)
        try:
            storage = factory(self.data_dir)
            await storage.open()
        except Exception as exc:  # what the lifespan would meet too, said once, clearly
            raise ServerStartError(f"cannot open the storage: {exc}") from exc
        try:
            await check_declared_schemas(storage, self.config)
        except StorageError as exc:
            raise ServerStartError(f"cannot read the stored schemas: {exc}") from exc
        finally:
            await storage.close()

    async def _serve(self, server: _Uvicorn, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits when the lifespan startup fails
            raise ServerStartError(
                "the server failed to start (see the log for the lifespan error)"
            ) from exc

    async def _going_away(self) -> None:
        hub = getattr(self._app.state, "hub", None) if self._app is not None else None
        if isinstance(hub, SyncHub):
            await hub.going_away()

    async def wait_stopped(self) -> None:
        """Wait until the server stops (a signal, or stop() from another task)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop: goodbye to every connection, finish commits, close storage. Idempotent."""
        task, server = self._task, self._server
        if task is None or server is None:
            return
        server.should_exit = True
        try:
            await task
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._task = None
        self._server = None
        if self._folder_lock is not None:
            self._folder_lock.release()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- threaded lifecycle -------------------------------------------------------------

    def start_in_thread(self, timeout: float = 30.0) -> None:
        """Run the server on a private thread and event loop; returns once accepting."""
        if self._thread is not None:
            raise RuntimeError("the server thread is already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        async def body() -> None:
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            self._thread_loop = asyncio.get_running_loop()
            self._thread_stop = asyncio.Event()
            ready.set()
            stopper = asyncio.ensure_future(self._thread_stop.wait())
            watcher = asyncio.ensure_future(self.wait_stopped())
            try:
                await asyncio.wait({stopper, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                watcher.cancel()
                await asyncio.gather(stopper, watcher, return_exceptions=True)
                await self.stop()

        def run() -> None:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(body())

        self._thread = threading.Thread(target=run, name="tidesync-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise ServerStartError(f"the server did not start within {timeout} s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop_thread(self, timeout: float = 30.0) -> None:
        """Stop a server started with :meth:`start_in_thread` and join its thread."""
        thread, loop, stop = self._thread, self._thread_loop, self._thread_stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"the server thread did not stop within {timeout} s")
        self._thread = self._thread_loop = self._thread_stop = None

    def __enter__(self) -> Self:
        self.start_in_thread()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()


async def serve_forever(
    data_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    config: ServerConfig | None = None,
    *,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; ``announce`` gets the URL once the server accepts."""
    raise_open_files_limit()
    server = InProcessServer(data_dir, host, port, config, handle_signals=True)
    await server.start()
    try:
        if announce is not None:
            announce(server.url)
            link = server.console_link
            if link is not None:
                print_console_link(link)
        await server.wait_stopped()
    finally:
        await server.stop()


def raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit: each connection is
    a file, and the usual soft limit (1,024) is what a flood of idle sockets exhausts first
    (``docs/security.md``). Nothing happens where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover (Windows)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-files limit from %d to %d", soft, hard)


def print_console_link(link: str) -> None:
    """Print the development console's one-time sign-in link (after the ready line)."""
    sys.stdout.write(f"tidesync console (one-time sign-in link): {link}\n")
    sys.stdout.flush()


def print_url(url: str) -> None:
    """Print the one line scripts wait for: ``tidesync serving on URL``."""
    sys.stdout.write(f"tidesync serving on {url}\n")
    sys.stdout.flush()
