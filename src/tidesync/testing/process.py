"""``ServerProcess``: run ``tidesync serve`` as a child process, on loopback, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


class ServerProcess:
    """A ``tidesync serve`` child process on 127.0.0.1.

    The first :meth:`start` picks a free port; later starts (after :meth:`stop` or
    :meth:`kill`) reuse it, so clients reconnect to the same URL.
    """

    def __init__(
        self, data_dir: str | Path, *, port: int = 0, extra_args: list[str] | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the server and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the server is already running")
        cmd = [
            sys.executable,
            "-m",
            "tidesync.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data",
            str(self.data_dir),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if "tidesync serving on " in line:
                self.url = line.split("tidesync serving on ", 1)[1].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
                self._reader = threading.Thread(target=self._drain, daemon=True)
                self._reader.start()
                return self
        self.kill()
        raise RuntimeError("the server did not start:\n" + "".join(self.output[-50:]))

    def _drain(self) -> None:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            self.output.append(line)

    def health(self) -> bool:
        """True if the server answers ``/health``."""
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout)
        self._join()
        return code

    def kill(self) -> None:
        """``kill -9`` the server."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        self._join()

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
