"""The SQLite server storage: the shared conformance suite plus SQLite-specific checks."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tidesync.core.changeset import Instruction, Op
from tidesync.core.packing import pack
from tidesync.server.storage import (
    ServerStorage,
    SQLiteStorage,
    StorageError,
    UploadBatch,
    UploadResult,
)
from tidesync.server.storage.conformance import (
    ALL_MODELS,
    NOTE_INT,
    NOTE_UUID,
    TASK,
    StorageConformance,
    StorageFactory,
    Writer,
    batch,
)


class TestSQLiteConformance(StorageConformance):
    """Every conformance test, on a fresh SQLite file per test."""

    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> StorageFactory:
        return lambda: SQLiteStorage(tmp_path / "data" / "server.sqlite3")


def _storage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tidesync-sqlite")]


async def test_file_is_wal_and_close_joins_the_worker(tmp_path: Path) -> None:
    before = len(_storage_threads())
    storage = SQLiteStorage.in_folder(tmp_path / "folder")
    assert storage.path == tmp_path / "folder" / "server.sqlite3"
    async with storage:
        await storage.register_client("app", "A", "u")
        assert len(_storage_threads()) == before + 1
    assert len(_storage_threads()) == before
    with sqlite3.connect(storage.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "1"
    conn.close()
    with pytest.raises(StorageError):
        await storage.latest_version("app")


async def test_refuses_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with SQLiteStorage(path):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    conn.close()
    with pytest.raises(StorageError, match="format 99"):
        await SQLiteStorage(path).open()
    assert _storage_threads() == []


async def test_bulk_integration_is_fast(tmp_path: Path) -> None:
    """100,000 small CREATEs in 100 uploads: a few seconds, not tens (batched SQL, no rescans).

    Most of the time is validation and merge in core/; the storage's own share is small.
    """
    async with SQLiteStorage(tmp_path / "bulk.sqlite3") as storage:
        await storage.put_schemas("app", [TASK])
        await storage.register_client("app", "A", "u")
        w = Writer("A")
        uploads = [
            batch("app", w.cs(*(w.create(f"{n}-{i}", title="x") for i in range(1000))))
            for n in range(100)
        ]
        start = time.perf_counter()
        for upload in uploads:
            (res,) = await storage.integrate([upload])
            assert res.ok
        elapsed = time.perf_counter() - start
        assert await storage.latest_version("app") == 100
        assert len(await storage.get_objects("app", "Task")) == 100_000
    assert elapsed < 20, f"integrating 100,000 instructions took {elapsed:.1f}s"


async def test_concurrent_uploads_share_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads arriving while a commit runs are integrated together in the next one."""
    storage = SQLiteStorage(tmp_path / "g.sqlite3")
    group_sizes: list[int] = []
    integrate_txn = storage._integrate_txn

    def counting(conn: sqlite3.Connection, batches: list[UploadBatch]) -> list[UploadResult]:
        group_sizes.append(len(batches))
        return integrate_txn(conn, batches)

    monkeypatch.setattr(storage, "_integrate_txn", counting)
    async with storage:
        await storage.put_schemas("app", [TASK])
        writers = [Writer(f"o{i}") for i in range(50)]
        for w in writers:
            await storage.register_client("app", w.origin, "u")
        results = await asyncio.gather(
            *(storage.integrate([batch("app", w.cs(w.create(w.origin)))]) for w in writers)
        )
        assert sorted(r.server_versions[0] for (r,) in results) == list(range(1, 51))
        assert [r.origin for (r,) in results] == [w.origin for w in writers]
    assert sum(group_sizes) == 50
    assert len(group_sizes) < 10


async def _two_writers(
    storage: SQLiteStorage, count: int, which: Callable[[int], int], title: Callable[[int], str]
) -> list[Writer]:
    """Writers A and B registered with app ``app``; ``count`` uploads of one new Task each,
    the i-th by writer ``which(i)`` with title ``title(i)``."""
    await storage.put_schemas("app", [TASK])
    writers = [Writer("A"), Writer("B")]
    for w in writers:
        await storage.register_client("app", w.origin, "u")
    for i in range(count):
        w = writers[which(i)]
        await storage.integrate([batch("app", w.cs(w.create(f"k{i}", title(i))))])
    return writers


async def test_log_tail_in_memory_answers_like_the_file(tmp_path: Path) -> None:
    """read_log served from the in-memory tail of recent commits returns exactly what the
    file returns, for every cursor, page size and excluded origin; trims drop the tail."""
    from tidesync.server.storage.sqlite import _read_log

    async with SQLiteStorage(tmp_path / "tail.sqlite3") as storage:
        writers = await _two_writers(storage, 30, lambda i: i % 3 % 2, lambda i: "x" * (i * 7))
        tail = storage._tails["app"]
        assert tail.latest == 30 and tail.start == 0
        served = 0
        for after in range(0, 31):
            for max_bytes in (0, 50, 400, 1 << 20):
                for exclude in (None, "A", "B"):
                    from_file = await storage._run(
                        storage._transaction, _read_log, "app", after, max_bytes, exclude
                    )
                    assert await storage.read_log("app", after, max_bytes, exclude) == from_file
                    served += 1
        assert served == 31 * 4 * 3
        await storage.trim_history("app", 10)
        assert "app" not in storage._tails
        w = writers[0]
        await storage.integrate([batch("app", w.cs(w.create("late")))])
        assert storage._tails["app"].start == 30
        page = await storage.read_log("app", 30, 1 << 20)
        assert [e.server_version for e in page.entries] == [31]


async def test_log_tail_past_its_byte_budget_keeps_rows_without_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the byte budget the oldest rows keep all but their instructions: reads that
    exclude their origin (a device's acknowledgement) are still answered from memory, the
    others by the file, and every answer is what the file gives; past the row budget the
    oldest rows go."""
    from tidesync.server.storage import sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "_TAIL_BYTES", 300)
    monkeypatch.setattr(sqlite_mod, "_TAIL_ROWS", 20)
    file_reads: list[int] = []
    read_file = sqlite_mod._read_log

    def counting(conn: sqlite3.Connection, *args: Any) -> Any:
        file_reads.append(args[1])
        return read_file(conn, *args)

    async with SQLiteStorage(tmp_path / "bare.sqlite3") as storage:
        # B wrote versions 10 and 17, A the others
        await _two_writers(storage, 25, lambda i: 1 if i in (9, 16) else 0, lambda i: "x" * 40)
        tail = storage._tails["app"]
        assert (tail.start, tail.latest) == (5, 25)
        assert 0 < tail.bare < len(tail.rows) and tail.bytes <= 300
        assert all(row[4] == b"" for row in tail.rows[: tail.bare])
        monkeypatch.setattr(sqlite_mod, "_read_log", counting)
        from_memory_past_bare = 0
        for after in range(5, 26):
            for max_bytes in (0, 100, 1 << 20):
                for exclude in (None, "A", "B"):
                    file_reads.clear()
                    got = await storage.read_log("app", after, max_bytes, exclude)
                    expected = await storage._run(
                        storage._transaction, read_file, "app", after, max_bytes, exclude
                    )
                    assert got == expected, (after, max_bytes, exclude)
                    needs_bare = any(row[2] != exclude for row in tail.rows[after - 5 : tail.bare])
                    assert bool(file_reads) == needs_bare, (after, max_bytes, exclude)
                    if after - 5 < tail.bare and not needs_bare:
                        from_memory_past_bare += 1
        assert from_memory_past_bare > 0


async def test_a_create_guessed_new_but_stored_is_integrated_again_looking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # new objects are first written without a look; a stored one makes the plain INSERT
    # fail, and the whole group is integrated again with every object looked up
    tries: list[bool] = []
    original = SQLiteStorage._integrate_group

    def spy(self: SQLiteStorage, conn: sqlite3.Connection, batches: Any, guess: bool) -> Any:
        tries.append(guess)
        return original(self, conn, batches, guess)

    monkeypatch.setattr(SQLiteStorage, "_integrate_group", spy)
    a, b = Writer("A"), Writer("B")

    def note(w: Writer, pk: int, text: str, at: int) -> Instruction:
        return Instruction(Op.CREATE, "NoteI", pk, w.hlc(at), value={"id": pk, "text": text})

    async with SQLiteStorage(tmp_path / "s.sqlite3") as storage:
        await storage.put_schemas("app", ALL_MODELS)
        for origin in ("A", "B"):
            await storage.register_client("app", origin, "u")
        await storage.integrate([batch("app", a.cs(note(a, 1, "a", 1_000)))])
        assert tries == [True]
        res = await storage.integrate(
            [batch("app", b.cs(note(b, 2, "new", 2_000), note(b, 1, "b", 2_001)))]
        )
        assert tries == [True, True, False]
        assert res[0].ok and res[0].server_versions == [2]
        assert res[0].created == {("NoteI", pack(2)): 2}
        objects = await storage.get_objects("app", "NoteI")
        assert {k: v["text"] for k, v in objects.items()} == {1: "b", 2: "new"}
        page = await storage.read_log("app", 0, 1 << 20)
        assert [e.server_version for e in page.entries] == [1, 2]


async def test_a_lone_small_upload_on_a_quiet_server_is_committed_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone upload of a few instructions, with the worker idle and no commit for a
    millisecond, is committed on the event loop's thread; a large one, one right after
    another commit, and one arriving while the worker is busy go to the worker, and every
    one is integrated the same way (the log and the objects are the file's)."""
    from tidesync.server.storage import sqlite as sqlite_mod

    threads: list[str] = []
    integrate_txn = SQLiteStorage._integrate_txn

    def spy(self: SQLiteStorage, conn: sqlite3.Connection, batches: Any) -> Any:
        threads.append("loop" if threading.current_thread() is main else "worker")
        return integrate_txn(self, conn, batches)

    monkeypatch.setattr(SQLiteStorage, "_integrate_txn", spy)
    main = threading.current_thread()
    w = Writer("A")

    async def quiet() -> None:
        await asyncio.sleep(sqlite_mod._NOW_QUIET * 2)

    async with SQLiteStorage(tmp_path / "now.sqlite3") as storage:
        await storage.put_schemas("app", [TASK])
        await storage.register_client("app", "A", "u")
        await quiet()
        (r1,) = await storage.integrate([batch("app", w.cs(w.create("k1"), w.create("k2")))])
        assert threads == ["loop"] and r1.server_versions == [1]
        # right after a commit: part of a burst, for the worker's group commit
        (r2,) = await storage.integrate([batch("app", w.cs(w.create("k3")))])
        assert threads == ["loop", "worker"] and r2.server_versions == [2]
        await quiet()
        big = [w.create(f"b{i}") for i in range(sqlite_mod._NOW_MAX + 1)]
        await storage.integrate([batch("app", w.cs(*big))])
        assert threads[-1] == "worker"
        # the worker busy with another job: the upload waits for it, on the worker
        release = threading.Event()
        blocker = asyncio.ensure_future(storage._run(release.wait, 10))
        await asyncio.sleep(0.01)
        await quiet()
        upload = asyncio.ensure_future(storage.integrate([batch("app", w.cs(w.create("k4")))]))
        await asyncio.sleep(0.01)
        assert not upload.done()
        release.set()
        await blocker
        (r4,) = await upload
        assert threads[-1] == "worker" and r4.server_versions == [4]
        await quiet()
        await storage.integrate([batch("app", w.cs(w.create("k5")))])
        assert threads[-1] == "loop"
        page = await storage.read_log("app", 0, 1 << 20)
        from_file = await storage._run(
            storage._transaction, sqlite_mod._read_log, "app", 0, 1 << 20, None
        )
        assert page == from_file and [e.server_version for e in page.entries] == [1, 2, 3, 4, 5]
        objects = await storage.get_objects("app", "Task")
        assert len(objects) == 2 + 1 + len(big) + 2


async def test_a_commit_on_the_event_loop_that_fails_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage error in a commit made on the event loop is a StorageError, the
    transaction is rolled back, the in-memory log tail is dropped, and the same upload
    succeeds when sent again."""
    from tidesync.server.storage import sqlite as sqlite_mod

    fail = [True]
    integrate_txn = SQLiteStorage._integrate_txn

    def flaky(self: SQLiteStorage, conn: sqlite3.Connection, batches: Any) -> Any:
        result = integrate_txn(self, conn, batches)
        if fail.pop() if fail else False:
            raise sqlite3.OperationalError("disk I/O error")
        return result

    monkeypatch.setattr(SQLiteStorage, "_integrate_txn", flaky)
    w = Writer("A")
    async with SQLiteStorage(tmp_path / "fail.sqlite3") as storage:
        await storage.put_schemas("app", [TASK])
        await storage.register_client("app", "A", "u")
        fail.clear()
        await storage.integrate([batch("app", w.cs(w.create("k1")))])
        assert "app" in storage._tails
        fail.append(True)
        await asyncio.sleep(sqlite_mod._NOW_QUIET * 2)
        upload = batch("app", w.cs(w.create("k2")))
        with pytest.raises(StorageError, match="disk I/O error"):
            await storage.integrate([upload])
        assert "app" not in storage._tails and storage._group_log is None
        assert await storage.latest_version("app") == 1
        (result,) = await storage.integrate([upload])
        assert result.ok and result.server_versions == [2]
        assert set(await storage.get_objects("app", "Task")) == {"k1", "k2"}


def _scenario() -> list[list[UploadBatch]]:
    """Uploads of new objects the one-pass path takes, and neighbours it must leave to the
    general path: a key already in the group, a key twice, an update beside a create, a
    stored key created again, a bad value, a model with a counter field."""
    a, b, c = Writer("A"), Writer("B"), Writer("C")
    n = NOTE_INT
    update = Instruction(Op.SET, "NoteI", 1, b.hlc(), field="text", value="uno")
    return [
        [batch("app", a.cs(a.note(n, 1, "one"), a.note(n, 2, "two")), a.cs(a.note(n, 3, "x")))],
        [batch("app", a.cs(a.note(n, 4, "a4"))), batch("app", b.cs(b.note(n, 4, "b4")))],
        [batch("app", b.cs(b.note(n, 5, "five"), update))],
        [batch("app", c.cs(c.note(n, 6, "six"), c.note(n, 6, "again")))],
        [batch("app", c.cs(c.note(n, 1, "stored")))],
        [batch("app", a.cs(a.create("t1"), a.note(n, 8, "eight")))],
        [batch("app", b.cs(b.note(NOTE_UUID, uuid.UUID(int=9), "nine")))],
        [batch("app", c.cs(c.note(n, 7, 7)))],  # type: ignore[arg-type]
    ]


async def _run_scenario(path: Path) -> list[Any]:
    return await run_scenario(SQLiteStorage(path))


async def run_scenario(opened: ServerStorage) -> list[Any]:
    """Run :func:`_scenario` on an unopened storage; what it answered and stored."""
    seen: list[Any] = []
    async with opened as storage:
        await storage.put_schemas("app", ALL_MODELS)
        for origin in ("A", "B", "C"):
            await storage.register_client("app", origin, "u")
        for batches in _scenario():
            for r in await storage.integrate(batches):
                seen.append((r.ok, r.server_versions, r.created, r.error, r.reason))
        for model in ("NoteI", "NoteU", "Task"):
            objects = await storage.get_objects("app", model)
            seen.append(sorted(objects.items(), key=repr))
            keys = [(model, pack(pk)) for pk in objects]
            seen.append(sorted((await storage.get_state_bytes("app", keys)).items()))
        page = await storage.read_log("app", 0, 1 << 20)
        seen.append([(e.server_version, e.origin, e.client_version) for e in page.entries])
    return seen


def spy_on_new_creates(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[bool]:
    """Record, for each call of a storage module's ``only_new_creates``, whether it took
    the upload's objects for new."""
    taken: list[bool] = []
    original = module.only_new_creates

    def spy(*args: Any) -> Any:
        made = original(*args)
        taken.append(made is not None)
        return made

    monkeypatch.setattr(module, "only_new_creates", spy)
    return taken


async def test_uploads_of_new_objects_end_as_the_general_path_makes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tidesync.server.storage import sqlite as module

    taken = spy_on_new_creates(monkeypatch, module)
    fast = await _run_scenario(tmp_path / "fast.sqlite3")
    # the first pass of each upload that passed validation; the stored key is guessed new
    assert taken == [True, True, False, False, False, True, False, True]
    monkeypatch.setattr(module, "only_new_creates", lambda *args: None)
    general = await _run_scenario(tmp_path / "general.sqlite3")
    assert fast == general
    assert all(r[0] for r in fast[:8]) and not fast[8][0]  # only the bad value is refused
    assert fast[5][1] == [7] and fast[5][2] == {}  # the stored key: merged, not created
