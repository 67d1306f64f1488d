"""The one test suite every server storage backend must pass.

A backend's test module subclasses :class:`StorageConformance` and overrides the
``make_storage`` fixture with a factory of *unopened* storages that all point at the same
place (so the durability test can close one and open another)::

    class TestSQLiteStorage(StorageConformance):
        @pytest.fixture
        def make_storage(self, tmp_path: Path) -> StorageFactory:
            return lambda: SQLiteStorage(tmp_path / "server.sqlite3")

Each test uses its own app id and wipes it first, so backends may share one database
between tests. This module needs ``pytest`` and ``pytest-asyncio`` (the ``test`` extra); it
is imported only by test code.
"""

from __future__ import annotations

import asyncio
import random
import re
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import pytest_asyncio

from ...core.changeset import Changeset, Instruction, Op
from ...core.hlc import HLC
from ...core.merge import ObjectState
from ...core.packing import pack, pack_instructions, unpack, unpack_instructions
from ...core.query import bind, parse
from ...core.schema import Collection, FieldSchema, Kind, ModelSchema
from ...errors import SchemaMismatchError, TidesyncError
from ...objectid import ObjectId
from .base import (
    BatchRejectedError,
    ClientOwnershipError,
    CommitCheck,
    CursorAheadError,
    HistoryTrimmedError,
    LogEntry,
    ObjectKey,
    RejectReason,
    ServerStorage,
    StorageError,
    UploadBatch,
)

#: Makes a new, unopened storage on the test's (shared) location.
StorageFactory = Callable[[], ServerStorage]

TASK = ModelSchema(
    "Task",
    (
        FieldSchema("id", Kind.STR, primary_key=True),
        FieldSchema("title", Kind.STR, optional=True),
        FieldSchema("done", Kind.BOOL),
        FieldSchema("votes", Kind.COUNTER),
    ),
    "id",
)
NOTE_INT = ModelSchema(
    "NoteI", (FieldSchema("id", Kind.INT, primary_key=True), FieldSchema("text", Kind.STR)), "id"
)
NOTE_UUID = ModelSchema(
    "NoteU", (FieldSchema("id", Kind.UUID, primary_key=True), FieldSchema("text", Kind.STR)), "id"
)
NOTE_OID = ModelSchema(
    "NoteO",
    (FieldSchema("id", Kind.OBJECTID, primary_key=True), FieldSchema("text", Kind.STR)),
    "id",
)
#: Floats in every container, an int and a counter: values at the edges of their types.
EDGES = ModelSchema(
    "Edges",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("f", Kind.FLOAT),
        FieldSchema("fs", Kind.FLOAT, Collection.LIST),
        FieldSchema("fd", Kind.FLOAT, Collection.DICT),
        FieldSchema("n", Kind.INT),
        FieldSchema("hits", Kind.COUNTER),
    ),
    "id",
)
ALL_MODELS = [TASK, NOTE_INT, NOTE_UUID, NOTE_OID, EDGES]


def edge_floats(count: int, seed: int = 18) -> list[float]:
    """NaNs (several payloads and signs), ±inf, ±0.0, subnormals, then random bit
    patterns: floats a backend might change."""
    bits = ["7ff8000000000000", "fff8000000000000", "7ff0000000000001", "fff4dead0000beef"]
    bits += ["7ff0000000000000", "fff0000000000000", "8000000000000000", "0000000000000000"]
    bits += ["0000000000000001", "800fffffffffffff", "7fefffffffffffff", "3ff0000000000000"]
    rng = random.Random(seed)
    bits += [f"{rng.getrandbits(64):016x}" for _ in range(max(0, count - len(bits)))]
    return [struct.unpack(">d", bytes.fromhex(b))[0] for b in bits[:count]]


def float_bits(value: Any) -> Any:
    """A float (or the floats in a list or dict) as IEEE 754 bits, to compare exactly."""
    if isinstance(value, float):
        return struct.pack(">d", value).hex()
    if isinstance(value, list):
        return [float_bits(v) for v in value]
    if isinstance(value, dict):
        return {k: float_bits(v) for k, v in value.items()}
    return value


class Writer:
    """Makes the changesets one client would upload: dense versions, rising HLCs."""

    def __init__(self, origin: str, wall: int = 1_000) -> None:
        self.origin = origin
        self.version = 0
        self.wall = wall
        self.counter = 0

    def hlc(self, at: int | None = None) -> HLC:
        """The next timestamp; ``at`` forces its wall time (to order against other writers)."""
        if at is not None:
            self.wall, self.counter = at, 0
        else:
            self.counter += 1
        return HLC(self.wall, self.counter, self.origin)

    def create(
        self, pk: str, title: str | None = "t", votes: int = 0, at: int | None = None
    ) -> Instruction:
        """CREATE a Task with every field."""
        value = {"id": pk, "title": title, "done": False, "votes": votes}
        return Instruction(Op.CREATE, "Task", pk, self.hlc(at), value=value)

    def note(self, model: ModelSchema, pk: Any, text: str) -> Instruction:
        """CREATE a note of one of the NOTE_* models."""
        return Instruction(Op.CREATE, model.name, pk, self.hlc(), value={"id": pk, "text": text})

    def set(self, pk: str, field: str, value: Any, at: int | None = None) -> Instruction:
        """SET one Task field."""
        return Instruction(Op.SET, "Task", pk, self.hlc(at), field=field, value=value)

    def add(self, pk: str, amount: int, at: int | None = None) -> Instruction:
        """ADD to the Task's ``votes`` counter."""
        return Instruction(Op.ADD, "Task", pk, self.hlc(at), field="votes", value=amount)

    def erase(self, pk: str, at: int | None = None) -> Instruction:
        """ERASE a Task."""
        return Instruction(Op.ERASE, "Task", pk, self.hlc(at))

    def cs(self, *instructions: Instruction) -> Changeset:
        """The next changeset of this origin."""
        self.version += 1
        return Changeset(self.origin, self.version, tuple(instructions))


def batch(app: str, *changesets: Changeset, origin: str | None = None) -> UploadBatch:
    """An upload of ``changesets`` (origin taken from the first one)."""
    return UploadBatch(app, origin or changesets[0].origin, list(changesets))


class _RefuseStored(CommitCheck):
    """A commit check that refuses every instruction on an object the transaction shows
    it (a stored one), and records each ``states`` it was shown."""

    def __init__(self) -> None:
        self.shown: list[dict[ObjectKey, bytes]] = []

    def recheck(
        self, changesets: list[Changeset], states: Mapping[ObjectKey, bytes]
    ) -> list[Changeset]:
        self.shown.append(dict(states))
        if not states:
            return changesets
        return [
            Changeset(
                cs.origin,
                cs.version,
                tuple(i for i in cs.instructions if (i.model, pack(i.pk)) not in states),
            )
            for cs in changesets
        ]


class _Broken(CommitCheck):
    """A commit check with a bug."""

    def recheck(
        self, changesets: list[Changeset], states: Mapping[ObjectKey, bytes]
    ) -> list[Changeset]:
        raise RuntimeError("a bug in the check")


def _checked(app: str, check: CommitCheck, *changesets: Changeset) -> UploadBatch:
    return UploadBatch(app, changesets[0].origin, list(changesets), check)


def _instructions(entry: LogEntry) -> list[Instruction]:
    return list(unpack_instructions(entry.instructions, entry.origin))


class StorageConformance:
    """The shared suite; subclass it and override :meth:`make_storage`."""

    @pytest.fixture
    def make_storage(self) -> StorageFactory:
        """Backends override this fixture with a factory of unopened storages."""
        raise NotImplementedError("a backend's test class must override make_storage")

    @pytest_asyncio.fixture
    async def storage(self, make_storage: StorageFactory) -> AsyncIterator[ServerStorage]:
        """An open storage, closed after the test."""
        async with make_storage() as opened:
            yield opened

    @pytest_asyncio.fixture
    async def app(self, storage: ServerStorage, request: pytest.FixtureRequest) -> str:
        """A wiped app id unique to the test, with :data:`ALL_MODELS` and clients A, B, C."""
        app_id = "app-" + re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:80]
        await storage.wipe_app(app_id)
        await storage.put_schemas(app_id, ALL_MODELS)
        for origin in ("A", "B", "C"):
            await storage.register_client(app_id, origin, "user-" + origin)
        return app_id

    # -- versions, duplicates, gaps -------------------------------------------------------

    async def test_server_versions_are_dense(self, storage: ServerStorage, app: str) -> None:
        a, b = Writer("A"), Writer("B")
        res = await storage.integrate(
            [
                batch(app, a.cs(a.create("a1")), a.cs(a.create("a2")), a.cs(a.create("a3"))),
                batch(app, b.cs(b.create("b1"))),
            ]
        )
        assert [r.server_versions for r in res] == [[1, 2, 3], [4]]
        assert [r.acked_version for r in res] == [3, 1]
        assert all(r.ok for r in res)
        res = await storage.integrate([batch(app, b.cs(b.create("b2")))])
        assert res[0].server_versions == [5]
        assert await storage.latest_version(app) == 5
        assert await storage.client_version(app, "A") == 3
        assert await storage.client_version(app, "B") == 2
        assert await storage.integrate([]) == []

    async def test_created_names_objects_made_by_one_create_alone(
        self, storage: ServerStorage, app: str
    ) -> None:
        a, b = Writer("A"), Writer("B")
        first = await storage.integrate([batch(app, a.cs(a.create("old")))])
        assert first[0].created == {("Task", pack("old")): 1}
        res = await storage.integrate(
            [
                batch(
                    app,
                    a.cs(a.create("new"), a.create("edited"), a.set("edited", "title", "t")),
                    a.cs(a.create("old"), a.create("later")),
                ),
                batch(app, b.cs(b.create("later"), b.create("mine"))),  # in the same commit
            ]
        )
        # "edited" had more than its CREATE, "old" was stored, "later" was stored by A's batch
        assert res[0].created == {("Task", pack("new")): 2, ("Task", pack("later")): 3}
        assert res[1].created == {("Task", pack("mine")): 4}
        again = b.cs(b.create("y"))
        assert (await storage.integrate([batch(app, again)]))[0].created == {("Task", pack("y")): 5}
        duplicate = (await storage.integrate([batch(app, again)]))[0]
        assert duplicate.ok and duplicate.server_versions == [] and duplicate.created == {}

    async def test_duplicates_are_skipped(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        c1, c2, c3 = a.cs(a.create("x")), a.cs(a.set("x", "title", "u")), a.cs(a.add("x", 1))
        assert (await storage.integrate([batch(app, c1, c2)]))[0].server_versions == [1, 2]
        again = (await storage.integrate([batch(app, c1, c2, c3)]))[0]
        assert (again.acked_version, again.server_versions) == (3, [3])
        pure = (await storage.integrate([batch(app, c2, c3)]))[0]
        assert (pure.ok, pure.acked_version, pure.server_versions) == (True, 3, [])
        page = await storage.read_log(app, 0, 1 << 20)
        assert [e.client_version for e in page.entries] == [1, 2, 3]
        assert (await storage.get_objects(app, "Task"))["x"]["votes"] == 1

    async def test_gaps_are_refused_and_store_nothing(
        self, storage: ServerStorage, app: str
    ) -> None:
        a = Writer("A")
        c1, c2, c3, c4 = (a.cs(a.create(f"g{i}")) for i in range(4))
        await storage.integrate([batch(app, c1)])
        gap = (await storage.integrate([batch(app, c3)]))[0]
        assert not gap.ok and gap.reason is RejectReason.GAP
        assert gap.error is not None and "3" in gap.error
        assert (gap.acked_version, gap.server_versions) == (1, [])
        with pytest.raises(BatchRejectedError) as info:
            gap.raise_for_error()
        assert info.value.reason is RejectReason.GAP
        partial = (await storage.integrate([batch(app, c2, c4)]))[0]
        assert partial.reason is RejectReason.GAP
        assert await storage.client_version(app, "A") == 1
        assert await storage.latest_version(app) == 1
        assert set(await storage.get_objects(app, "Task")) == {"g0"}
        ok = (await storage.integrate([batch(app, c2, c3, c4)]))[0]
        assert ok.server_versions == [2, 3, 4]

    async def test_unknown_client_and_foreign_origin_are_refused(
        self, storage: ServerStorage, app: str
    ) -> None:
        z, a = Writer("Z"), Writer("A")
        unknown = (await storage.integrate([batch(app, z.cs(z.create("z")))]))[0]
        assert unknown.reason is RejectReason.UNKNOWN_CLIENT
        foreign = (await storage.integrate([batch(app, a.cs(a.create("a")), origin="B")]))[0]
        assert foreign.reason is RejectReason.ORIGIN_MISMATCH
        forged = Changeset("A", 1, (Instruction(Op.ERASE, "Task", "a", HLC(5, 0, "B")),))
        res = (await storage.integrate([batch(app, forged)]))[0]
        assert res.reason is RejectReason.ORIGIN_MISMATCH
        assert await storage.latest_version(app) == 0

    async def test_bad_batch_is_rejected_alone(self, storage: ServerStorage, app: str) -> None:
        a, b, c = Writer("A"), Writer("B"), Writer("C")
        bad = Instruction(Op.CREATE, "NoSuchModel", "k", b.hlc(), value={"id": "k"})
        res = await storage.integrate(
            [
                batch(app, a.cs(a.create("a"))),
                batch(app, b.cs(b.create("b")), b.cs(bad)),
                batch(app, c.cs(c.create("c"))),
            ]
        )
        assert [r.ok for r in res] == [True, False, True]
        assert res[1].reason is RejectReason.INVALID and res[1].acked_version == 0
        assert [r.server_versions for r in res] == [[1], [], [2]]
        assert set(await storage.get_objects(app, "Task")) == {"a", "c"}
        assert await storage.client_version(app, "B") == 0
        assert await storage.latest_version(app) == 2

    async def test_validation_uses_the_schema(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        wrong_type = a.cs(a.create("w", title=None), a.set("w", "done", "not a bool"))
        res = (await storage.integrate([batch(app, wrong_type)]))[0]
        assert res.reason is RejectReason.INVALID
        assert await storage.get_objects(app, "Task") == {}

    # -- merge results --------------------------------------------------------------------

    async def test_last_writer_wins_whatever_the_upload_order(
        self, storage: ServerStorage, app: str
    ) -> None:
        a, b = Writer("A"), Writer("B")
        create = a.cs(a.create("x", title="first", at=1_000))
        late = b.cs(b.set("x", "title", "late", at=3_000))
        early = a.cs(a.set("x", "title", "early", at=2_000))
        await storage.integrate([batch(app, create)])
        await storage.integrate([batch(app, late)])
        await storage.integrate([batch(app, early)])
        assert (await storage.get_objects(app, "Task"))["x"]["title"] == "late"

    async def test_counter_adds_are_summed(self, storage: ServerStorage, app: str) -> None:
        a, b = Writer("A"), Writer("B")
        await storage.integrate([batch(app, a.cs(a.create("x", votes=1, at=1_000)))])
        await storage.integrate(
            [batch(app, a.cs(a.add("x", 2, at=2_000))), batch(app, b.cs(b.add("x", 3, at=2_500)))]
        )
        assert (await storage.get_objects(app, "Task"))["x"]["votes"] == 6
        await storage.integrate([batch(app, b.cs(b.set("x", "votes", 10, at=4_000)))])
        await storage.integrate([batch(app, a.cs(a.add("x", 5, at=3_000)))])  # before the set
        await storage.integrate([batch(app, a.cs(a.add("x", 7, at=5_000)))])  # after it
        assert (await storage.get_objects(app, "Task"))["x"]["votes"] == 17

    async def test_values_at_their_bounds_are_stored_exactly(
        self, storage: ServerStorage, app: str, make_storage: StorageFactory
    ) -> None:
        """Every float bit for bit (NaN payloads, -0.0), ints at ±2**63, counter sums
        wrapped into int64 (docs/merge.md), through rendering, states, queries, reopening."""
        a, b = Writer("A"), Writer("B")
        floats = edge_floats(40)
        made = []
        for i, x in enumerate(floats):
            value = {"id": i, "f": x, "fs": [x, -x], "fd": {"k": x}, "n": -(2**63), "hits": 0}
            made.append(Instruction(Op.CREATE, "Edges", i, a.hlc(), value=value))
        made.append(Instruction(Op.SET, "Edges", 0, a.hlc(), field="n", value=2**63 - 1))
        made.append(Instruction(Op.ADD, "Edges", 0, a.hlc(), field="hits", value=2**62))
        await storage.integrate([batch(app, a.cs(*made))])
        add = Instruction(Op.ADD, "Edges", 0, b.hlc(), field="hits", value=2**62)
        await storage.integrate([batch(app, b.cs(add))])  # the sum, 2**63, wraps around
        want = {
            i: {"f": float_bits(x), "fs": float_bits([x, -x]), "fd": float_bits({"k": x})}
            for i, x in enumerate(floats)
        }

        def check(objects: dict[Any, dict[str, Any]]) -> None:
            got = {
                pk: {k: float_bits(v[k]) for k in ("f", "fs", "fd")} for pk, v in objects.items()
            }
            assert got == want
            assert objects[0]["n"] == 2**63 - 1 and objects[0]["hits"] == -(2**63)
            assert objects[1]["n"] == -(2**63) and objects[1]["hits"] == 0

        check(await storage.get_objects(app, "Edges"))
        keys = [("Edges", pack(i)) for i in range(len(floats))]
        states = await storage.get_states(app, keys)
        check(
            {
                unpack(k[1]): ObjectState.from_bytes(s.state).render(EDGES) or {}
                for k, s in states.items()
            }
        )
        check({unpack(k[1]): s.values or {} for k, s in states.items()})
        query = bind(
            parse("hits == $0 AND n == $1"), EDGES, {"Edges": EDGES}, [-(2**63), 2**63 - 1]
        )
        page = await storage.read_matching(app, "Edges", [query], None, None, 1000)
        assert [unpack(o.pk) for o in page.objects] == [0]
        log = await storage.read_log(app, 0, 1 << 24)
        sent = [pack_instructions(made), pack_instructions([add])]
        assert [e.instructions for e in log.entries] == sent
        async with make_storage() as again:
            check(await again.get_objects(app, "Edges"))

    async def test_erase_wins_and_a_later_create_recreates(
        self, storage: ServerStorage, app: str
    ) -> None:
        a, b = Writer("A"), Writer("B")
        await storage.integrate([batch(app, a.cs(a.create("x", title="old", at=1_000)))])
        await storage.integrate([batch(app, b.cs(b.erase("x", at=2_000)))])
        await storage.integrate([batch(app, a.cs(a.set("x", "title", "upd", at=3_000)))])
        assert "x" not in await storage.get_objects(app, "Task")
        await storage.integrate([batch(app, a.cs(a.create("x", title="new", at=4_000)))])
        objects = await storage.get_objects(app, "Task")
        assert objects["x"]["title"] == "new"

    async def test_primary_key_types(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        u, o = uuid.UUID(int=7), ObjectId(b"\x01" * 12)
        await storage.integrate(
            [
                batch(
                    app,
                    a.cs(
                        a.note(NOTE_INT, 5, "int"),
                        a.note(NOTE_UUID, u, "uuid"),
                        a.note(NOTE_OID, o, "oid"),
                        a.create("5"),
                    ),
                )
            ]
        )
        assert (await storage.get_objects(app, "NoteI"))[5]["text"] == "int"
        assert (await storage.get_objects(app, "NoteU"))[u]["text"] == "uuid"
        assert (await storage.get_objects(app, "NoteO"))[o]["text"] == "oid"
        assert set(await storage.get_objects(app, "Task")) == {"5"}

    async def test_creates_of_stored_objects_merge(self, storage: ServerStorage, app: str) -> None:
        # NoteI has no counter or collection: its new objects are written with a plain
        # INSERT, which a storage may try before it looks (it must then look and merge)
        a, b, c = Writer("A"), Writer("B"), Writer("C")

        def note(w: Writer, pk: int, text: str, at: int) -> Instruction:
            value = {"id": pk, "text": text}
            return Instruction(Op.CREATE, "NoteI", pk, w.hlc(at), value=value)

        await storage.integrate(
            [batch(app, a.cs(note(a, 1, "a", 1_000), note(a, 2, "two", 1_001)))]
        )
        res = await storage.integrate(
            [batch(app, b.cs(note(b, 1, "b", 2_000), note(b, 3, "three", 2_001)))]
        )
        assert res[0].ok and res[0].created == {("NoteI", pack(3)): 2}
        older = await storage.integrate([batch(app, a.cs(note(a, 1, "older", 500)))])
        assert older[0].ok and older[0].created == {}
        erase = Instruction(Op.ERASE, "NoteI", 2, c.hlc(3_000))
        await storage.integrate([batch(app, c.cs(erase))])
        # one commit: a new object, a stored one, an erased one created again
        res = await storage.integrate(
            [
                batch(app, c.cs(note(c, 4, "four", 4_000), note(c, 2, "again", 4_001))),
                batch(app, b.cs(note(b, 5, "five", 4_002), note(b, 3, "THREE", 4_003))),
            ]
        )
        assert [r.ok for r in res] == [True, True]
        assert res[0].created == {("NoteI", pack(4)): 5}
        assert res[1].created == {("NoteI", pack(5)): 6}
        objects = await storage.get_objects(app, "NoteI")
        assert {k: v["text"] for k, v in objects.items()} == {
            1: "b",
            2: "again",
            3: "THREE",
            4: "four",
            5: "five",
        }
        assert await storage.latest_version(app) == 6

    # -- the log --------------------------------------------------------------------------

    async def test_log_entries_are_stored_exactly(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        cs = a.cs(a.create("x"), a.set("x", "title", "é"), a.add("x", 3))
        await storage.integrate([batch(app, cs)])
        page = await storage.read_log(app, 0, 1 << 20)
        assert page.entries == [LogEntry(1, "A", 1, pack_instructions(cs.instructions))]
        assert (page.cursor, page.latest_version, page.remaining_bytes) == (1, 1, 0)

    async def test_a_big_changeset_and_an_empty_one_are_one_version_each(
        self, storage: ServerStorage, app: str
    ) -> None:
        # one device transaction of 30,000 objects (~7.5 MB packed), then one the hub
        # refused and integrates as nothing (ERROR 232): one commit, one log row each
        a, b = Writer("A"), Writer("B")
        big = a.cs(*(a.create(f"k{i:05d}", title="x" * 220) for i in range(30_000)))
        empty = a.cs()
        res = await storage.integrate([batch(app, big, empty), batch(app, b.cs(b.create("b")))])
        assert [r.server_versions for r in res] == [[1, 2], [3]]
        assert res[0].acked_version == 2
        page = await storage.read_log(app, 0, 1)  # at least one entry, however big
        assert [(e.server_version, e.client_version) for e in page.entries] == [(1, 1)]
        assert page.entries[0].instructions == pack_instructions(big.instructions)
        assert len(page.entries[0].instructions) > 7_000_000
        rest = await storage.read_log(app, 1, 1 << 20)
        assert [e.server_version for e in rest.entries] == [2, 3]
        assert rest.entries[0].instructions == pack_instructions(())
        assert len(await storage.get_objects(app, "Task")) == 30_001

    async def test_read_log_pages_in_order(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        for i in range(10):
            await storage.integrate([batch(app, a.cs(a.create(f"p{i}", title="x" * 40)))])
        size = len((await storage.read_log(app, 0, 0)).entries[0].instructions)
        total = 10 * size
        cursor, seen = 0, []
        while True:
            page = await storage.read_log(app, cursor, 3 * size)
            assert page.latest_version == 10
            if not page.entries:
                assert page.cursor == cursor == 10 and page.remaining_bytes == 0
                break
            assert 1 <= len(page.entries) <= 3
            assert page.cursor == page.entries[-1].server_version
            assert page.remaining_bytes == total - page.cursor * size
            seen += [e.server_version for e in page.entries]
            cursor = page.cursor
        assert seen == list(range(1, 11))
        tiny = await storage.read_log(app, 4, 0)
        assert [e.server_version for e in tiny.entries] == [5]

    async def test_read_log_excludes_an_origin(self, storage: ServerStorage, app: str) -> None:
        a, b = Writer("A"), Writer("B")
        for i in range(3):
            await storage.integrate([batch(app, a.cs(a.create(f"a{i}")))])
            await storage.integrate([batch(app, b.cs(b.create(f"b{i}")))])
        await storage.integrate([batch(app, a.cs(a.create("a-last")))])
        page = await storage.read_log(app, 0, 1 << 20, exclude_origin="A")
        assert [(e.origin, e.server_version) for e in page.entries] == [
            ("B", 2),
            ("B", 4),
            ("B", 6),
        ]
        assert (page.cursor, page.remaining_bytes) == (7, 0)
        only_a = await storage.read_log(app, 6, 1 << 20, exclude_origin="A")
        assert (only_a.entries, only_a.cursor, only_a.remaining_bytes) == ([], 7, 0)
        first = await storage.read_log(app, 0, 0, exclude_origin="A")
        assert [e.server_version for e in first.entries] == [2] and first.cursor == 2
        assert first.remaining_bytes > 0

    async def test_read_log_refuses_bad_cursors(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        await storage.integrate([batch(app, a.cs(a.create("x")))])
        with pytest.raises(CursorAheadError):
            await storage.read_log(app, 2, 1024)
        with pytest.raises(ValueError):
            await storage.read_log(app, -1, 1024)
        empty = await storage.read_log(app + "-none", 0, 1024)
        assert (empty.entries, empty.cursor, empty.latest_version) == ([], 0, 0)

    # -- clients and schemas --------------------------------------------------------------

    async def test_register_client_ownership(self, storage: ServerStorage, app: str) -> None:
        assert await storage.register_client(app, "D", "dana") == 0
        assert await storage.register_client(app, "D", "dana") == 0
        d = Writer("D")
        await storage.integrate([batch(app, d.cs(d.create("d")), d.cs(d.create("e")))])
        assert await storage.register_client(app, "D", "dana") == 2
        with pytest.raises(ClientOwnershipError) as info:
            await storage.register_client(app, "D", "mallory")
        assert isinstance(info.value, StorageError) and isinstance(info.value, TidesyncError)
        other = app + "-other"
        await storage.wipe_app(other)
        try:
            assert await storage.register_client(other, "D", "mallory") == 0
        finally:
            await storage.wipe_app(other)

    async def test_schemas_merge_additively(self, storage: ServerStorage, app: str) -> None:
        assert await storage.get_schemas(app + "-none") == {}
        assert await storage.get_schemas(app) == {m.name: m for m in ALL_MODELS}
        note = FieldSchema("note", Kind.STR, optional=True)
        wider = ModelSchema("Task", (*TASK.fields, note), "id")
        merged = await storage.put_schemas(app, [wider])
        assert merged["Task"] == wider
        narrow = ModelSchema("Task", TASK.fields[:2], "id")
        tag = ModelSchema("Tag", (FieldSchema("name", Kind.STR, primary_key=True),), "name")
        merged = await storage.put_schemas(app, [narrow, tag])
        assert merged["Task"] == wider and merged["Tag"] == tag
        assert await storage.get_schemas(app) == merged

    async def test_incompatible_schema_is_refused(self, storage: ServerStorage, app: str) -> None:
        changed = ModelSchema(
            "Task", (TASK.fields[0], FieldSchema("title", Kind.INT, optional=True)), "id"
        )
        required = ModelSchema("Task", (*TASK.fields, FieldSchema("due", Kind.INT)), "id")
        dangling = ModelSchema(
            "Box",
            (
                FieldSchema("id", Kind.INT, primary_key=True),
                FieldSchema("x", Kind.LINK, optional=True, target="Nowhere"),
            ),
            "id",
        )
        for bad in (changed, required, dangling):
            with pytest.raises(SchemaMismatchError):
                await storage.put_schemas(app, [NOTE_INT, bad])
        assert await storage.get_schemas(app) == {m.name: m for m in ALL_MODELS}

    # -- durability, trimming, wiping -----------------------------------------------------

    async def test_everything_survives_reopening(
        self, make_storage: StorageFactory, storage: ServerStorage, app: str
    ) -> None:
        a = Writer("A")
        await storage.integrate([batch(app, a.cs(a.create("x", title="kept")))])
        await storage.integrate([batch(app, a.cs(a.create("y")), a.cs(a.erase("y")))])
        await storage.close()
        async with make_storage() as reopened:
            assert await reopened.latest_version(app) == 3
            assert await reopened.client_version(app, "A") == 3
            assert await reopened.get_schemas(app) == {m.name: m for m in ALL_MODELS}
            objects = await reopened.get_objects(app, "Task")
            assert set(objects) == {"x"} and objects["x"]["title"] == "kept"
            with pytest.raises(ClientOwnershipError):
                await reopened.register_client(app, "A", "someone else")
            res = await reopened.integrate([batch(app, a.cs(a.create("z")))])
            assert res[0].server_versions == [4]
            page = await reopened.read_log(app, 0, 1 << 20)
            assert [e.server_version for e in page.entries] == [1, 2, 3, 4]

    async def test_trim_history(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        for i in range(5):
            await storage.integrate([batch(app, a.cs(a.create(f"t{i}")))])
        assert await storage.trim_history(app, 3) == 3
        with pytest.raises(HistoryTrimmedError) as info:
            await storage.read_log(app, 2, 1 << 20)
        assert info.value.trimmed_version == 3
        page = await storage.read_log(app, 3, 1 << 20)
        assert [e.server_version for e in page.entries] == [4, 5]
        assert page.remaining_bytes == 0
        part = await storage.read_log(app, 3, 0)
        assert part.remaining_bytes == len(page.entries[1].instructions)
        assert await storage.trim_history(app, 2) == 0
        assert await storage.trim_history(app, 99) == 2
        assert (await storage.read_log(app, 5, 1024)).entries == []
        res = await storage.integrate([batch(app, a.cs(a.create("t5")))])
        assert res[0].server_versions == [6]
        assert len(await storage.get_objects(app, "Task")) == 6

    async def test_wipe_app(self, storage: ServerStorage, app: str) -> None:
        a = Writer("A")
        other = app + "-kept"
        await storage.wipe_app(other)
        await storage.put_schemas(other, [TASK])
        await storage.register_client(other, "A", "user-A")
        await storage.integrate(
            [batch(app, a.cs(a.create("x"))), batch(other, Changeset("A", 1, ()))]
        )
        await storage.wipe_app(app)
        assert await storage.latest_version(app) == 0
        assert await storage.get_schemas(app) == {}
        assert await storage.get_objects(app, "Task") == {}
        assert await storage.client_version(app, "A") == 0
        assert await storage.register_client(app, "A", "new owner") == 0
        assert await storage.latest_version(other) == 1
        await storage.wipe_app(other)

    # -- the backend API: origins' users, records, leases ------------------------------------

    async def test_client_users_name_each_registered_origin(
        self, storage: ServerStorage, app: str
    ) -> None:
        assert await storage.client_users(app, ["A", "C", "nobody", "A"]) == {
            "A": "user-A",
            "C": "user-C",
        }
        assert await storage.client_users(app, []) == {}
        many = [f"o{i}" for i in range(1200)]  # more than one chunk of parameters
        for origin in many[:3]:
            await storage.register_client(app, origin, "u-" + origin)
        found = await storage.client_users(app, many)
        assert found == {o: "u-" + o for o in many[:3]}
        assert await storage.client_users(app + "-other", ["A"]) == {}

    async def test_records_are_durable_and_per_app(
        self, make_storage: StorageFactory, storage: ServerStorage, app: str
    ) -> None:
        other = app + "-other"
        await storage.wipe_app(other)
        assert await storage.get_record(app, "hook:0") is None
        await storage.put_record(app, "hook:0", '{"cursor": 3}')
        await storage.put_record(app, "hook:0", '{"cursor": 7}')
        await storage.put_record(other, "hook:0", "x")
        assert await storage.get_record(app, "hook:0") == '{"cursor": 7}'
        await storage.close()
        async with make_storage() as reopened:
            assert await reopened.get_record(app, "hook:0") == '{"cursor": 7}'
            assert await reopened.get_record(other, "hook:0") == "x"
            await reopened.wipe_app(app)
            assert await reopened.get_record(app, "hook:0") is None
            assert await reopened.get_record(other, "hook:0") == "x"
            await reopened.wipe_app(other)

    async def test_a_lease_has_one_holder_until_it_expires_or_is_dropped(
        self, storage: ServerStorage, app: str
    ) -> None:
        assert await storage.take_lease(app, "hook:0", "p1", 30)
        assert not await storage.take_lease(app, "hook:0", "p2", 30)
        assert await storage.take_lease(app, "hook:0", "p1", 30)  # renewed
        assert await storage.take_lease(app, "hook:1", "p2", 30)  # another lease
        await storage.drop_lease(app, "hook:0", "p2")  # not p2's: nothing happens
        assert not await storage.take_lease(app, "hook:0", "p2", 30)
        await storage.drop_lease(app, "hook:0", "p1")
        assert await storage.take_lease(app, "hook:0", "p2", 0.2)
        assert not await storage.take_lease(app, "hook:0", "p1", 30)
        await asyncio.sleep(0.4)  # p2 died: its lease ran out
        assert await storage.take_lease(app, "hook:0", "p1", 30)
        assert not await storage.take_lease(app, "hook:0", "p2", 30)

    # -- flexible sync reads ----------------------------------------------------------------

    async def test_read_objects_pages_in_packed_pk_byte_order(
        self, storage: ServerStorage, app: str
    ) -> None:
        a = Writer("A")
        pks = ["b", "a", "ab", "é", "Z", "a\x00", "", "zz"]  # includes a multi-byte pk
        await storage.integrate([batch(app, a.cs(*(a.create(p, title=p) for p in pks)))])
        await storage.integrate([batch(app, a.cs(a.erase("zz")))])
        alive = sorted(pack(p) for p in pks if p != "zz")
        got: list[bytes] = []
        after: bytes | None = None
        for _ in range(20):
            rows = await storage.read_objects(app, "Task", after, 3)
            assert len(rows) <= 3
            if not rows:
                break
            got += [r.pk for r in rows]
            for r in rows:
                assert r.values is not None and r.values["title"] == unpack(r.pk)
                assert ObjectState.from_bytes(r.state).alive
            after = rows[-1].pk
        assert got == alive
        ints = [300, -1, 0, 1, 70_000]
        await storage.integrate([batch(app, a.cs(*(a.note(NOTE_INT, i, str(i)) for i in ints)))])
        rows = await storage.read_objects(app, "NoteI", None, 100)
        assert [r.pk for r in rows] == sorted(pack(i) for i in ints)
        assert await storage.read_objects(app, "Nothing", None, 10) == []

    async def test_get_states_includes_erased_and_omits_unknown(
        self, storage: ServerStorage, app: str
    ) -> None:
        a = Writer("A")
        await storage.integrate(
            [batch(app, a.cs(a.create("x", title="one"), a.create("y"), a.erase("y")))]
        )
        keys = [("Task", pack("x")), ("Task", pack("y")), ("Task", pack("never")), ("NoteI", b"")]
        states = await storage.get_states(app, keys)
        assert set(states) == {("Task", pack("x")), ("Task", pack("y"))}
        x, y = states[("Task", pack("x"))], states[("Task", pack("y"))]
        assert x.pk == pack("x") and x.values is not None and x.values["title"] == "one"
        assert ObjectState.from_bytes(x.state).alive
        assert y.values is None and not ObjectState.from_bytes(y.state).alive
        many = [("Task", pack(f"m{i}")) for i in range(1200)]
        assert await storage.get_states(app, many) == {}
        assert await storage.get_states(app, []) == {}
        raw = await storage.get_state_bytes(app, [*keys, *many])
        assert raw == {key: obj.state for key, obj in states.items()}
        assert await storage.get_state_bytes(app, []) == {}

    async def test_objects_size_counts_alive_objects(
        self, storage: ServerStorage, app: str
    ) -> None:
        assert await storage.objects_size(app, "Task") == (0, 0)
        a = Writer("A")
        await storage.integrate(
            [batch(app, a.cs(a.create("x"), a.create("y", title="long" * 50), a.erase("x")))]
        )
        rows = await storage.read_objects(app, "Task", None, 10)
        assert [r.pk for r in rows] == [pack("y")]
        assert await storage.objects_size(app, "Task") == (1, len(rows[0].state))

    # -- the check an upload passes again in its commit (base.CommitCheck) ---------------

    async def test_commit_checks_judge_what_the_transaction_sees(
        self, storage: ServerStorage, app: str
    ) -> None:
        a, b = Writer("A"), Writer("B")
        x, y = ("Task", pack("x")), ("Task", pack("y"))
        # new objects only: nothing stored to show; what the check returns is integrated
        check = _RefuseStored()
        (res,) = await storage.integrate([_checked(app, check, a.cs(a.create("x")))])
        assert res.ok and check.shown == [{}]
        stored = await storage.get_state_bytes(app, [x])
        # an update of a stored object and a new one: the check is shown the stored state
        # as get_state_bytes gives it, and refuses the update; the CREATE is kept, the
        # changeset keeps its version
        check = _RefuseStored()
        upload = a.cs(a.set("x", "title", "refused"), a.create("y", title="kept"))
        (res,) = await storage.integrate([_checked(app, check, upload)])
        assert res.ok and res.acked_version == 2 and res.server_versions == [2]
        assert check.shown == [stored]
        objects = await storage.get_objects(app, "Task")
        assert objects["x"]["title"] == "t" and objects["y"]["title"] == "kept"
        page = await storage.read_log(app, 1, 1 << 20)
        assert [i.pk for e in page.entries for i in _instructions(e)] == ["y"]
        # in one transaction, after another batch changed the object: the check sees that
        check = _RefuseStored()
        (first, second) = await storage.integrate(
            [
                batch(app, b.cs(b.set("y", "title", "changed", at=2_000), b.create("z"))),
                _checked(app, check, a.cs(a.set("y", "done", True), a.set("z", "done", True))),
            ]
        )
        assert first.ok and second.ok and second.server_versions == [4]
        (shown,) = check.shown
        assert set(shown) == {y, ("Task", pack("z"))}
        seen_y = ObjectState.from_bytes(shown[y]).render(TASK)
        assert seen_y is not None and seen_y["title"] == "changed"
        objects = await storage.get_objects(app, "Task")
        assert not objects["y"]["done"] and not objects["z"]["done"]
        assert objects["y"]["title"] == "changed"
        # a check that fails refuses its batch alone
        (good, bad) = await storage.integrate(
            [batch(app, b.cs(b.create("w"))), _checked(app, _Broken(), a.cs(a.create("v")))]
        )
        assert good.ok and not bad.ok and bad.reason is RejectReason.INVALID
        assert bad.acked_version == 3
        assert set(await storage.get_objects(app, "Task")) == {"x", "y", "z", "w"}

    # -- concurrency ----------------------------------------------------------------------

    async def test_concurrent_integrates_get_dense_distinct_versions(
        self, storage: ServerStorage, app: str
    ) -> None:
        origins = [f"w{i}" for i in range(20)]
        for origin in origins:
            await storage.register_client(app, origin, "u")

        async def upload(origin: str) -> list[int]:
            w, got = Writer(origin), []
            for i in range(5):
                (res,) = await storage.integrate([batch(app, w.cs(w.create(f"{origin}-{i}")))])
                assert res.ok and res.acked_version == i + 1
                got += res.server_versions
            return got

        per_origin = await asyncio.gather(*(upload(o) for o in origins))
        every = sorted(v for got in per_origin for v in got)
        assert every == list(range(1, 101))
        assert all(got == sorted(got) for got in per_origin)
        page = await storage.read_log(app, 0, 1 << 24)
        assert [e.server_version for e in page.entries] == every
        assert len(await storage.get_objects(app, "Task")) == 100

    async def test_read_log_never_skips_a_version(self, storage: ServerStorage, app: str) -> None:
        origins = [f"r{i}" for i in range(8)]
        for origin in origins:
            await storage.register_client(app, origin, "u")
        done = asyncio.Event()

        async def upload(origin: str) -> None:
            w = Writer(origin)
            for i in range(10):
                await storage.integrate([batch(app, w.cs(w.create(f"{origin}-{i}")))])
                await asyncio.sleep(0)

        async def follow(exclude: str | None) -> list[int]:
            cursor, seen = 0, []
            while True:
                finished = done.is_set()
                page = await storage.read_log(app, cursor, 60, exclude_origin=exclude)
                assert page.cursor >= cursor
                assert all(e.origin != exclude for e in page.entries)
                seen += [e.server_version for e in page.entries]
                cursor = page.cursor
                if finished and cursor == page.latest_version:
                    return seen
                await asyncio.sleep(0)

        readers = [asyncio.create_task(follow(None)), asyncio.create_task(follow("r0"))]
        await asyncio.gather(*(upload(o) for o in origins))
        done.set()
        everything, others = await asyncio.gather(*readers)
        assert everything == list(range(1, 81))
        page = await storage.read_log(app, 0, 1 << 24)
        assert others == [e.server_version for e in page.entries if e.origin != "r0"]
