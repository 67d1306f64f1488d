"""The write check's judging, without a server (server/writecheck.py): writes to objects that
do not exist, and the recheck a commit does on the states its transaction sees. The
integration tests are tests/test_flexsync_orphan_writes.py and
tests/test_flexsync_multiprocess.py."""

from __future__ import annotations

from typing import Any

from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.merge import ObjectState
from tidesync.core.packing import pack
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.server.flexsync import CheckedUpload, FlexView
from tidesync.server.rules import Permissions, parse_rules
from tidesync.server.storage.base import ObjectKey, object_keys
from tidesync.server.writecheck import CommitRecheck, judge

TASK = ModelSchema(
    "Task",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("owner_id", Kind.STR),
        FieldSchema("title", Kind.STR),
    ),
    "id",
)
SCHEMAS = {"Task": TASK}
SLOTS = {"Task": {"read": True, "write": "owner_id == $user.id OR owner_id == ''"}}


def view(rules: dict[str, Any] | None, user: str = "me") -> FlexView:
    parsed = parse_rules(rules) if rules is not None else None
    return FlexView(Permissions(parsed, {"id": user}, SCHEMAS), SCHEMAS, None)


def ins(op: Op, pk: str, wall: int, field: str | None = None, value: Any = None) -> Instruction:
    return Instruction(op, "Task", pk, HLC(wall, 0, "dev"), field=field, value=value)


def create(pk: str, owner: str, wall: int) -> Instruction:
    return ins(Op.CREATE, pk, wall, value={"id": pk, "owner_id": owner, "title": "t"})


def state_of(*instructions: Instruction) -> bytes:
    state = ObjectState.empty()
    for i in instructions:
        state.apply(i, TASK)
    return state.to_bytes()


def verdict_of(
    v: FlexView, stored: dict[ObjectKey, bytes], *instructions: Instruction
) -> list[str]:
    cs = Changeset("dev", 1, tuple(instructions))
    return [
        reason
        for _, _, reason in judge(v, SCHEMAS, [cs], [object_keys(cs.instructions)], stored).refused
    ]


KEY = ("Task", pack("x"))
OWNER_RULES = {"Task": {"read": True, "write": "owner_id == $user.id"}}


def test_updates_and_erases_of_missing_objects_are_refused_under_a_write_rule() -> None:
    owner = view(OWNER_RULES)
    missing = "the object does not exist (or is erased) and the change does not create it"
    assert verdict_of(owner, {}, ins(Op.SET, "x", 9, "title", "mine?")) == [missing]
    assert verdict_of(owner, {}, ins(Op.ERASE, "x", 9)) == [missing]
    erased = {KEY: state_of(create("x", "me", 1), ins(Op.ERASE, "x", 5))}
    assert verdict_of(owner, erased, ins(Op.SET, "x", 9, "owner_id", "me")) == [missing]
    # changes nothing stored (older than the erase): let through
    assert verdict_of(owner, erased, ins(Op.SET, "x", 3, "title", "late")) == []
    # created and erased again in one changeset: judged on the created values
    assert verdict_of(owner, {}, create("x", "me", 6), ins(Op.ERASE, "x", 7)) == []
    assert verdict_of(owner, {}, create("x", "you", 6), ins(Op.ERASE, "x", 7)) == [
        "the write rule does not allow creating this object"
    ]
    # no rules, or a rule that lets the user write anything: nothing to guard
    for anyone in (view(None), view({"Task": {"read": True, "write": True}})):
        assert verdict_of(anyone, {}, ins(Op.SET, "x", 9, "title", "t")) == []


def _claim(user: str, wall: int) -> Changeset:
    return Changeset(
        user,
        1,
        (
            Instruction(Op.SET, "Task", "slot", HLC(wall, 0, user), field="owner_id", value=user),
            Instruction(Op.SET, "Task", "slot", HLC(wall, 1, user), field="title", value=user),
        ),
    )


def test_the_recheck_judges_again_only_when_the_transaction_sees_another_state() -> None:
    key = ("Task", pack("slot"))
    free = state_of(create("slot", "", 1))
    mine = view(SLOTS, "me")
    cs = _claim("me", 10)
    keyed = [object_keys(cs.instructions)]
    first = judge(mine, SCHEMAS, [cs], keyed, {key: free})
    assert first.refused == [] and first.changesets == [cs]
    upload = CheckedUpload(1, {key}, first.refused, first.created)
    check = CommitRecheck(mine, SCHEMAS, {key: free}, first, upload)
    same = [cs]
    assert check.recheck(same, {key: free}) is same  # unchanged: let through as it is
    assert upload.refused == []
    # another process claimed the slot between the check and this commit
    claimed = ObjectState.from_bytes(free)
    for i in _claim("you", 5).instructions:
        claimed.apply(i, TASK)
    kept = check.recheck(same, {key: claimed.to_bytes()})
    assert [c.instructions for c in kept] == [()] and kept[0].version == 1
    assert upload.refused == [
        ("Task", "slot", "the write rule does not allow changing this object")
    ]
    # the transaction is done again and finds the slot free after all: the first verdict
    assert check.recheck(same, {key: free}) is same and upload.refused == []
