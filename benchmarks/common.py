"""Pieces shared by the sync benchmarks: servers, devices, memory readings, percentiles."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tidesync as ts
from tidesync.testing import ServerProcess

from .local import Bench, rows

#: Connection timeouts for benchmark devices (loopback; a stall is a failure, not a wait).
TIMEOUTS = ts.SyncTimeoutOptions(
    connect_timeout=20,
    reconnect_initial_delay=0.1,
    reconnect_max_delay=1.0,
    ping_keep_alive_period=30,
    pong_keep_alive_timeout=30,
    connection_linger_time=1,
)

__all__ = ["TIMEOUTS", "Bench", "rows"]


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory line (VmHWM, VmRSS ...) in bytes (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return 0


def server_pid(server: ServerProcess) -> int:
    """The ``tidesync serve`` process id."""
    assert server.proc is not None
    return server.proc.pid


def peak_mib(server: ServerProcess) -> float:
    """The server's peak resident memory so far (MiB)."""
    return proc_status(server_pid(server), "VmHWM") / 2**20


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


class Device:
    """One app + one user + one synced database: what a device has."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration(
                "bench", base_url=url, base_path=root / name, sync_timeouts=TIMEOUTS
            )
        )
        self.user: ts.User | None = None
        self.db: ts.Database | None = None
        self.errors: list[Exception] = []

    def log_in(self) -> ts.User:
        """Log in a new anonymous user (before timing starts)."""
        self.user = asyncio.run(self.app.log_in(ts.Credentials.anonymous()))
        return self.user

    def open(self, subscribe: bool = True) -> ts.Database:
        """Open the synced database (the session starts at once). With ``subscribe`` (what
        a flexible-sync app does) the device subscribes to every Bench object and waits
        until the subscription is COMPLETE; without it the file stays in whole-app mode (no
        subscription set: it syncs everything its user may read)."""
        user = self.user or self.log_in()

        def initial(db: ts.Database) -> None:  # before the session starts, as apps do
            with db.subscriptions.update() as subs:
                subs.add(db.all(Bench), name="all")

        config = ts.Configuration.flexible_sync(
            user,
            [Bench],
            sync_error_handler=lambda s, e: self.errors.append(e),
            initial_subscriptions=initial if subscribe else None,
        )
        self.db = ts.Database(config)
        if subscribe:
            token = ts.TimeoutCancellationToken(900)
            asyncio.run(self.db.subscriptions.wait_for_synchronization(token))
        return self.db

    def count(self) -> int:
        """How many benchmark objects the device holds."""
        assert self.db is not None
        return len(self.db.all(Bench))

    def wait_upload(self, limit: float) -> None:
        """Until the server acknowledged every local change."""
        assert self.db is not None
        asyncio.run(self.db.sync_session.wait_for_upload(ts.TimeoutCancellationToken(limit)))

    def wait_count(self, n: int, limit: float) -> None:
        """Until the device holds ``n`` objects (wait_for_download, then check)."""
        assert self.db is not None
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the device holds {self.count()} of {n} objects")
            asyncio.run(self.db.sync_session.wait_for_download(ts.TimeoutCancellationToken(left)))
            if self.count() >= n:
                return

    def close(self) -> None:
        """Close the database and the app (stops the sync thread)."""
        if self.db is not None:
            self.db.close()
        self.app.close()


def write_objects(
    db: ts.Database, data: list[tuple[int, str, str, int, float, bool]], per_tx: int
) -> None:
    """Add ``data`` as Bench objects, ``per_tx`` per write transaction."""
    for start in range(0, len(data), per_tx):
        with db.write():
            for i, owner, title, qty, price, done in data[start : start + per_tx]:
                db.add(Bench(id=i, owner=owner, title=title, qty=qty, price=price, done=done))


def worker_process(*args: str) -> subprocess.Popen[str]:
    """``python -m benchmarks.worker ARGS...``, driven over its stdin and stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.worker", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    """Close the workers' stdin (their signal to finish), then wait for them (bounded:
    a worker that does not exit within 60 s is killed)."""
    for p in procs:
        if p.stdin is not None:
            p.stdin.close()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def read_line(proc: subprocess.Popen[str], want: str, limit: float) -> str:
    """The next line of a worker's output that starts with ``want`` (a line starting with
    ``error`` raises; so does silence for ``limit`` seconds)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(want):
            return line
        if line.startswith("error"):
            raise RuntimeError(line.strip())
    raise RuntimeError(f"a benchmark worker did not say {want!r} (exit {proc.poll()})")


def start_server(root: Path, name: str) -> ServerProcess:
    """A fresh ``tidesync serve`` process with its own data folder."""
    return ServerProcess(root / name).start(timeout=60)


def env_info() -> dict[str, Any]:
    """CPU count, for the report."""
    return {"cpus": os.cpu_count()}
