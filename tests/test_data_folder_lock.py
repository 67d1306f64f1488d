"""One data folder, one server: a second server on a folder fails at once, naming the holder.

Real ``tidesync serve`` processes (the second start's exit status and its one line), the
lock's release by SIGKILL, and the same lock for the in-process servers of tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import tidesync as ts
from tidesync.errors import DataFolderInUseError, ServerStartError
from tidesync.server.datalock import LOCK_FILE, DataFolderLock
from tidesync.server.runner import InProcessServer
from tidesync.testing import TestServer
from tidesync.testing.process import ServerProcess


def _serve_once(data: Path) -> subprocess.CompletedProcess[str]:
    """Run a second ``tidesync serve`` on ``data`` to its end (it must not serve)."""
    return subprocess.run(
        [sys.executable, "-m", "tidesync.cli", "serve", "--port", "0", "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_serve_on_the_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        assert first.proc is not None
        started = time.monotonic()
        second = _serve_once(data)
        took = time.monotonic() - started
        assert second.returncode == 2, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 1, second.stderr
        assert "Traceback" not in second.stderr and second.stdout == ""
        assert str(data.resolve()) in lines[0]
        assert f"pid {first.proc.pid}" in lines[0]
        assert took < 20  # at once: no waiting for the lock (the time is Python's start-up)
        assert first.health()  # the first server is untouched
    finally:
        first.kill()


def test_a_server_killed_with_sigkill_leaves_no_stale_lock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    first.kill()  # kill -9: no clean-up ran, the lock file is still there
    assert (data / LOCK_FILE).exists()
    second = ServerProcess(data).start()
    try:
        assert second.health()
        assert second.proc is not None
        assert (data / LOCK_FILE).read_text().strip() == str(second.proc.pid)
    finally:
        second.kill()


async def test_an_in_process_server_takes_the_same_lock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with InProcessServer(data) as first:
        with pytest.raises(DataFolderInUseError) as caught:
            await InProcessServer(data).start()
        message = str(caught.value)
        assert str(data.resolve()) in message and f"pid {os.getpid()}" in message
        assert "this process" in message and caught.value.pid == os.getpid()
        assert isinstance(caught.value, ServerStartError)
        async with httpx.AsyncClient() as http:  # the first one is still serving
            assert (await http.get(f"{first.url}/health")).status_code == 200
    async with InProcessServer(data):  # stopped: the folder is free again
        pass


def test_a_test_server_and_a_serve_process_exclude_each_other(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with TestServer(data):
        second = _serve_once(data)
        assert second.returncode == 2 and f"pid {os.getpid()}" in second.stderr
        with pytest.raises(DataFolderInUseError):
            TestServer(data).start()
    with TestServer(data) as again:  # stopped: free again
        assert httpx.get(f"{again.url}/health").status_code == 200


def test_a_failed_start_releases_the_lock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with TestServer(data) as running:
        busy_port = running.server.port
        blocked = InProcessServer(tmp_path / "other", port=busy_port)
        with pytest.raises(ServerStartError, match="cannot listen"):
            blocked.start_in_thread()
    lock = DataFolderLock(tmp_path / "other")
    lock.acquire()  # the failed start did not keep it
    assert lock.held
    lock.release()


def test_the_error_is_exported_under_the_root() -> None:
    assert issubclass(DataFolderInUseError, ts.TidesyncError)
