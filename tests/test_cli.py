"""The ``tidesync`` command line as real processes: ``--version``, ``serve``'s option checks
(each mistake one ``error:`` line and exit status 2, never a traceback or a usage panel),
and ``inspect`` on real local and synced files (after a real sync with a server).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tidesync
import tidesync as ts
from tidesync.testing import TestServer
from tidesync.testing.process import ServerProcess

from .flex_helpers import FAST


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


# -- inspect -------------------------------------------------------------------------------------


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""
    tags: list[str]
    n: int = ts.field(default=0, indexed=True)


class Tag(ts.Model):
    name: str = ts.primary_key()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changelog(path: Path) -> list[tuple[int, int]]:
    """``(version, len(data))`` of every changeset the file's change log holds."""
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT version, data FROM _changelog ORDER BY version").fetchall()
    return [(int(v), len(d)) for v, d in rows]


def inspect_json(path: Path) -> dict[str, Any]:
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_inspect_a_local_file_with_objects_and_pending_changes(tmp_path: Path) -> None:
    path = tmp_path / "local.tidesync"
    with ts.Database(ts.Configuration.local([Note, Tag], path=path)) as db:
        with db.write():
            for i in range(7):
                db.add(Note(id=f"n{i}", text="x" * i, tags=["a", "b"], n=i))
            db.add(Tag(name="[red]"))
        with db.write():
            gone, changed = db.find(Note, "n0"), db.find(Note, "n1")
            assert gone is not None and changed is not None
            db.delete(gone)
            changed.text = "changed"
    before = digest(path)
    log = changelog(path)
    assert len(log) == 2

    report = inspect_json(path)
    assert digest(path) == before  # read-only: not one byte changed
    assert report["file_bytes"] == path.stat().st_size
    assert {name: m["objects"] for name, m in report["models"].items()} == {"Note": 6, "Tag": 1}
    note = report["models"]["Note"]
    assert note["primary_key"] == "id"
    assert [(f["name"], f["type"]) for f in note["fields"]] == [
        ("id", "str"),
        ("text", "str"),
        ("tags", "list[str]"),
        ("n", "int"),
    ]
    assert [f["name"] for f in note["fields"] if f["primary_key"]] == ["id"]
    assert report["pending"] == {"changesets": 2, "bytes": sum(size for _, size in log)}
    assert report["cursors"] == {"download_cursor": 0, "upload_acked": 0, "last_version": 2}
    assert report["subscription_set"] is None and report["subscriptions"] == []

    human = run_cli("inspect", str(path))
    assert human.returncode == 0, human.stderr
    assert "list[str]" in human.stdout  # escaped, not taken for rich markup
    for word in ("Note", "Tag", "pending changesets", "last version", "No subscription set"):
        assert word in human.stdout, human.stdout
    assert digest(path) == before


async def test_inspect_a_synced_file_after_a_sync(tmp_path: Path) -> None:
    with TestServer(tmp_path / "server") as server:
        app = ts.App(
            ts.AppConfiguration(
                "todo", base_url=server.url, base_path=tmp_path / "d", sync_timeouts=FAST
            )
        )
        try:
            user = await app.log_in(ts.Credentials.anonymous())
            db = ts.Database(ts.Configuration.flexible_sync(user, [Note, Tag]))
            try:
                with db.subscriptions.update() as subs:
                    subs.add(db.query(Note, "n >= $0", 2), name="big notes")
                    subs.add(db.all(Tag))
                await db.subscriptions.wait_for_synchronization(ts.TimeoutCancellationToken(20))
                with db.write():
                    for i in range(5):
                        db.add(Note(id=f"s{i}", n=i + 2))
                with db.write():
                    db.add(Tag(name="t"))
                await db.sync_session.wait_for_upload(ts.TimeoutCancellationToken(20))
                path = Path(db.path)
                # read while the device still has the file open and syncing
                report = await asyncio.to_thread(inspect_json, path)
            finally:
                db.close()
        finally:
            app.close()
    assert {name: m["objects"] for name, m in report["models"].items()} == {"Note": 5, "Tag": 1}
    assert report["pending"] == {"changesets": 0, "bytes": 0}
    cursors = report["cursors"]
    assert cursors["last_version"] == 2 and cursors["upload_acked"] == 2
    assert cursors["download_cursor"] > 0
    assert report["subscription_set"]["state"] == "complete"
    assert report["subscription_set"]["version"] >= 1
    subs = {(s["name"], s["model"]): (s["query"], s["args"]) for s in report["subscriptions"]}
    assert subs == {("big notes", "Note"): ("n >= $0", [2]), (None, "Tag"): ("TRUEPREDICATE", [])}
    human = await asyncio.to_thread(run_cli, "inspect", str(path))
    assert "complete" in human.stdout and "big notes" in human.stdout


def test_inspect_refuses_what_is_not_a_readable_tidesync_file(tmp_path: Path) -> None:
    line = one_error_line(run_cli("inspect", str(tmp_path / "missing.db")))
    assert "missing.db: no such file" in line
    text = tmp_path / "notes.txt"
    text.write_text("hello, not SQLite " * 100)
    assert "is not a tidesync database" in one_error_line(run_cli("inspect", str(text)))
    assert text.read_text() == "hello, not SQLite " * 100
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert "is not a tidesync database" in one_error_line(run_cli("inspect", str(other)))
    assert "not a file" in one_error_line(run_cli("inspect", str(tmp_path)))


def test_inspect_a_locked_file_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "local.tidesync"
    with ts.Database(ts.Configuration.local([Note], path=path)) as db, db.write():
        db.add(Note(id="a"))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE _meta SET value = value WHERE key = 'origin'")
        line = one_error_line(run_cli("inspect", str(path), "--json"))
        assert "is locked" in line
    finally:
        holder.close()
    assert inspect_json(path)["models"]["Note"]["objects"] == 1  # free again: it reads
