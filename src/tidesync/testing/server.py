"""``TestServer``: an in-process sync server (optionally behind a FaultProxy) for app tests.

It runs :class:`tidesync.server.runner.InProcessServer` on a private thread and event loop,
so it works the same from synchronous tests and from async tests (the client's sync thread
and the test's loop never share a loop with the server). With ``faults=True`` a
:class:`~tidesync.testing.FaultProxy` sits in front of it and :attr:`TestServer.url` points
at the proxy, so the test can cut, stall or slow the network::

    from tidesync.testing import TestServer

    @pytest.fixture
    def sync_server(tmp_path):
        with TestServer(tmp_path / "server", faults=True) as server:
            yield server

    def test_offline(sync_server):
        app = ts.App(ts.AppConfiguration("todo", base_url=sync_server.url))
        sync_server.proxy.cut()
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Self

from ..server.config import ServerConfig
from ..server.runner import InProcessServer
from .proxy import FaultProxy

__all__ = ["TestServer", "test_server"]


class TestServer:
    """A sync server on 127.0.0.1 on its own thread, with an optional fault proxy in front."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        data_dir: str | Path,
        *,
        config: ServerConfig | None = None,
        faults: bool = False,
        seed: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.server = InProcessServer(self.data_dir, config=config)
        self._faults = faults
        self._seed = seed
        self._proxy: FaultProxy | None = None

    @property
    def proxy(self) -> FaultProxy:
        """The fault proxy (only with ``faults=True``)."""
        if self._proxy is None:
            raise RuntimeError("this TestServer has no fault proxy (pass faults=True)")
        return self._proxy

    @property
    def server_url(self) -> str:
        """The server's own URL (bypasses the proxy)."""
        return self.server.url

    @property
    def url(self) -> str:
        """The URL clients should use: the proxy's with ``faults=True``, else the server's."""
        return self._proxy.url if self._proxy is not None else self.server.url

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server (and the proxy); returns once both accept connections."""
        self.server.start_in_thread(timeout)
        if self._faults:
            proxy = FaultProxy("127.0.0.1", self.server.port, seed=self._seed)
            try:
                proxy.start_in_thread(timeout=timeout)
            except BaseException:
                self.server.stop_thread(timeout)
                raise
            self._proxy = proxy
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the proxy, then the server (idempotent)."""
        proxy, self._proxy = self._proxy, None
        try:
            if proxy is not None:
                proxy.stop_thread(timeout)
        finally:
            self.server.stop_thread(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def test_server(
    data_dir: str | Path, *, faults: bool = False, seed: int | None = None
) -> Iterator[TestServer]:
    """A generator for a pytest fixture: ``yield from test_server(tmp_path / "srv")``."""
    with TestServer(data_dir, faults=faults, seed=seed) as server:
        yield server


test_server.__test__ = False  # type: ignore[attr-defined]
