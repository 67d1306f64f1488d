"""``tidesync data query|export|import`` as real processes against a real server: a round
trip of every field type through JSON Lines, batches, resuming, and every mistake one
``error:`` line with exit status 2 (1 for a server that cannot be reached)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidesync.admin import AdminClient
from tidesync.server.settings import load_config
from tidesync.testing import TestServer

from .api_helpers import ADMIN_KEY, write_config
from .test_cli import one_error_line


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    root = tmp_path_factory.mktemp("cli-data")
    with TestServer(root / "server", config=load_config(write_config(root))) as srv:
        yield srv


def data(server: TestServer, *args: str, key: str = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
    """``tidesync data ARGS`` with the server, app and key in the environment."""
    env = dict(os.environ, TIDESYNC_SERVER=server.url, TIDESYNC_APP="todo", TIDESYNC_ADMIN_KEY=key)
    cmd = [sys.executable, "-m", "tidesync.cli", "data", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


THING = {
    "flag": True,
    "big": "9007199254740993",
    "ratio": "NaN",
    "name": "<b>x</b>",
    "blob": "AAEC/w==",
    "at": "2026-12-08T03:53:15.123456Z",
    "price": "12.50",
    "uid": "5f0c9a2e-8d4b-4c1e-9a7f-1b2c3d4e5f60",
    "oid": "65a1f0c2e4b0a1b2c3d4e5f6",
    "hits": 3,
    "tags": ["b", "a"],
    "labels": ["x", "y"],
    "scores": {"k": 1.5},
    "task": None,
}


def test_export_then_import_round_trips_every_field(server: TestServer, tmp_path: Path) -> None:
    with AdminClient(server.url, "todo", api_key=ADMIN_KEY) as admin:
        admin.insert("Thing", [{"id": i, **THING} for i in range(1, 8)], raw=True)
    exported = data(server, "export", "Thing")
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(1, 8))
    assert all({k: v for k, v in r.items() if k != "id"} == THING for r in rows)
    assert "exported 7 object(s)" in exported.stderr
    # into new keys: the file's objects, renumbered
    file = tmp_path / "things.jsonl"
    file.write_text("".join(json.dumps({**r, "id": r["id"] + 100}) + "\n" for r in rows))
    imported = data(server, "import", "Thing", str(file), "--batch", "3")
    assert imported.returncode == 0, imported.stderr
    assert "imported 7 object(s)" in imported.stderr
    assert not file.with_name("things.jsonl.progress").exists()
    again = data(server, "query", "Thing", "id > 100", "--json", "--sort", "id")
    assert again.returncode == 0, again.stderr
    back = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["id"] for r in back] == list(range(101, 108))
    assert all({k: v for k, v in r.items() if k != "id"} == THING for r in back)


def test_query_prints_a_table(server: TestServer) -> None:
    with AdminClient(server.url, "todo", api_key=ADMIN_KEY) as admin:
        admin.insert("Thing", {"id": 50, **THING}, raw=True)
    shown = data(server, "query", "Thing", "id == 50")
    assert shown.returncode == 0, shown.stderr
    assert "Thing: 1 object(s)" in shown.stdout and "<b>x</b>" in shown.stdout


def test_a_bad_line_stops_the_import_and_resume_goes_on(server: TestServer, tmp_path: Path) -> None:
    file = tmp_path / "resume.jsonl"
    good = [json.dumps({"id": 200 + i, **THING}) for i in range(4)]
    file.write_text("\n".join([*good[:2], "{not json", *good[2:]]) + "\n")
    failed = data(server, "import", "Thing", str(file), "--batch", "2")
    line = one_error_line(failed)
    assert "resume.jsonl:3" in line
    progress = file.with_name("resume.jsonl.progress")
    assert progress.read_text() == "2"  # the first batch is stored and noted
    file.write_text("\n".join([*good[:2], json.dumps({"id": 299, **THING}), *good[2:]]) + "\n")
    resumed = data(server, "import", "Thing", str(file), "--batch", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "imported 3 object(s)" in resumed.stderr  # lines 3-5 only
    with AdminClient(server.url, "todo", api_key=ADMIN_KEY) as admin:
        ids = sorted(t["id"] for t in admin.query("Thing", "id >= 200 AND id < 300"))
    assert ids == [200, 201, 202, 203, 299]


def test_mistakes_are_one_line(server: TestServer, tmp_path: Path) -> None:
    assert "Nope" in one_error_line(data(server, "query", "Nope"))
    assert "position" in one_error_line(data(server, "query", "Thing", "id ===")).lower()
    assert "401" not in one_error_line(data(server, "query", "Thing", key="wrong-key-12345678"))
    wrong_type = tmp_path / "wrong.jsonl"
    wrong_type.write_text(json.dumps({"id": 400, **THING, "flag": "yes"}) + "\n")
    assert "Thing.flag" in one_error_line(data(server, "import", "Thing", str(wrong_type)))
    assert "no such file" in one_error_line(data(server, "import", "Thing", "/nonexistent"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDESYNC_")}
    missing = subprocess.run(
        [sys.executable, "-m", "tidesync.cli", "data", "query", "Thing"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "--server" in one_error_line(missing)
    gone = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidesync.cli",
            "data",
            "query",
            "Thing",
            "--server",
            "http://127.0.0.1:9",
            "--app",
            "todo",
            "--admin-key",
            ADMIN_KEY,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "could not be reached" in one_error_line(gone, status=1)
