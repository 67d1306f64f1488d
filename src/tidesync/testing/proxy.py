"""``FaultProxy``: a loopback TCP proxy that injects network faults on command or at random.

Put it between a client and a server (``App(base_url=proxy.url)``) and the client sees a real
network that can fail: :meth:`~FaultProxy.cut` closes every connection and refuses new ones,
:meth:`~FaultProxy.stall` keeps sockets open but forwards nothing (a black hole),
:meth:`~FaultProxy.delay` and :meth:`~FaultProxy.throttle` slow traffic down,
:meth:`~FaultProxy.drop` closes connections at random (seeded), and
:meth:`~FaultProxy.random_faults` schedules cuts, stalls and disconnects at random.
:meth:`~FaultProxy.restore` turns every fault off.

The proxy runs on an asyncio loop: ``await proxy.start()`` on yours, or
``proxy.start_in_thread()`` to give it a private thread for synchronous code. The control
methods (``cut``, ``stall``, ...) are plain functions, safe to call from any thread; they take
effect before they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Self

__all__ = ["Direction", "FaultProxy", "FaultStats"]

Direction = Literal["both", "upstream", "downstream"]
"""``upstream`` is client -> server, ``downstream`` is server -> client."""

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_CHUNK = 65536


@dataclasses.dataclass
class FaultStats:
    """What the proxy did so far (counts since :meth:`FaultProxy.start`)."""

    connections: int = 0
    refused: int = 0
    cuts: int = 0
    stalls: int = 0
    disconnects: int = 0
    drops: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict."""
        return dataclasses.asdict(self)


class _Link:
    """One proxied connection: the client's socket, the server's socket, two pumps."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.finished = 0

    def finish_one(self) -> None:
        """One direction reached end of stream; close both sockets once both have."""
        self.finished += 1
        if self.finished >= 2 and not self.closed:
            self.closed = True
            for _, writer in (self.client, self.server):
                writer.close()

    def abort(self) -> None:
        """Drop both sockets at once (no flush) and stop the pumps."""
        if self.closed:
            return
        self.closed = True
        for _, writer in (self.client, self.server):
            writer.transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class FaultProxy:
    """A TCP proxy on loopback from ``listen_host:port`` to ``target_host:target_port``.

    ``seed`` makes the random decisions (:meth:`drop`, :meth:`random_faults`) repeatable.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        seed: int | None = None,
    ) -> None:
        if listen_host not in _LOOPBACK or target_host not in _LOOPBACK:
            raise ValueError("FaultProxy only listens on and connects to loopback addresses")
        if not 0 < target_port < 65536:
            raise ValueError(f"bad target port {target_port!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.seed = seed
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._refusing = False
        self._flowing = {"upstream": asyncio.Event(), "downstream": asyncio.Event()}
        for event in self._flowing.values():
            event.set()
        self._delay = 0.0
        self._bytes_per_second: float | None = None
        self._drop = 0.0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0
        self._random_task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (0 before :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the base URL to give a client instead of the server's."""
        if not self._port:
            raise RuntimeError("the proxy is not started")
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self._port}"

    async def start(self, port: int = 0) -> int:
        """Start listening (``port`` 0 picks a free one) and return the port."""
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, self.listen_host, port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def stop(self) -> None:
        """Stop listening, drop every connection and the random fault task."""
        self._stop_random()
        if self._random_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._random_task
            self._random_task = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [t for link in self._links for t in link.tasks]
        for link in list(self._links):
            link.abort()
        self._links.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

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

    def start_in_thread(self, port: int = 0, timeout: float = 30.0) -> int:
        """Run the proxy on a private thread and event loop; returns the port."""
        if self._thread is not None:
            raise RuntimeError("the proxy thread is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tidesync-fault-proxy")
        thread.daemon = True
        thread.start()
        self._thread = thread
        try:
            return asyncio.run_coroutine_threadsafe(self.start(port), loop).result(timeout)
        except BaseException:
            self._thread = None
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            loop.close()
            raise

    def stop_thread(self, timeout: float = 30.0) -> None:
        """Stop a proxy started with :meth:`start_in_thread` and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._thread = None

    def __enter__(self) -> Self:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    # -- faults ---------------------------------------------------------------------------

    def cut(self) -> None:
        """Close every open connection now, and refuse new ones until :meth:`restore`."""
        self._call(self._cut)

    def disconnect(self) -> None:
        """Close every open connection now; new connections are accepted as usual."""
        self._call(self._disconnect)

    def stall(self, direction: Direction = "both") -> None:
        """Keep sockets open but forward nothing in ``direction`` until :meth:`restore`.

        Bytes already read are held, not lost: they go through after :meth:`restore`.
        """
        if direction not in ("both", "upstream", "downstream"):
            raise ValueError(f"bad direction {direction!r}")
        self._call(lambda: self._stall(direction))

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it (0 turns delay off)."""
        if not 0 <= seconds <= 3600:
            raise ValueError("delay must be between 0 and 3600 seconds")
        self._call(lambda: setattr(self, "_delay", float(seconds)))

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit each direction of each connection to ``bytes_per_second`` (None: no limit)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("throttle must be a positive rate or None")
        self._call(lambda: setattr(self, "_bytes_per_second", bytes_per_second))

    def drop(self, probability: float) -> None:
        """Close a connection with ``probability`` each time it forwards a chunk (seeded)."""
        if not 0 <= probability <= 1:
            raise ValueError("probability must be between 0 and 1")
        self._call(lambda: setattr(self, "_drop", float(probability)))

    def random_faults(
        self,
        rate: float,
        seed: int | None = None,
        *,
        max_duration: float = 2.0,
    ) -> None:
        """Inject cuts, stalls and disconnects at random, ``rate`` per second on average.

        Each cut or stall lasts up to ``max_duration`` seconds. ``rate`` 0 stops them.
        ``seed`` (default: the proxy's seed) makes the schedule repeatable.
        """
        if rate < 0 or max_duration <= 0:
            raise ValueError("rate must be >= 0 and max_duration > 0")
        rng = random.Random(self.seed if seed is None else seed)

        def arm() -> None:
            self._stop_random()
            if rate > 0:
                loop = self._require_loop()
                self._random_task = loop.create_task(self._random_loop(rate, rng, max_duration))

        self._call(arm)

    def restore(self) -> None:
        """Turn every fault off: accept, forward, no delay, throttle, drops or random faults."""

        def heal() -> None:
            self._stop_random()
            self._refusing = False
            self._delay = 0.0
            self._bytes_per_second = None
            self._drop = 0.0
            for event in self._flowing.values():
                event.set()

        self._call(heal)

    @property
    def open_connections(self) -> int:
        """How many proxied connections are open now."""
        return len(self._links)

    # -- internals ------------------------------------------------------------------------

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the proxy is not started")
        return self._loop

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            fn()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or not loop.is_running():
            fn()
            return

        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), loop).result(30)

    def _cut(self) -> None:
        self._refusing = True
        self.stats.cuts += 1
        self._abort_all()

    def _disconnect(self) -> None:
        self.stats.disconnects += 1
        self._abort_all()

    def _abort_all(self) -> None:
        for link in list(self._links):
            link.abort()
        self._links.clear()

    def _stall(self, direction: Direction) -> None:
        self.stats.stalls += 1
        for name, event in self._flowing.items():
            if direction in ("both", name):
                event.clear()

    def _stop_random(self) -> None:
        if self._random_task is not None and not self._random_task.done():
            self._random_task.cancel()

    async def _random_loop(self, rate: float, rng: random.Random, max_duration: float) -> None:
        while True:
            await asyncio.sleep(min(rng.expovariate(rate), 60.0))
            kind = rng.choice(("cut", "stall", "disconnect"))
            if kind == "disconnect":
                self._disconnect()
                continue
            if kind == "cut":
                self._cut()
            else:
                self._stall("both")
            try:
                await asyncio.sleep(rng.uniform(0.05, max_duration))
            finally:
                self._refusing = False
                for event in self._flowing.values():
                    event.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._server is None:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), 10
            )
        except (OSError, TimeoutError):
            self.stats.refused += 1
            writer.transport.abort()
            return
        if self._refusing or self._server is None:
            self.stats.refused += 1
            writer.transport.abort()
            upstream[1].transport.abort()
            return
        self.stats.connections += 1
        link = _Link((reader, writer), upstream)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, "upstream", reader, upstream[1])),
            asyncio.create_task(self._pump(link, "downstream", upstream[0], writer)),
        ]

    async def _pump(
        self,
        link: _Link,
        direction: Literal["upstream", "downstream"],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        flowing = self._flowing[direction]
        clean = False
        try:
            while not link.closed:
                data = await reader.read(_CHUNK)
                if not data:
                    clean = True
                    break
                if not flowing.is_set():
                    await flowing.wait()
                if self._drop and self._rng.random() < self._drop:
                    self.stats.drops += 1
                    break
                if self._delay:
                    await asyncio.sleep(self._delay)
                    if not flowing.is_set():
                        await flowing.wait()
                rate = self._bytes_per_second
                if rate:
                    await asyncio.sleep(len(data) / rate)
                if link.closed:
                    break
                writer.write(data)
                await writer.drain()
                if direction == "upstream":
                    self.stats.bytes_upstream += len(data)
                else:
                    self.stats.bytes_downstream += len(data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if clean and not link.closed:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                link.finish_one()
            elif not link.closed:
                link.abort()
            if link.closed:
                self._links.discard(link)
