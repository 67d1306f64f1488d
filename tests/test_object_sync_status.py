"""Per-object sync status in the local store (real SQLite files): ``db.sync_status``,
``db.pending`` and ``@pending`` in queries, kept by local writes and the stored
acknowledgement (``store/syncstatus.py``). The synced behaviour (a real server, refusals,
acknowledgements) is in tests/test_session_status.py."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import tidesync as ts
from tidesync.store.engine import StoreEngine

from .conftest import MODELS, Task


def test_a_write_makes_its_objects_pending_at_its_version(db: ts.Database) -> None:
    with db.write():
        a = db.add(Task(summary="a"))
        b = db.add(Task(summary="b"))
    status = db.sync_status(a)
    assert status == ts.ObjectSyncStatus.PENDING
    assert status.version == 1 and status.reason is None
    with db.write():
        a.summary = "a2"
    assert db.sync_status(a).version == 2
    assert db.sync_status(b).version == 1
    assert str(db.sync_status(a)) == "pending (local version 2)"
    assert sorted(t.summary for t in db.pending(Task)) == ["a2", "b"]


def test_pending_in_a_query_with_other_conditions(db: ts.Database) -> None:
    with db.write():
        db.add(Task(summary="open", done=False))
        db.add(Task(summary="closed", done=True))
    found = db.query(Task, "done == false AND @pending == true")
    assert [t.summary for t in found] == ["open"]
    assert len(db.query(Task, "@pending == false")) == 0
    assert len(db.query(Task, "@pending != $0", True)) == 0
    assert len(db.query(Task, "NOT (@pending == true)")) == 0


def _ack(path: Path, version: int) -> None:
    """What the sync worker does when it stores an acknowledgement."""
    engine = StoreEngine(str(path), {})
    try:
        engine.store_acked({"upload_acked": version}, durable=True)
    finally:
        engine.close()


def test_the_stored_acknowledgement_makes_objects_synced(db: ts.Database) -> None:
    with db.write():
        a = db.add(Task(summary="a"))
    with db.write():
        b = db.add(Task(summary="b"))
    _ack(db.path, 1)
    assert db.sync_status(a) == ts.ObjectSyncStatus.SYNCED
    assert db.sync_status(a).version is None
    assert db.sync_status(b) == ts.ObjectSyncStatus.PENDING
    assert [t.summary for t in db.pending(Task)] == ["b"]
    _ack(db.path, 2)
    assert len(db.pending(Task)) == 0


def test_pending_results_notify_as_acknowledgements_are_stored(db: ts.Database) -> None:
    with db.write():
        for i in range(3):
            db.add(Task(summary=f"t{i}", priority=i))
    with db.write():
        db.add(Task(summary="later"))
    sizes: list[int] = []
    pending = db.pending(Task)
    token = pending.add_listener(lambda change: sizes.append(len(change.results)))
    try:
        assert len(pending) == 4
        deadline = time.monotonic() + 10
        _ack(db.path, 1)
        while sizes[-1:] != [1] and time.monotonic() < deadline:
            time.sleep(0.01)
        _ack(db.path, 2)
        while sizes[-1:] != [0] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        token.cancel()
    assert sizes == [1, 0]


def test_refused_until_the_next_write(db: ts.Database) -> None:
    with db.write():
        a = db.add(Task(summary="a"))
    engine = StoreEngine(str(db.path), {n: s for n, s in db.schemas.items()})
    try:
        engine.mark_refused([("Task", a.id, "write to Task not allowed by rule 'mine'")])
    finally:
        engine.close()
    status = db.sync_status(a)
    assert status == ts.ObjectSyncStatus.REFUSED
    assert status.reason == "write to Task not allowed by rule 'mine'"
    assert str(status).startswith("refused: write to Task")
    _ack(db.path, 1)  # the acknowledgement of the refused write keeps the reason
    assert db.sync_status(a) == ts.ObjectSyncStatus.REFUSED
    assert len(db.pending(Task)) == 0
    with db.write():
        a.summary = "again"
    assert db.sync_status(a) == ts.ObjectSyncStatus.PENDING
    assert db.sync_status(a).version == 2


def test_pending_is_not_for_the_server(db: ts.Database) -> None:
    from tidesync.core import query as q

    parsed = q.parse("@pending == true")
    schema = db.schemas["Task"]
    with pytest.raises(ts.QueryError, match="only on a device"):
        q.bind(parsed, schema, db.schemas, ())
    with pytest.raises(ts.QueryError, match="true or false"):
        db.query(Task, "@pending == 3")
    with pytest.raises(ts.QueryError, match="== or !="):
        db.query(Task, "@pending > true")
    with pytest.raises(ts.QueryError, match="must follow a field"):
        db.query(Task, "@count == 1")
    assert q.render(parsed) == "@pending == true"


def test_an_object_not_in_the_database(db: ts.Database) -> None:
    with pytest.raises(ts.ConfigurationError, match="add it first"):
        db.sync_status(Task(summary="loose"))


def test_a_file_from_before_gets_its_pending_objects(db_path: Path) -> None:
    with ts.Database(ts.Configuration.local(MODELS, path=db_path)) as db:
        with db.write():
            a = db.add(Task(summary="a"))
            pk = a.id
    conn = sqlite3.connect(db_path)
    conn.execute("DROP TABLE _sync_status")
    conn.commit()
    conn.close()
    with ts.Database(ts.Configuration.local(MODELS, path=db_path)) as db:
        a = db.find(Task, pk)
        assert a is not None
        assert db.sync_status(a) == ts.ObjectSyncStatus.PENDING
        assert db.sync_status(a).version == 1


def test_pending_is_a_key_lookup_per_object(db: ts.Database) -> None:
    with db.write():
        db.add(Task(summary="a"))
    sql, params = db.pending(Task).snapshot_sql()
    plan = " ".join(
        str(row[3]) for row in db._engine.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)
    )
    assert "_sync_status" in sql
    assert "pk=?" in plan, plan  # never a scan of the status table per object


def test_a_versioned_file_from_before_gets_the_table_too(db_path: Path) -> None:
    with ts.Database(ts.Configuration.local(MODELS, path=db_path, schema_version=1)) as db:
        with db.write():
            pk = db.add(Task(summary="a")).id
    conn = sqlite3.connect(db_path)
    conn.execute("DROP TABLE _sync_status")
    conn.commit()
    conn.close()
    config = ts.Configuration.local(
        MODELS, path=db_path, schema_version=2, migration_callback=lambda m, v: None
    )
    with ts.Database(config) as db:
        a = db.find(Task, pk)
        assert a is not None
        assert db.sync_status(a).version == 1
        with db.write():
            a.summary = "b"
        assert db.sync_status(a).version == 2
