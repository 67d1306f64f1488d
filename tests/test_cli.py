"""The ``tidesync`` command line as real processes: ``--version``, ``serve``'s option checks
(each mistake one ``error:`` line and exit status 2, never a traceback or a usage panel).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tidesync
from tidesync.testing.process import ServerProcess


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``tidesync ARGS`` to its end, with its output."""
    cmd = [sys.executable, "-m", "tidesync.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The one ``error:`` line a failed command printed (checked: status, nothing else)."""
    assert result.returncode == status, result
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert result.stdout == "", result.stdout  # nothing served, no ready line
    return lines[0]


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tidesync {tidesync.__version__}\n"


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``tidesync serve`` with ``args`` (port 0 and a fresh data folder unless given)."""
    base = [] if "--port" in args else ["--port", "0"]
    if "--data" not in args:
        base += ["--data", str(tmp_path / "data")]
    return run_cli("serve", *base, *args, timeout=30)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--port", "70000"), "--port 70000 is outside 0-65535"),
        (("--port", "-1"), "--port -1 is outside 0-65535"),
        (("--port", "abc"), "'--port'"),
        (("--log-level", "loud"), "--log-level 'loud' is not one of critical, error"),
        (("--log-format", "xml"), "--log-format 'xml' is not one of text, json"),
        (("--access-token-ttl", "-5"), "--access-token-ttl must be a positive number"),
        (("--access-token-ttl", "nan"), "--access-token-ttl must be a positive number"),
        (("--max-frame-size", "10"), "--max-frame-size must be at least 4096 bytes"),
        (("--history-retention-days", "-1"), "--history-retention-days must not be negative"),
        (("--prot", "1"), "No such option: --prot"),
    ],
)
def test_serve_refuses_a_bad_option_in_one_line(
    tmp_path: Path, args: tuple[str, ...], named: str
) -> None:
    line = one_error_line(_serve(tmp_path, *args))
    assert named in line
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_serve_refuses_a_data_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("not a folder")
    line = one_error_line(_serve(tmp_path, "--data", str(path)))
    assert f"--data {path} exists and is not a directory" in line
    assert path.read_text() == "not a folder"


def test_serve_refuses_a_data_folder_it_cannot_create(tmp_path: Path) -> None:
    parent = tmp_path / "file"
    parent.write_text("")
    target = parent / "data"  # under a file: no one can create it
    line = one_error_line(_serve(tmp_path, "--data", str(target)))
    assert f"--data {target} cannot be created" in line


def test_serve_names_the_file_and_line_of_a_config_that_does_not_parse(tmp_path: Path) -> None:
    config = tmp_path / "tidesync.toml"
    config.write_text("[server]\ndevelopment_mode = true\nlog_level = \n")
    line = one_error_line(_serve(tmp_path, "--config", str(config)))
    assert str(config) in line and "line 3" in line


def test_serve_on_a_data_folder_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "data").start()
    try:
        line = one_error_line(_serve(tmp_path, "--data", str(tmp_path / "data")))
        assert first.proc is not None and f"pid {first.proc.pid}" in line
    finally:
        first.kill()


def test_serve_on_a_port_in_use_is_one_line_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(_serve(tmp_path, "--port", str(port)), status=1)
    assert str(port) in line


def test_keys_and_schema_mistakes_are_one_line_exit_2(tmp_path: Path) -> None:
    line = one_error_line(run_cli("keys", "list", "--data", str(tmp_path / "nowhere")))
    assert "is not a server's data folder" in line
    line = one_error_line(run_cli("schema", "export", "--app", "a", "--data", str(tmp_path)))
    assert "no server data in" in line
    line = one_error_line(run_cli("keys", "rotate", "--after", "-1", "--data", str(tmp_path)))
    assert "'--after'" in line
    assert "No such command 'nosuch'" in one_error_line(run_cli("nosuch"))
