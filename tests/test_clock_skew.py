"""Devices with wrong clocks, against a real ``tidesync serve`` process (docs/merge.md,
"Clocks"): a device 3 days fast, a crafted upload years ahead, and far-future data
already stored. No timestamp a device receives ever stops its session."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tests.flex_helpers import FAST, T
from tests.test_server_process import login
from tests.test_server_sync import SCHEMA, RawClient, create_task
from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC, MAX_AHEAD_MS
from tidesync.core.packing import pack_instructions
from tidesync.errors import SyncAction
from tidesync.protocol.client import DownloadReceived, ErrorReceived, SessionUnbound
from tidesync.protocol.messages import ErrorCode
from tidesync.server.storage import UploadBatch
from tidesync.server.storage.sqlite import SQLiteStorage
from tidesync.testing import ServerProcess
from tidesync.testing.devices import APP_ID, DeviceProcess, check_convergence

DAY_MS = 24 * 3600 * 1000
YEAR_MS = 365 * DAY_MS


class Item(ts.Model):
    id: str = ts.primary_key()
    text: str = ""
    tags: list[str]


def wall_now() -> int:
    return time.time_ns() // 1_000_000


#: Errors a device reports while the server restarts (the tests stop and start it).
RESTART_CODES = {int(ErrorCode.CONNECTION_CLOSED), int(ErrorCode.GOING_AWAY)}


def session_errors(device: Device) -> list[Exception]:
    """The errors a device reported, but for those of a server restart."""
    return [e for e in device.errors if getattr(e, "code", None) not in RESTART_CODES]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.kill()


class Device:
    """An app, a user and a synced database in this process (its clock is right)."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.app = ts.App(
            ts.AppConfiguration("todo", base_url=url, base_path=root / name, sync_timeouts=FAST)
        )
        self.errors: list[Exception] = []
        self.db: ts.Database | None = None

    async def open(self) -> ts.Database:
        user = await self.app.log_in(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(
            user, [Item], sync_error_handler=lambda s, e: self.errors.append(e)
        )
        self.db = ts.Database(config)
        return self.db

    async def synced(self, limit: float = 30) -> dict[str, tuple[str, list[str]]]:
        """Upload, download; the session must still be active. Returns the items."""
        assert self.db is not None
        session = self.db.sync_session
        await session.wait_for_upload(T(limit))
        await session.wait_for_download(T(limit))
        assert session.state is ts.SessionState.ACTIVE, self.errors
        return {i.id: (i.text, list(i.tags)) for i in self.db.all(Item)}

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.app.close()


@pytest.fixture
async def devices(tmp_path: Path, server: ServerProcess) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str) -> Device:
        d = Device(tmp_path, name, server.url)
        await d.open()
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


# A device process whose clock runs fast (tidesync.testing.devices.skew_clock). Steps:
# login; offline (write with the server down: never told the server's time); online
# (download, write, upload); again (download, write x, upload); each prints its items.
SKEWED_DEVICE = textwrap.dedent(
    """
    import asyncio, json, sys
    import tidesync as ts
    from tidesync.testing.devices import skew_clock

    class Item(ts.Model):
        id: str = ts.primary_key()
        text: str = ""
        tags: list[str]

    FAST = ts.SyncTimeoutOptions(connect_timeout=5, reconnect_initial_delay=0.1,
                                 reconnect_max_delay=0.5, connection_linger_time=1)
    T = ts.TimeoutCancellationToken

    async def main(url, base, step, skew):
        skew_clock(skew)
        app = ts.App(ts.AppConfiguration("todo", base_url=url, base_path=base,
                                         sync_timeouts=FAST))
        errors = []
        try:
            if step == "login":
                await app.log_in(ts.Credentials.anonymous())
                print(json.dumps({}))
                return
            config = ts.Configuration.flexible_sync(
                app.current_user, [Item],
                sync_error_handler=lambda s, e: errors.append([e.code, str(e)]))
            db = ts.Database(config)
            session = db.sync_session
            try:
                if step == "offline":
                    with db.write():
                        db.add(Item(id="x", text="skewed-offline", tags=["s1"]))
                    with db.write():
                        db.find(Item, "x").tags.append("s2")
                else:
                    await session.wait_for_download(T(30))
                    with db.write():
                        if step == "online":
                            db.add(Item(id="y", text="skewed-online"))
                        else:
                            db.find(Item, "x").text = "skewed-last"
                    await session.wait_for_upload(T(30))
                    await session.wait_for_download(T(30))
                items = {i.id: [i.text, list(i.tags)] for i in db.all(Item)}
                hlc = db._engine.get_meta("hlc")
                print(json.dumps({"items": items, "errors": errors, "hlc": hlc,
                                  "active": session.state is ts.SessionState.ACTIVE}))
            finally:
                db.close()
        finally:
            app.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


def run_skewed(url: str, base: Path, step: str, skew_ms: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", SKEWED_DEVICE, url, str(base), step, str(skew_ms)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


async def test_a_device_three_days_fast_stops_nobody_and_wall_clock_order_wins(
    tmp_path: Path, server: ServerProcess, devices: Any
) -> None:
    skew = 3 * DAY_MS
    fast = tmp_path / "fast"
    a = await devices("a")  # an existing device, syncing all along
    assert await a.synced() == {}
    run_skewed(server.url, fast, "login", skew)
    # offline before it ever heard the server's time: stamped 3 days ahead
    server.stop()
    run_skewed(server.url, fast, "offline", skew)
    server.start()
    online = run_skewed(server.url, fast, "online", skew)
    assert online["active"] is True
    assert online["items"] == {"x": ["skewed-offline", ["s1", "s2"]], "y": ["skewed-online", []]}
    # the existing device downloads it and goes on
    assert await a.synced() == {"x": ("skewed-offline", ["s1", "s2"]), "y": ("skewed-online", [])}
    # the server told the fast device its clock was wrong; it re-stamped its offline writes
    codes = [code for code, _ in online["errors"]]
    assert codes == [int(ErrorCode.CLOCK_SKEW)], online["errors"]
    assert "clock is wrong" in online["errors"][0][1]
    assert json.loads(online["hlc"])[0] < wall_now() + MAX_AHEAD_MS  # its clock is sane now
    # the existing device's later writes win over the fast device's earlier ones
    assert a.db is not None
    with a.db.write():
        x, y = a.db.find(Item, "x"), a.db.find(Item, "y")
        assert x is not None and y is not None
        x.text = "a-later"
        y.text = "a-later"
        x.tags.append("a1")
    assert await a.synced() == {"x": ("a-later", ["s1", "s2", "a1"]), "y": ("a-later", [])}
    # the fast device's own later write wins in turn: wall-clock order, not its clock's
    again = run_skewed(server.url, fast, "again", skew)
    assert again["active"] is True and again["errors"] == []
    expected = {"x": ("skewed-last", ["s1", "s2", "a1"]), "y": ("a-later", [])}
    assert {k: tuple(v) for k, v in again["items"].items()} == expected
    assert await a.synced() == expected
    assert json.loads(again["hlc"])[0] < wall_now() + MAX_AHEAD_MS  # stamped at the right time
    # and the existing device's next write wins over that one (it was not stamped ahead)
    with a.db.write():
        x = a.db.find(Item, "x")
        assert x is not None
        x.text = "a-final"
    expected = {"x": ("a-final", ["s1", "s2", "a1"]), "y": ("a-later", [])}
    assert await a.synced() == expected
    # a new device's first download works, and it keeps syncing
    b = await devices("b")
    assert await b.synced() == expected
    assert b.db is not None
    with b.db.write():
        b.db.add(Item(id="z", text="b"))
    assert (await b.synced())["z"] == ("b", [])
    assert (await a.synced())["z"] == ("b", [])
    assert session_errors(a) == [] and session_errors(b) == []


async def test_a_crafted_upload_years_ahead_is_refused_and_affects_no_one(
    server: ServerProcess, devices: Any
) -> None:
    bystander = await devices("bystander")
    assert bystander.db is not None
    with bystander.db.write():
        bystander.db.add(Item(id="ok1", text="before"))
    assert await bystander.synced() == {"ok1": ("before", [])}

    tokens = await login(server.url)
    client = await RawClient.connect("ws" + server.url[4:], tokens["access_token"])
    try:
        await client.welcome()
        bound = await client.bind(1, "hostile", schema=SCHEMA)
        latest = bound.server_version
        await client.expect(DownloadReceived)
        far = wall_now() + 5 * YEAR_MS
        crafted = [  # the far one is not the last instruction: every one is bounded
            Instruction(
                Op.CREATE,
                "Task",
                "evil",
                HLC(far, 0, "hostile"),
                value={"id": "evil", "title": "x", "done": False},
            ),
            Instruction(Op.SET, "Task", "evil", HLC(1000, 0, "hostile"), "title", "x"),
        ]
        await client.upload(1, [(1, pack_instructions(crafted))])
        error = await client.expect(ErrorReceived)
        assert error.code == ErrorCode.CLOCK_SKEW and error.session == 1
        assert error.action is SyncAction.RETRY
        assert "changeset version 1" in error.message and "clock is wrong" in error.message
        assert "more than the limit of 3600000 ms" in error.message
        # nothing was stored: the file's next binding has nothing acknowledged, nothing new
        client.proto.unbind(1)
        await client.flush()
        await client.expect(SessionUnbound)
        again = await client.bind(2, "hostile", schema=SCHEMA)
        assert (again.upload_acked, again.server_version) == (0, latest)
        # the connection and the same file go on with a sane timestamp
        await client.expect(DownloadReceived)
        await client.upload(2, [(1, create_task("hostile", "fine", "ok", wall=wall_now()))])
        await client.wait_acked(2, 1)
    finally:
        await client.close()
    # other devices are unaffected
    with bystander.db.write():
        bystander.db.add(Item(id="ok2", text="after"))
    assert await bystander.synced() == {"ok1": ("before", []), "ok2": ("after", [])}
    fresh = await devices("fresh")
    assert await fresh.synced() == {"ok1": ("before", []), "ok2": ("after", [])}
    assert bystander.errors == [] and fresh.errors == []


async def test_far_future_data_already_stored_stops_no_download(
    tmp_path: Path, server: ServerProcess, devices: Any
) -> None:
    old = await devices("old")
    assert old.db is not None
    with old.db.write():
        old.db.add(Item(id="plain", text="plain"))
    assert await old.synced() == {"plain": ("plain", [])}
    # data stored before servers bounded timestamps: written into the storage directly
    server.stop()
    far = wall_now() + 3 * YEAR_MS
    ins = [
        Instruction(
            Op.CREATE, "Item", "far", HLC(far, 0, "legacy"), value={"id": "far", "text": ""}
        ),
        Instruction(Op.SET, "Item", "far", HLC(far, 1, "legacy"), "text", "from the future"),
        Instruction(Op.LIST_INSERT, "Item", "far", HLC(far, 2, "legacy"), "tags", "t", None),
        Instruction(Op.SET, "Item", "plain", HLC(far, 3, "legacy"), "text", "future plain"),
    ]
    storage = SQLiteStorage.in_folder(server.data_dir)
    await storage.open()
    try:
        await storage.register_client("todo", "legacy", "someone")
        (result,) = await storage.integrate(
            [UploadBatch("todo", "legacy", [Changeset("legacy", 1, tuple(ins))])]
        )
        assert result.ok, result.error
    finally:
        await storage.close()
    server.start()
    expected = {"plain": ("future plain", []), "far": ("from the future", ["t"])}
    assert await old.synced() == expected  # an existing device downloads it
    fresh = await devices("fresh")
    assert await fresh.synced() == expected  # and a new one, on its first download
    assert fresh.db is not None
    # the far-future timestamps did not drag the device's clock: its writes sync
    with fresh.db.write():
        fresh.db.add(Item(id="new", text="new"))
        item = fresh.db.find(Item, "far")
        assert item is not None
        item.text = "overwritten?"  # loses to the far-future write (LWW), is not refused
        with pytest.raises(ts.FutureTimestampError, match="in the future"):
            item.tags.append("after the far element")
    got = await fresh.synced()
    assert got["new"] == ("new", []) and got["far"] == ("from the future", ["t"])
    hlc = json.loads(str(fresh.db._engine.get_meta("hlc")))
    assert hlc[0] < wall_now() + MAX_AHEAD_MS
    assert (await old.synced())["new"] == ("new", [])
    assert session_errors(old) == [] and session_errors(fresh) == []
    await asyncio.sleep(0)


async def server_state(
    path: Path,
) -> tuple[list[tuple[str, int, bytes]], dict[str, dict[Any, dict[str, Any]]]]:
    """The convergence app's history and objects, read from a stopped server's storage."""
    async with SQLiteStorage(path) as storage:
        log: list[tuple[str, int, bytes]] = []
        after = 0
        while True:
            page = await storage.read_log(APP_ID, after, 1 << 22)
            log += [(e.origin, e.client_version, e.instructions) for e in page.entries]
            if page.cursor >= page.latest_version:
                break
            after = page.cursor
        objects = {m: await storage.get_objects(APP_ID, m) for m in ("Doc", "Tag", "Tally")}
    return log, objects


def test_device_processes_with_skewed_clocks_converge(tmp_path: Path) -> None:
    """The convergence harness's clock seam: random writers 3 days fast, 2 hours slow,
    and right, on one server; every acknowledged write checks out against the merge
    rules and every device ends equal to the server (no faults: those are the soak's)."""
    server = ServerProcess(tmp_path / "server").start()
    devices: list[DeviceProcess] = []
    try:
        setup = DeviceProcess(tmp_path, "setup", server.url, 1, setup=True)
        setup.start()
        setup.wait_phase("setup", 60)
        setup.stop()
        for i, skew in enumerate([3 * DAY_MS, -2 * 3600 * 1000, 0]):
            device = DeviceProcess(tmp_path, f"dev{i}", server.url, 10 + i, clock_skew_ms=skew)
            device.start()
            devices.append(device)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # until each has written for a while
            if all(sum(r["t"] == "cs" for r in d.records()) >= 40 for d in devices):
                break
            time.sleep(0.5)
        for device in devices:
            device.command("upload")
        uploaded = [device.wait_phase("uploaded") for device in devices]
        for device in devices:
            device.command("download")
        for device in devices:
            device.wait_phase("downloaded")
        snapshots = {d.name: d.snapshot() for d in devices}
        logs = {d.name: d.records() for d in devices}
        logs["setup"] = setup.records()
        for device in devices:
            device.stop()
        server.stop()
        log, objects = asyncio.run(server_state(tmp_path / "server" / "server.sqlite3"))
        report = check_convergence(logs, snapshots, log, objects)
        problems = report.writes_lost + report.devices_diverged + report.counter_errors
        assert report.ok, "\n".join(problems[:20])
        assert all(sum(r["t"] == "cs" for r in logs[d.name]) >= 40 for d in devices)
        assert report.writes_checked > 0
        # the fast device may have been told its clock was wrong (if it wrote before its
        # first WELCOME), nothing else; the others saw no error at all
        assert all("[236]" in e and "clock is wrong" in e for e in uploaded[0]["errors"])
        assert uploaded[1]["errors"] == [] and uploaded[2]["errors"] == []
    finally:
        for device in devices:
            device.kill()
        server.kill()
