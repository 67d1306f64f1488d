"""The notifier's patch path (re-read only the objects a commit wrote) reports exactly what
a full re-run of the query reports, and is really taken for commits made in this process."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import tidesync as ts
from tidesync.store import notify

from .conftest import Person

WAIT = 10.0


def _listen(res: ts.Results[Any], patch: bool) -> tuple[list[Any], Any]:
    got: list[Any] = []
    token = res.add_listener(lambda c: got.append((c.inserted, c.deleted, c.modified)))
    listener = token._listener
    assert isinstance(listener, notify.ResultsListener)
    if not patch:
        listener._patchable = False
    return got, listener


def test_patched_diffs_equal_full_reruns(db: ts.Database) -> None:
    rnd = random.Random(8)
    patched_calls = 0
    original = notify.ResultsListener.check_touched
    lock = threading.Lock()

    def counting(self: notify.ResultsListener, conn: Any, touched: Any) -> None:
        nonlocal patched_calls
        if self._patchable and touched.get(self._model) is not None:
            with lock:
                patched_calls += 1
        original(self, conn, touched)

    notify.ResultsListener.check_touched = counting  # type: ignore[method-assign]
    try:
        queries = [db.all(Person), db.query(Person, "age > 20")]
        pairs = [(_listen(q, True), _listen(q, False)) for q in queries]
        names = [f"p{i}" for i in range(30)]
        for step in range(120):
            with db.write():
                for _ in range(rnd.randint(1, 4)):
                    pk = rnd.choice(names)
                    obj = db.find(Person, pk)
                    roll = rnd.random()
                    if obj is None:
                        db.add(Person(id=pk, name=f"n{step}", age=rnd.randint(0, 40)))
                    elif roll < 0.4:
                        db.delete(obj)
                    elif roll < 0.7:
                        obj.age = rnd.randint(0, 40)
                    else:
                        obj.name = f"m{step}"
        deadline = time.monotonic() + WAIT
        expected = [[p.id for p in q] for q in queries]
        while time.monotonic() < deadline:
            done = all(
                [listener._pks for listener in (a[1], b[1])] == [e, e]
                for (a, b), e in zip(pairs, expected)
            )
            if done:
                break
            time.sleep(0.05)
        for ((got_a, la), (got_b, lb)), exp in zip(pairs, expected):
            assert la._pks == lb._pks == exp
            assert got_a == got_b
            assert len(got_a) > 10
        assert patched_calls > 10
    finally:
        notify.ResultsListener.check_touched = original  # type: ignore[method-assign]


def test_commits_to_other_models_skip_the_query(db: ts.Database) -> None:
    from .conftest import Task

    got: list[Any] = []
    runs = 0
    res = db.all(Person)
    token = res.add_listener(got.append)
    listener = token._listener
    assert isinstance(listener, notify.ResultsListener)
    original = listener._load

    def counting(conn: Any) -> Any:
        nonlocal runs
        runs += 1
        return original(conn)

    listener._load = counting  # type: ignore[method-assign]
    for i in range(5):
        with db.write():
            db.add(Task(summary=f"t{i}"))
    with db.write():
        db.add(Person(id="x", name="x"))
    deadline = time.monotonic() + WAIT
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(c.inserted, c.deleted) for c in got] == [([0], [])]
    assert runs == 0  # neither the Task commits nor the Person insert re-ran the query
