"""Change notifications on results and objects: callbacks and async iterators, across
databases, threads and processes on the same file."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import tidesync as ts

from .conftest import MODELS, Person, Task

WAIT = 5.0


def _next(q: queue.Queue[Any]) -> Any:
    return q.get(timeout=WAIT)


def test_results_listener_reports_positions(db: ts.Database) -> None:
    with db.write():
        a = db.add(Task(summary="a", priority=1))
        db.add(Task(summary="b", priority=2))
    got: queue.Queue[ts.ResultsChange] = queue.Queue()
    res = db.query(Task, "priority > 0")
    token = res.add_listener(got.put)
    with db.write():
        db.add(Task(summary="c", priority=3))
    change = _next(got)
    assert (change.inserted, change.deleted, change.modified) == ([2], [], [])
    with db.write():
        a.summary = "A"
    change = _next(got)
    assert (change.inserted, change.deleted, change.modified) == ([], [], [0])
    with db.write():
        db.delete(a)
    change = _next(got)
    assert (change.inserted, change.deleted, change.modified) == ([], [0], [])
    with db.write():
        db.add(Person(id="p", name="unrelated"))
    token.cancel()
    assert token.is_cancelled
    with db.write():
        db.add(Task(summary="d", priority=4))
    assert got.empty() or _drain_is_empty(got)


def _drain_is_empty(q: queue.Queue[Any]) -> bool:
    try:
        q.get(timeout=0.2)
    except queue.Empty:
        return True
    return False


def test_object_listener_reports_fields_and_delete(db: ts.Database) -> None:
    with db.write():
        t = db.add(Task(summary="a"))
    got: queue.Queue[ts.ObjectChange] = queue.Queue()
    t.add_listener(got.put)
    with db.write():
        t.summary = "b"
        t.done = True
    change = _next(got)
    assert not change.deleted and sorted(change.changed_fields) == ["done", "summary"]
    with db.write():
        t.votes.increment()
    assert _next(got).changed_fields == ["votes"]
    with db.write():
        db.delete(t)
    assert _next(got).deleted


async def test_async_iterator_on_results_and_object(db: ts.Database) -> None:
    res = db.all(Person)
    stream = res.changes()
    with db.write():
        p = db.add(Person(id="1", name="one"))
    change = await asyncio.wait_for(anext(stream), WAIT)
    assert change.inserted == [0]
    obj_stream = p.changes()
    with db.write():
        p.name = "uno"
    change = await asyncio.wait_for(anext(stream), WAIT)
    assert change.modified == [0]
    ochange = await asyncio.wait_for(anext(obj_stream), WAIT)
    assert ochange.changed_fields == ["name"]
    await stream.aclose()  # type: ignore[attr-defined]
    await obj_stream.aclose()  # type: ignore[attr-defined]


def test_writes_from_another_database_and_thread_are_reported(db_path: Path) -> None:
    config = ts.Configuration.local(MODELS, path=db_path)
    with ts.Database(config) as watcher, ts.Database(config) as writer:
        got: queue.Queue[ts.ResultsChange] = queue.Queue()
        watcher.all(Person).add_listener(got.put)
        with writer.write():
            writer.add(Person(id="x", name="X"))
        assert _next(got).inserted == [0]


def test_writes_from_another_process_are_reported(db_path: Path) -> None:
    config = ts.Configuration.local(MODELS, path=db_path)
    with ts.Database(config) as watcher:
        got: queue.Queue[ts.ResultsChange] = queue.Queue()
        watcher.all(Person).add_listener(got.put)
        script = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            import tidesync as ts
            from tests.conftest import MODELS, Person
            with ts.Database(ts.Configuration.local(MODELS, path={str(db_path)!r})) as db:
                with db.write():
                    db.add(Person(id="from-child", name="C"))
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        assert _next(got).inserted == [0]
        assert watcher.find(Person, "from-child") is not None


def test_close_stops_notifier_thread(db_path: Path) -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    db = ts.Database(ts.Configuration.local(MODELS, path=db_path))
    token = db.all(Person).add_listener(lambda c: None)
    assert any(t.name == "tidesync-notifier" for t in threading.enumerate())
    db.close()
    assert token.is_cancelled
    after = [t for t in threading.enumerate() if t.name == "tidesync-notifier"]
    assert not after or "tidesync-notifier" in before
