"""Random sequences of operations through the API, checked against a plain-Python model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidesync as ts

from .conftest import MODELS, Person, Task

KEYS = st.sampled_from(["a", "b", "c", "d"])
OPS = st.one_of(
    st.tuples(st.just("add"), KEYS, st.text(max_size=5), st.integers(-5, 5)),
    st.tuples(st.just("upsert"), KEYS, st.text(max_size=5), st.integers(-5, 5)),
    st.tuples(st.just("set_name"), KEYS, st.text(max_size=5)),
    st.tuples(st.just("set_age"), KEYS, st.integers(-1000, 1000)),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("tag"), KEYS, st.text(max_size=3), st.integers(0, 5)),
    st.tuples(st.just("untag"), KEYS, st.integers(0, 5)),
    st.tuples(st.just("vote"), KEYS, st.integers(-3, 3)),
    st.tuples(st.just("rollback"), KEYS),
)


def _apply(db: ts.Database, model: dict[str, dict[str, Any]], op: tuple[Any, ...]) -> None:
    kind, key = op[0], op[1]
    p = db.find(Person, key)
    t = db.find(Task, _task_id(key))
    if kind == "rollback":
        try:
            with db.write():
                db.add(Person(id=key + "-tmp", name="tmp"), update=True)
                raise KeyError("abort")
        except KeyError:
            pass
        return
    with db.write():
        if kind == "add":
            if key in model:
                try:
                    db.add(Person(id=key, name=op[2], age=op[3]))
                except ts.DuplicatePrimaryKeyError:
                    return
                raise AssertionError("duplicate add did not raise")
            db.add(Person(id=key, name=op[2], age=op[3]))
            db.add(Task(id=_task_id(key), summary=key))
            model[key] = {"name": op[2], "age": op[3], "tags": [], "votes": 0}
        elif kind == "upsert":
            db.add(Person(id=key, name=op[2], age=op[3]), update=True)
            if key not in model:
                db.add(Task(id=_task_id(key), summary=key), update=True)
                model[key] = {"tags": [], "votes": 0}
            model[key].update(name=op[2], age=op[3])
        elif key not in model:
            return
        elif kind == "set_name":
            assert p is not None
            p.name = op[2]
            model[key]["name"] = op[2]
        elif kind == "set_age":
            assert p is not None
            p.age = op[2]
            model[key]["age"] = op[2]
        elif kind == "delete":
            assert p is not None and t is not None
            db.delete(p)
            db.delete(t)
            del model[key]
        elif kind == "tag":
            assert t is not None
            tags = model[key]["tags"]
            index = min(op[3], len(tags))
            t.tags.insert(index, op[2])
            tags.insert(index, op[2])
        elif kind == "untag":
            assert t is not None
            tags = model[key]["tags"]
            if tags:
                index = op[2] % len(tags)
                del t.tags[index]
                del tags[index]
        elif kind == "vote":
            assert t is not None
            t.votes.increment(op[2])
            model[key]["votes"] += op[2]


def _task_id(key: str) -> ts.ObjectId:
    return ts.ObjectId(key.encode().ljust(12, b"_"))


def _check(db: ts.Database, model: dict[str, dict[str, Any]]) -> None:
    people = {p.id: (p.name, p.age) for p in db.all(Person)}
    assert people == {k: (v["name"], v["age"]) for k, v in model.items()}
    for key, v in model.items():
        t = db.find(Task, _task_id(key))
        assert t is not None
        assert list(t.tags) == v["tags"]
        assert t.votes.value == v["votes"]
    assert len(db.all(Task)) == len(model)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(OPS, max_size=25))
def test_random_operations_match_plain_model(tmp_path: Path, ops: list[tuple[Any, ...]]) -> None:
    path = tmp_path / f"prop-{abs(hash(tuple(map(str, ops))))}.tidesync"
    model: dict[str, dict[str, Any]] = {}
    with ts.Database(ts.Configuration.local(MODELS, path=path)) as db:
        for op in ops:
            _apply(db, model, op)
            _check(db, model)
    with ts.Database(ts.Configuration.local(MODELS, path=path)) as db:
        _check(db, model)
    path.unlink()
