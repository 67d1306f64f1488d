"""Flexible sync, closing issue 6's gaps, against real servers: bootstrap progress through
the public API, user fields in rules and roles, write checks that cannot go stale, and
reconnects that resume instead of re-bootstrapping."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import ServerProcess, TestServer

from .test_flexsync_e2e import FAST, Device, Task, eventually, subscribe

T = ts.TimeoutCancellationToken
S = ts.SubscriptionSetState
D = ts.ProgressDirection.DOWNLOAD


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[TestServer]:
    with TestServer(tmp_path / "server") as server:
        yield server


@pytest.fixture
async def seeded(tmp_path: Path, dev_server: TestServer) -> AsyncIterator[Device]:
    """A device that uploaded 10,000 tasks."""
    a = Device(tmp_path, "seed", dev_server.url)
    await a.open()
    assert a.db is not None
    with a.db.write():
        for i in range(10_000):
            a.db.add(Task(id=f"o{i:05d}", summary="x" * 40, n=i))
    await a.db.sync_session.wait_for_upload(T(60))
    yield a
    a.shutdown()


def _check_progress(values: list[float]) -> None:
    assert values[-1] == 1.0, values
    assert values == sorted(values), values  # never decreases
    inside = [v for v in values if 0.0 < v < 1.0]
    assert len(set(inside)) >= 3, values  # several steps, not just 0 and 1


async def test_progress_stream_follows_a_bootstrap_of_10000(
    tmp_path: Path, dev_server: TestServer, seeded: Device
) -> None:
    b = Device(tmp_path, "b", dev_server.url)
    try:
        db = await b.open()
        await b.settle()
        with db.subscriptions.update() as subs:
            subs.add(db.all(Task))
        # registered while the set is PENDING: follows its bootstrap to the end
        stream = db.sync_session.get_progress_stream(
            D, ts.ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK
        )
        values: list[float] = []
        states: list[S] = []

        async def consume() -> None:
            async for p in stream:
                values.append(p.progress_estimate)
                states.append(db.subscriptions.state)

        await asyncio.wait_for(consume(), 60)
        _check_progress(values)
        # the stream ended with 1.0 only once the set was COMPLETE and every object here
        assert states[-1] is S.COMPLETE
        assert all(s is not S.COMPLETE for s in states[:-1])
        assert len(db.all(Task)) == 10_000
    finally:
        b.shutdown()


async def test_open_with_initial_subscriptions_waits_for_the_bootstrap(
    tmp_path: Path, dev_server: TestServer, seeded: Device
) -> None:
    app = ts.App(
        ts.AppConfiguration(
            "todo", base_url=dev_server.url, base_path=tmp_path / "c", sync_timeouts=FAST
        )
    )
    try:
        user = await app.log_in(ts.Credentials.anonymous())

        def initial(db: ts.Database) -> None:
            with db.subscriptions.update() as subs:
                subs.add(db.query(Task, "n >= $0", 2_000), name="most")

        config = ts.Configuration.flexible_sync(user, [Task], initial_subscriptions=initial)
        values: list[float] = []
        db = await ts.Database.open(
            config, on_progress=lambda p: values.append(p.progress_estimate)
        )
        try:
            # open returned: the whole bootstrap is applied, the set COMPLETE
            assert db.subscriptions.state is S.COMPLETE
            assert len(db.all(Task)) == 8_000
            _check_progress(values)
        finally:
            db.close()
    finally:
        app.close()


# -- rules with the user's fields (email, JWT claims) and roles chosen by them ------------------

HS_SECRET = "idp-shared-secret-0123456789abcdefghij"
USER_RULES = textwrap.dedent(
    f"""
    [apps.todo]
    auth = ["email_password", "jwt"]
    auto_confirm = true

    [apps.todo.jwt]
    algorithm = "HS256"
    secret = "{HS_SECRET}"
    fields = {{ team = "team", role = "role", level = "level" }}

    [apps.todo.rules.Task]
    read = "summary == $user.team"
    write = "owner_id == $user.team"

    [[apps.todo.rules.Task.roles]]
    name = "admins"
    when = "role == 'admin' AND level == '3'"
    read = true
    write = true

    [[apps.todo.rules.Task.roles]]
    name = "people with a password"
    when = "provider == 'email_password'"
    read = "owner_id == $user.email"
    write = "owner_id == $user.email"
    """
)


def test_unknown_user_field_is_a_configuration_error() -> None:
    from tidesync.errors import ConfigurationError
    from tidesync.server.rules import parse_rules

    rules = {"Task": {"read": "owner_id == $user.team"}}
    assert parse_rules(rules, "r", ["team"]) is not None
    with pytest.raises(ConfigurationError, match=r"\$user.team"):
        parse_rules(rules, "r")  # no JWT field called team
    with pytest.raises(ConfigurationError, match="roles"):
        parse_rules({"Task": {"roles": [{"when": "team == 'x'"}]}}, "r")


def _jwt(sub: str, **claims: Any) -> str:
    import time

    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, **claims}, HS_SECRET, "HS256")


async def test_rules_and_roles_use_email_and_jwt_fields(tmp_path: Path) -> None:
    config = tmp_path / "tidesync.toml"
    config.write_text(USER_RULES)
    proc = ServerProcess(tmp_path / "server", extra_args=["--config", str(config)]).start()
    devices: list[Device] = []
    try:

        async def device(name: str, credentials: ts.Credentials) -> Device:
            d = Device(tmp_path, name, proc.url)
            if credentials.provider == "email_password":
                await d.app.email_password_auth.register_user("ann@x.io", "a password 1")
            d.user = await d.app.log_in(credentials)
            await d.open()
            devices.append(d)
            return d

        ann = await device("ann", ts.Credentials.email_password("ann@x.io", "a password 1"))
        red = await device("red", ts.Credentials.jwt(_jwt("m-1", team="red", role="member")))
        boss = await device("boss", ts.Credentials.jwt(_jwt("a-1", role="admin", level=3)))
        fake = await device("fake", ts.Credentials.jwt(_jwt("a-2", role="admin", level=2)))
        assert boss.db is not None and ann.db is not None and red.db is not None
        with boss.db.write():  # the admin role may write anything
            boss.db.add(Task(id="r1", owner_id="someone", summary="red"))
            boss.db.add(Task(id="b1", owner_id="someone", summary="blue"))
            boss.db.add(Task(id="a1", owner_id="ann@x.io", summary="red"))
        await boss.settle()
        assert not boss.errors
        for d in devices:
            await subscribe(d, "TRUEPREDICATE")
        assert boss.ids() == {"r1", "b1", "a1"}  # role: admins (role and level match)
        assert ann.ids() == {"a1"}  # role by provider, then $user.email
        assert red.ids() == {"r1", "a1"}  # $user.team
        assert fake.ids() == set()  # level 2: not an admin, no email, no team

        # writes: the member may write objects owned by its team, nothing else
        with red.db.write():
            red.db.add(Task(id="r2", owner_id="red", summary="red"))
            red.db.find(Task, "r1").n = 5  # owned by "someone"
        await red.settle()
        await eventually(lambda: any(isinstance(e, ts.CompensatingWriteError) for e in red.errors))
        refused = {
            pk
            for e in red.errors
            if isinstance(e, ts.CompensatingWriteError)
            for _, pk, _ in e.refused
        }
        assert refused == {"r1"}
        await eventually(lambda: red.db is not None and red.db.find(Task, "r1").n == 0)
        await boss.settle()
        await eventually(lambda: boss.ids() == {"r1", "b1", "a1", "r2"})
        assert boss.db.find(Task, "r1").n == 0
    finally:
        for d in devices:
            d.shutdown()
        proc.kill()


# -- a rule check and its commit are one step -----------------------------------------------

SHARED_RULES = textwrap.dedent(
    """
    [apps.todo]
    auth = ["anonymous"]

    [apps.todo.rules.Task]
    read = "owner_id == $user.id OR shared == true"
    write = "owner_id == $user.id OR shared == true"
    """
)


async def _server_log(folder: Path) -> list[tuple[int, str, list[Any]]]:
    """``(server version, origin, instructions)`` of the app's whole history."""
    from tidesync.core.packing import unpack_instructions
    from tidesync.server.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage.in_folder(folder)
    await storage.open()
    try:
        out: list[tuple[int, str, list[Any]]] = []
        after = 0
        for _ in range(10_000):
            page = await storage.read_log("todo", after, 1 << 20)
            for e in page.entries:
                out.append(
                    (e.server_version, e.origin, unpack_instructions(e.instructions, e.origin))
                )
            if page.cursor >= page.latest_version or page.cursor <= after:
                return out
            after = page.cursor
        raise AssertionError("the log did not end")
    finally:
        await storage.close()


async def test_an_ownership_change_cannot_race_a_write_check(tmp_path: Path) -> None:
    """The owner makes shared objects private while another user edits them, both uploading
    at once: no edit of the other user may be integrated after the object became private."""
    config = tmp_path / "tidesync.toml"
    config.write_text(SHARED_RULES)
    proc = ServerProcess(tmp_path / "server", extra_args=["--config", str(config)]).start()
    owner = Device(tmp_path, "owner", proc.url)
    other = Device(tmp_path, "other", proc.url)
    n = 40
    try:
        await owner.open()
        await other.open()
        assert owner.db is not None and other.db is not None and owner.user is not None
        with owner.db.write():
            for i in range(n):
                owner.db.add(Task(id=f"s{i:02d}", owner_id=owner.user.id, shared=True))
        await owner.settle()
        await subscribe(owner, "TRUEPREDICATE")
        await subscribe(other, "TRUEPREDICATE")
        assert len(other.ids()) == n
        for round_ in range(4):
            owner.db.sync_session.pause()
            other.db.sync_session.pause()
            for i in range(n):  # one transaction each: many changesets to interleave
                with owner.db.write():
                    owner.db.find(Task, f"s{i:02d}").shared = False
                with other.db.write():
                    other.db.find(Task, f"s{i:02d}").n += 1
            first, second = (owner, other) if round_ % 2 else (other, owner)
            assert first.db is not None and second.db is not None
            first.db.sync_session.resume()
            if round_ == 0:  # in order once: the other user's edits land while shared
                await first.settle()
            second.db.sync_session.resume()
            await owner.settle()
            await other.settle()
            await eventually(lambda: other.ids() == set())  # private now: gone from there
            with owner.db.write():
                for t in owner.db.all(Task):
                    t.shared = True
            await owner.settle()
            await eventually(lambda: len(other.ids()) == n)
        ident_owner = owner.db.sync_session._worker.file_ident
        ident_other = other.db.sync_session._worker.file_ident
    finally:
        owner.shutdown()
        other.shutdown()
        proc.stop()
    shared: dict[str, bool] = {}
    edits = 0
    for _, origin, instructions in await _server_log(tmp_path / "server"):
        for ins in instructions:
            if origin == ident_owner and ins.field == "shared":
                shared[ins.pk] = bool(ins.value)
            elif origin == ident_other and ins.field == "n":
                edits += 1
                # integrated in history order: the object must have been shared then
                assert shared.get(ins.pk, True), f"edit of private {ins.pk} was integrated"
    assert edits > 0  # some edits were allowed (and the rest refused)
