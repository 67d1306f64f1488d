"""The declared schema (issue 19, item 1): a production config pins each app's models and
fields; BINDs that go beyond it are refused and store nothing; a BIND of fewer models or
fields (an older release) syncs; development mode is bounded by caps; a declared schema that
would retype or drop stored data stops ``tidesync serve`` with one line and exit code 2.

The integration tests run ``tidesync serve --config`` as a child process, with raw protocol
clients for the hostile BINDs and real devices (tidesync clients, SQLite files) for the
honest ones."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

import tidesync as ts
from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack_instructions
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.errors import ConfigurationError, SchemaPinError
from tidesync.protocol.client import (
    ClientEvent,
    ClientProtocol,
    DownloadReceived,
    ErrorReceived,
    SessionBound,
    Welcomed,
)
from tidesync.protocol.messages import ErrorCode, UploadChangeset
from tidesync.server.runner import InProcessServer
from tidesync.server.schemapin import parse_schema, parse_type, schema_toml
from tidesync.server.settings import load_config
from tidesync.testing import ServerProcess

from .flex_helpers import FAST

E = TypeVar("E")
T = ts.TimeoutCancellationToken
APP = "todo"


class Task(ts.Model):
    id: str = ts.primary_key()
    owner_id: str = ""
    summary: str = ""
    priority: int | None = None


DECLARED = """
[apps.todo]
auth = ["anonymous"]

[apps.todo.schema.Task]
primary_key = "id"
fields = { id = "str", owner_id = "str", summary = "str", priority = "int | None" }

[apps.todo.schema.Tag]
primary_key = "name"
fields = { name = "str", colour = "str | None" }
"""


def task_schema(*extra: FieldSchema, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Task's schema as a device sends it, without ``drop`` and with ``extra`` fields."""
    base = Task.__schema__
    fields = tuple(f for f in base.fields if f.name not in drop) + extra
    return ModelSchema("Task", fields, base.primary_key).to_dict()


def junk_model(name: str) -> dict[str, Any]:
    return ModelSchema(name, (FieldSchema("id", Kind.STR, primary_key=True),), "id").to_dict()


# -- a raw protocol client (hostile and old-release BINDs) --------------------------------------


class Raw:
    """One sync connection driven by a bare ClientProtocol."""

    def __init__(self, ws: ClientConnection, proto: ClientProtocol) -> None:
        self.ws, self.proto = ws, proto
        self.events: list[ClientEvent] = []

    @classmethod
    async def connect(cls, server: ServerProcess) -> Raw:
        async with httpx.AsyncClient(base_url=server.url) as http:
            answer = await http.post(f"/api/v1/apps/{APP}/auth/anonymous", json={})
        assert answer.status_code == 200, answer.text
        url = "ws" + server.url[len("http") :] + f"/api/v1/apps/{APP}/sync"
        raw = cls(await websockets.connect(url, max_size=None), ClientProtocol())
        raw.proto.start(answer.json()["access_token"])
        await raw.flush()
        await raw.expect(Welcomed)
        return raw

    async def flush(self) -> None:
        for frame in self.proto.data_to_send():
            await self.ws.send(frame)

    async def expect(self, kind: type[E], within: float = 10.0) -> E:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            while not self.events:
                frame = await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - loop.time()))
                assert isinstance(frame, bytes)
                self.events.extend(self.proto.receive_data(frame))
                await self.flush()
            event = self.events.pop(0)
            if isinstance(event, kind):
                return event
            if isinstance(event, ErrorReceived):
                raise AssertionError(f"unexpected error: {event}")

    async def bind(self, session: int, file_ident: str, schema: list[dict[str, Any]]) -> None:
        self.proto.bind(session, file_ident, schema, 0, 0)
        await self.flush()

    async def refused(self, session: int, file_ident: str, schema: list[dict[str, Any]]) -> str:
        """BIND, expect session ERROR 225; its message."""
        await self.bind(session, file_ident, schema)
        error = await self.expect(ErrorReceived)
        assert (error.code, error.session) == (ErrorCode.BAD_SCHEMA, session), error
        self.proto.unbind(session)
        await self.flush()
        return error.message

    async def upload_create(self, session: int, pk: str, value: dict[str, Any]) -> None:
        hlc = HLC(int(time.time() * 1000), 0, "raw")
        ins = Instruction(Op.CREATE, "Task", pk, hlc, value=value)
        cursor = self.proto.progress(session).download_cursor
        self.proto.upload(session, [UploadChangeset(1, pack_instructions([ins]))], cursor)
        await self.flush()

    async def close(self) -> None:
        await self.ws.close()


# -- the server and what it stored ----------------------------------------------------------------


def start(tmp_path: Path, config: str, name: str = "tidesync.toml") -> ServerProcess:
    path = tmp_path / name
    path.write_text(textwrap.dedent(config))
    return ServerProcess(tmp_path / "server", extra_args=["--config", str(path)]).start()


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start(tmp_path, DECLARED)
    try:
        yield proc
    finally:
        proc.kill()


def stored(server: ServerProcess) -> dict[str, ModelSchema]:
    """The schemas the server's storage holds for the app (read from its SQLite file)."""
    with sqlite3.connect(f"file:{server.data_dir / 'server.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT definition FROM schemas WHERE app = ?", (APP,)).fetchall()
    models = [ModelSchema.from_dict(json.loads(d)) for (d,) in rows]
    return {m.name: m for m in models}


def clients(server: ServerProcess) -> set[str]:
    with sqlite3.connect(f"file:{server.data_dir / 'server.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT origin FROM clients WHERE app = ?", (APP,)).fetchall()
    return {origin for (origin,) in rows}


def fields(server: ServerProcess, model: str) -> dict[str, str]:
    return {f.name: f.type_name() for f in stored(server)[model].fields}


class Device:
    """A real tidesync client with the app's current release of Task."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration(APP, base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None

    async def open(self) -> ts.Database:
        user = await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, [Task], sync_error_handler=lambda s, e: self.errors.append(e)
        )
        self.db = ts.Database(config)
        with self.db.subscriptions.update() as subs:
            subs.add(self.db.all(Task), name="all")
        await self.db.subscriptions.wait_for_synchronization(T(20))
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.app.close()


# -- the type syntax and the loader (pure) -------------------------------------------------------


def test_type_names_round_trip() -> None:
    for text in (
        "bool",
        "int | None",
        "float",
        "str",
        "bytes | None",
        "datetime",
        "decimal",
        "uuid",
        "objectid",
        "counter",
        "list[str]",
        "set[int | None]",
        "dict[str, float]",
        "Task | None",
        "list[Task]",
    ):
        assert parse_type("f", text).type_name() == text
    for bad in ("int | str", "list[int", "dict[int, str]", "Task-1"):
        with pytest.raises(ValueError, match="type"):
            parse_type("f", bad)


def test_exported_toml_reads_back_as_the_same_schema() -> None:
    declared = parse_schema(
        {
            "Task": {
                "primary_key": "id",
                "fields": {
                    "id": "objectid",
                    "title": {"type": "str", "indexed": True},
                    "tags": "list[str]",
                    "parent": "Task | None",
                    "votes": "counter",
                },
            }
        },
        "apps.todo.schema",
    )
    text = schema_toml(declared, "apps.todo.schema.")
    again = parse_schema(tomllib.loads(text)["apps"]["todo"]["schema"], "apps.todo.schema")
    assert again == declared
    assert [f.to_dict() for f in again["Task"].fields] == [
        f.to_dict() for f in declared["Task"].fields
    ]


def test_config_mistakes_are_named(tmp_path: Path) -> None:
    def load(body: str) -> None:
        path = tmp_path / "c.toml"
        path.write_text(textwrap.dedent(body))
        load_config(path)

    head = '[apps.todo]\nauth = ["anonymous"]\n'
    with pytest.raises(ConfigurationError, match=r"apps\.todo\.schema\.Task\.fields\.n"):
        load(head + '[apps.todo.schema.Task]\nprimary_key = "id"\nfields = {id = "str", n = "nt"}')
    with pytest.raises(ConfigurationError, match="primary_key"):
        load(head + '[apps.todo.schema.Task]\nprimary_key = "x"\nfields = {id = "str"}')
    with pytest.raises(ConfigurationError, match="'User' is neither a type"):
        load(head + '[apps.todo.schema.Task]\nprimary_key = "id"\nfields = {id="str", u="User"}')
    with pytest.raises(ConfigurationError, match="primary key 'id' cannot be float"):
        load(head + '[apps.todo.schema.Task]\nprimary_key = "id"\nfields = {id = "float"}')
    with pytest.raises(ConfigurationError, match=r"names model.*does not declare: Tsk"):
        load(
            head + '[apps.todo.schema.Task]\nprimary_key = "id"\nfields = {id = "str"}\n'
            "[apps.todo.rules.Tsk]\nread = true\n"
        )
    (tmp_path / "todo-schema.toml").write_text('[Task]\nprimary_key = "id"\nfields = {id="str"}\n')
    load(head + 'schema_file = "todo-schema.toml"\n')
    with pytest.raises(ConfigurationError, match="cannot read"):
        load(head + 'schema_file = "missing.toml"\n')


# -- production: BINDs against the declared schema ----------------------------------------------


async def test_undeclared_model_is_refused_and_nothing_is_stored(pinned: ServerProcess) -> None:
    before = stored(pinned)
    assert set(before) == {"Task", "Tag"}  # stored at start, before any client came
    raw = await Raw.connect(pinned)
    try:
        await raw.bind(1, "honest-file", [task_schema()])
        await raw.expect(SessionBound)
        junk = [junk_model(f"Junk{i}") for i in range(2_000)]
        wider = task_schema(FieldSchema("x", Kind.STR, optional=True))
        message = await raw.refused(2, "junk-file", [*junk[:5], wider, *junk[5:]])
        assert "model 'Junk0' is not declared" in message
        assert "field Task.x is not declared" in message  # named with the junk
        assert "model 'Junk8' is not declared" in message and "and 1991 more" in message
        message = await raw.refused(3, "twice-file", [task_schema(), task_schema()])
        assert "model 'Task' appears more than once" in message
        assert stored(pinned) == before
        assert not {"junk-file", "twice-file"} & clients(pinned)
        # the connection's other session keeps syncing
        await raw.upload_create(1, "t1", {"id": "t1", "owner_id": "", "summary": "still here"})
        while raw.proto.progress(1).upload_acked < 1:
            await raw.expect(DownloadReceived)
    finally:
        await raw.close()


async def test_undeclared_field_and_wrong_type_are_refused_naming_each(
    pinned: ServerProcess,
) -> None:
    before = stored(pinned)
    raw = await Raw.connect(pinned)
    try:
        hostile = task_schema(
            FieldSchema("secret", Kind.STR, optional=True),
            FieldSchema("extra", Kind.BYTES, optional=True),
            drop=("priority",),
        )
        hostile["fields"].append({"name": "priority", "kind": "str", "optional": True})
        message = await raw.refused(1, "hostile-file", [hostile])
        assert "field Task.secret is not declared" in message
        assert "field Task.extra is not declared" in message
        assert "field Task.priority is str | None, declared int | None" in message
        required = task_schema(drop=("priority",))
        required["fields"].append({"name": "priority", "kind": "int"})
        message = await raw.refused(2, "hostile-2", [required])
        assert "field Task.priority is int, declared int | None" in message
        other_pk = ModelSchema(
            "Tag", (FieldSchema("colour", Kind.STR, primary_key=True),), "colour"
        )
        message = await raw.refused(3, "hostile-3", [other_pk.to_dict()])
        assert "model Tag: primary key 'colour' is not the declared 'name'" in message
        assert stored(pinned) == before
        assert not {"hostile-file", "hostile-2", "hostile-3"} & clients(pinned)
        await raw.bind(4, "honest-file", [task_schema()])  # the connection is still fine
        await raw.expect(SessionBound)
    finally:
        await raw.close()


async def test_an_older_release_with_fewer_models_and_fields_syncs(
    tmp_path: Path, pinned: ServerProcess
) -> None:
    device = Device(tmp_path, "new", pinned.url)
    raw = await Raw.connect(pinned)
    try:
        db = await device.open()
        await raw.bind(1, "old-file", [task_schema(drop=("priority",))])  # no Tag, no priority
        await raw.expect(SessionBound)
        await raw.upload_create(1, "old", {"id": "old", "owner_id": "", "summary": "from v1"})
        with db.write():
            db.add(Task(id="new", summary="from v2", priority=3))
        await db.sync_session.wait_for_upload(T(20))
        got: list[Any] = []
        while not got:  # the old release downloads the new one's write
            got = (await raw.expect(DownloadReceived)).changesets
        await db.sync_session.wait_for_download(T(20))
        old = db.find(Task, "old")
        assert old is not None and (old.summary, old.priority) == ("from v1", None)
        assert fields(pinned, "Task")["priority"] == "int | None"
        assert device.errors == []
    finally:
        await raw.close()
        device.close()


async def test_a_hostile_first_bind_cannot_shape_the_schema(
    tmp_path: Path, pinned: ServerProcess
) -> None:
    raw = await Raw.connect(pinned)
    device = Device(tmp_path, "fresh", pinned.url)
    try:
        hostile = task_schema(drop=("priority",))
        hostile["fields"].append({"name": "priority", "kind": "str", "optional": True})
        await raw.refused(1, "first-file", [hostile])
        assert fields(pinned, "Task")["priority"] == "int | None"
        db = await device.open()  # the app's release with priority: int binds and syncs
        with db.write():
            db.add(Task(id="t", summary="mine", priority=7))
        await db.sync_session.wait_for_upload(T(20))
        assert device.errors == []
        assert {n: m.to_dict() for n, m in stored(pinned).items()} == {
            n: m.to_dict()
            for n, m in load_config(pinned.data_dir.parent / "tidesync.toml")
            .auth.apps[APP]
            .schema.items()  # type: ignore[union-attr]
        }
    finally:
        await raw.close()
        device.close()


# -- development mode: bounded ---------------------------------------------------------------------


async def test_development_mode_caps_models_and_fields(tmp_path: Path) -> None:
    proc = start(
        tmp_path,
        """
        [server]
        development_mode = true

        [limits]
        max_models_per_app = 5
        max_fields_per_model = 6
        """,
    )
    raw = await Raw.connect(proc)
    try:
        await raw.bind(1, "f1", [task_schema(), junk_model("J0"), junk_model("J1")])
        await raw.expect(SessionBound)
        assert set(stored(proc)) == {"Task", "J0", "J1"}
        many = [junk_model(f"K{i}") for i in range(3)]
        message = await raw.refused(2, "f2", many)
        assert "at most 5 models per app (limits.max_models_per_app)" in message
        assert set(stored(proc)) == {"Task", "J0", "J1"}
        wide = task_schema(*(FieldSchema(f"x{i}", Kind.INT, optional=True) for i in range(3)))
        message = await raw.refused(3, "f3", [wide])
        assert "at most 6 fields per model (limits.max_fields_per_model)" in message
        assert "model 'Task' has 7" in message
        assert set(fields(proc, "Task")) == {"id", "owner_id", "summary", "priority"}
        # within the caps, development mode still learns: two more fields, two more models
        wider = task_schema(*(FieldSchema(f"x{i}", Kind.INT, optional=True) for i in range(2)))
        await raw.bind(4, "f4", [wider, junk_model("K0"), junk_model("K1")])
        await raw.expect(SessionBound)
        assert len(stored(proc)) == 5 and len(fields(proc, "Task")) == 6
        message = await raw.refused(
            5, "f5", [task_schema(FieldSchema("y", Kind.INT, optional=True))]
        )
        assert "model Task would have 7" in message  # each BIND is small, the sum is not
        assert len(fields(proc, "Task")) == 6
    finally:
        await raw.close()
        proc.kill()


# -- changing the declared schema ----------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``tidesync ARGS`` to its end (called in a thread: it blocks)."""
    cmd = [sys.executable, "-m", "tidesync.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


async def serve_once(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "changed.toml"
    path.write_text(textwrap.dedent(config))
    data = str(tmp_path / "server")
    return await asyncio.to_thread(
        run_cli, "serve", "--port", "0", "--data", data, "--config", str(path)
    )


async def test_schema_changes_at_restart(tmp_path: Path) -> None:
    proc = start(tmp_path, DECLARED)
    device = Device(tmp_path, "d", proc.url)
    try:
        db = await device.open()
        with db.write():
            db.add(Task(id="t", summary="kept", priority=1))
        await db.sync_session.wait_for_upload(T(20))
    finally:
        device.close()
        assert proc.stop() == 0

    retyped = DECLARED.replace('priority = "int | None"', 'priority = "str | None"')
    removed = DECLARED.replace(', priority = "int | None"', "")
    required = DECLARED.replace('colour = "str | None"', 'colour = "str | None", size = "int"')
    for config, named in (
        (retyped, "field Task.priority changed type from int | None to str | None"),
        (removed, "field Task.priority (int | None) is stored but not declared"),
        (required, "new field Tag.size (int) must be optional"),
        (DECLARED.split("[apps.todo.schema.Tag]")[0], "model 'Tag' is stored but not declared"),
    ):
        result = await serve_once(tmp_path, config)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: apps.todo.schema"), result.stderr
        assert named in lines[0] and "issue 24" in lines[0]
        assert "Traceback" not in result.stdout + result.stderr
    # embedded, the same check raises SchemaPinError before anything listens
    embedded = InProcessServer(tmp_path / "server", config=load_config(tmp_path / "changed.toml"))
    with pytest.raises(SchemaPinError, match="model 'Tag' is stored but not declared"):
        await embedded.start()

    # additive: a new model and a new optional field start, and are stored
    additive = DECLARED.replace(
        ', priority = "int | None"', ', priority = "int | None", note = "str | None"'
    )
    additive += '\n[apps.todo.schema.Label]\nprimary_key = "id"\nfields = { id = "int" }\n'
    again = start(tmp_path, additive, "additive.toml")
    try:
        assert set(stored(again)) == {"Task", "Tag", "Label"}
        assert fields(again, "Task")["note"] == "str | None"
        assert fields(again, "Task")["priority"] == "int | None"
    finally:
        again.kill()


async def test_exported_schema_pins_what_development_mode_learnt(tmp_path: Path) -> None:
    proc = start(tmp_path, "[server]\ndevelopment_mode = true\n", "dev.toml")
    device = Device(tmp_path, "d", proc.url)
    try:
        await device.open()
    finally:
        device.close()
        assert proc.stop() == 0
    cmd = ("schema", "export", "--app", APP, "--data")
    result = await asyncio.to_thread(run_cli, *cmd, str(tmp_path / "server"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('[apps.todo.schema.Task]\nprimary_key = "id"\n')
    assert 'priority = "int | None"' in result.stdout
    config = '[apps.todo]\nauth = ["anonymous"]\n\n' + result.stdout
    pinned = start(tmp_path, config, "exported.toml")
    raw = await Raw.connect(pinned)
    try:
        message = await raw.refused(1, "f1", [task_schema(), junk_model("Junk")])
        assert "model 'Junk' is not declared" in message
        await raw.bind(2, "f2", [task_schema()])
        await raw.expect(SessionBound)
    finally:
        await raw.close()
        pinned.kill()
    missing = await asyncio.to_thread(run_cli, *cmd, str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no server data" in missing.stderr


# -- two processes sharing PostgreSQL ------------------------------------------------------------

PG_DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")


@pytest.mark.skipif(not PG_DSN, reason="TIDESYNC_TEST_PG_DSN is not set")
async def test_two_processes_on_postgresql_hold_the_declared_schema(tmp_path: Path) -> None:
    pytest.importorskip("asyncpg")
    from tidesync.server.storage.postgres import PostgresStorage

    url = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema=ts_pin_{uuid.uuid4().hex[:12]}"
    config = tmp_path / "tidesync.toml"
    config.write_text(textwrap.dedent(DECLARED))
    args = ["--storage", url, "--config", str(config)]
    one = ServerProcess(tmp_path / "one", extra_args=args).start()
    two = ServerProcess(tmp_path / "two", extra_args=args).start()
    try:
        hostile, honest = await Raw.connect(two), await Raw.connect(one)
        try:
            junk = [junk_model(f"Junk{i}") for i in range(50)]
            message = await hostile.refused(1, "junk", [task_schema(), *junk])
            assert "model 'Junk0' is not declared" in message
            await honest.bind(1, "honest", [task_schema()])
            await honest.expect(SessionBound)
        finally:
            await hostile.close()
            await honest.close()
        export = ("schema", "export", "--app", APP, "--storage", url)
        result = await asyncio.to_thread(run_cli, *export)
        assert result.returncode == 0, result.stderr
        declared = load_config(config).auth.apps[APP].schema
        assert declared is not None
        exported = tomllib.loads(result.stdout)["apps"][APP]["schema"]
        assert parse_schema(exported, "exported") == declared
    finally:
        one.kill()
        two.kill()
    try:
        retyped = tmp_path / "retyped.toml"
        retyped.write_text(textwrap.dedent(DECLARED).replace('"int | None"', '"float | None"'))
        result = await asyncio.to_thread(
            run_cli, "serve", "--port", "0", "--storage", url, "--config", str(retyped)
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "field Task.priority changed type from int | None to float | None" in result.stderr
    finally:
        storage = PostgresStorage.from_url(url)
        await storage.open()
        await storage.drop_schema()
        await storage.close()
