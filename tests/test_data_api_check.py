"""The Data API's write check inside the commit (server/api/writes.py WholeRecheck): all or
nothing, on the states the transaction sees. Pure code: real rules, real merge states."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.merge import ObjectState
from tidesync.core.packing import pack
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.server.api.access import Caller
from tidesync.server.api.building import CREATE, WriteOp
from tidesync.server.api.writes import DataWriter, WholeRecheck
from tidesync.server.auth import Authenticator
from tidesync.server.config import ServerConfig
from tidesync.server.flexsync import FlexView
from tidesync.server.hub import SyncHub
from tidesync.server.rules import Permissions, parse_rules, user_fields
from tidesync.server.storage.base import UploadBatch
from tidesync.server.storage.sqlite import SQLiteStorage

TASK = ModelSchema(
    "Task",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("owner_id", Kind.STR),
        FieldSchema("summary", Kind.STR),
    ),
    "id",
)
SCHEMAS = {"Task": TASK}
RULES = parse_rules({"Task": {"read": True, "write": "owner_id == $user.id"}})


def state_of(owner: str, wall: int) -> bytes:
    state = ObjectState.empty()
    values = {"id": "t", "owner_id": owner, "summary": ""}
    state.apply(Instruction(Op.CREATE, "Task", "t", HLC(wall, 0, "dev"), value=values), TASK)
    return state.to_bytes()


def check_and_changeset() -> tuple[WholeRecheck, list[Changeset], dict[tuple[str, bytes], bytes]]:
    view = FlexView(Permissions(RULES, user_fields("alice"), SCHEMAS), SCHEMAS, None)
    key = ("Task", pack("t"))
    stored = {key: state_of("alice", 1)}
    edits = (
        Instruction(Op.SET, "Task", "t", HLC(5, 0, "api"), "summary", "a"),
        Instruction(
            Op.CREATE,
            "Task",
            "u",
            HLC(5, 1, "api"),
            value={"id": "u", "owner_id": "alice", "summary": ""},
        ),
    )
    return WholeRecheck(view, SCHEMAS, stored), [Changeset("api", 1, edits)], stored


def test_unchanged_states_pass_as_they_are() -> None:
    check, changesets, stored = check_and_changeset()
    assert check.recheck(changesets, stored) is changesets and check.refused == []


def test_a_state_changed_meanwhile_that_the_rules_now_refuse_stores_nothing() -> None:
    check, changesets, _ = check_and_changeset()
    now = {("Task", pack("t")): state_of("bob", 3)}  # another write gave it to bob
    out = check.recheck(changesets, now)
    assert [cs.instructions for cs in out] == [()]  # the version is used, nothing stored
    assert [cs.version for cs in out] == [1]
    assert [(m, pk) for m, pk, _ in check.refused] == [("Task", "t")]
    # the commit tried again on the first states: the refusal is forgotten
    check, changesets, stored = check_and_changeset()
    assert check.recheck(changesets, now) != changesets
    assert check.recheck(changesets, stored) is changesets and check.refused == []


async def test_the_storage_integrates_a_refused_write_as_nothing(tmp_path: Path) -> None:
    storage = SQLiteStorage.in_folder(tmp_path)
    async with storage:
        await storage.put_schemas("todo", [TASK])
        await storage.register_client("todo", "api", "alice")
        check, changesets, _ = check_and_changeset()
        values = {"id": "t", "owner_id": "bob", "summary": ""}
        seed = UploadBatch(
            "todo",
            "api",
            [
                Changeset(
                    "api", 1, (Instruction(Op.CREATE, "Task", "t", HLC(3, 0, "api"), value=values),)
                )
            ],
        )
        assert (await storage.integrate([seed]))[0].ok
        edits = [Changeset("api", 2, changesets[0].instructions)]
        (result,) = await storage.integrate([UploadBatch("todo", "api", edits, check)])
        assert result.ok and result.acked_version == 2
        assert [pk for _, pk, _ in check.refused] == ["t"]
        objects = await storage.get_objects("todo", "Task")
        assert objects == {"t": values}  # nothing of the refused write


async def test_a_write_cancelled_at_any_point_never_loses_the_next(tmp_path: Path) -> None:
    """A request that goes away mid-write (its task cancelled) must leave its origin's
    version right: the next write of that origin is stored, not taken for a duplicate."""
    config = ServerConfig()
    auth = Authenticator(tmp_path, config)
    await auth.open()
    storage = SQLiteStorage.in_folder(tmp_path)
    await storage.open()
    hub = SyncHub(storage, auth, config)
    hub.start()
    try:
        await storage.put_schemas("todo", [TASK])
        writer = DataWriter(hub)
        caller = Caller("todo", None)

        def op(pk: str) -> WriteOp:
            values = {"id": pk, "owner_id": "o", "summary": pk}
            return WriteOp(CREATE, "Task", pk, values=values)

        for delay in range(40):  # cancelled after 0 to 20 ms: before, in and after its commit
            task = asyncio.ensure_future(writer.write(caller, SCHEMAS, None, [op(f"c{delay}")]))
            await asyncio.sleep(delay / 2000)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            kept = await writer.write(caller, SCHEMAS, None, [op(f"k{delay}")])
            assert kept.server_version is not None, delay
        objects = await storage.get_objects("todo", "Task")
        assert {f"k{d}" for d in range(40)} <= set(objects)
    finally:
        await hub.close()
        await storage.close()
        await auth.aclose()
