"""Local migrations (docs/migrations.md): ``schema_version`` + ``migration_callback``.

Every kind of local change with and without a migration, the semantics of ``old_db`` and
``new_db``, the errors, and atomicity: an exception in the callback or a ``kill -9`` of a
real child process in the middle of a migration leaves the file exactly as it was. Real
SQLite files throughout.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.store.database import LocalDatabase
from tidesync.testing import ServerProcess

from .flex_helpers import FAST, T

# -- releases of one app ------------------------------------------------------------------


def release1() -> tuple[type[ts.Model], type[ts.Model]]:
    """Version 1: ``Person`` with ``name`` and ``age``, and a ``Legacy`` model."""

    class Person(ts.Model):
        id: str = ts.primary_key()
        name: str
        age: int = ts.field(default=0, indexed=True)
        nick: str | None = None

    class Legacy(ts.Model):
        id: int = ts.primary_key()
        blob: str = ""

    return Person, Legacy


def open_local(
    models: list[type[ts.Model]],
    path: Path,
    version: int = 0,
    fn: Callable[[ts.Migration, int], Any] | None = None,
) -> ts.Database:
    return ts.Database(
        ts.Configuration.local(models, path=path, schema_version=version, migration_callback=fn)
    )


def seed(path: Path, n: int = 3) -> None:
    Person, Legacy = release1()
    with open_local([Person, Legacy], path) as db, db.write():
        for i in range(n):
            db.add(Person(id=f"p{i}", name=f"Ann Lee {i}", age=20 + i, nick=f"a{i}"))
        db.add(Legacy(id=1, blob="old"))


def dump(path: Path) -> str:
    """The file's whole content as SQL (read-only: the file is not changed)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def columns(path: Path, model: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[1] for r in conn.execute(f'PRAGMA table_info("t_{model}")')]
    finally:
        conn.close()


def changelog_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM _changelog").fetchone()[0])
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


# -- without a migration (the same schema_version) --------------------------------------------


def test_same_version_allows_additive_changes_only(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)

    class Person(ts.Model):  # a new optional field, a collection, a counter: fine
        id: str = ts.primary_key()
        name: str
        age: int = ts.field(default=0, indexed=True)
        nick: str | None = None
        email: str | None = None
        tags: list[str]
        hits: ts.Counter

    class Extra(ts.Model):  # a new model: fine; Legacy left out: kept in the file
        id: int = ts.primary_key()

    with open_local([Person, Extra], path) as db:
        p = db.find(Person, "p0")
        assert p is not None and (p.email, list(p.tags), p.hits.value) == (None, [], 0)
    assert "t_Legacy" in tables(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("add_required", "new field 'email' (str) must be optional"),
        ("remove_required", "field 'name' (str) is in the file but not in the model"),
        ("rename", "new field 'full_name' (str) must be optional"),
        ("retype", "field 'age' changed type from int to str"),
    ],
)
def test_same_version_refuses_other_changes(tmp_path: Path, change: str, message: str) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    before = dump(path)
    fields: dict[str, Any] = {"id": str, "name": str, "age": int}
    if change == "add_required":
        fields["email"] = str
    elif change == "remove_required":
        del fields["name"]
    elif change == "rename":
        del fields["name"]
        fields["full_name"] = str
    else:
        fields["age"] = str
    Person = type("Person", (ts.Model,), {"__annotations__": fields, "id": ts.primary_key()})
    with pytest.raises(ts.SchemaMismatchError) as info:
        open_local([Person], path)
    assert message in str(info.value)
    assert "higher schema_version" in str(info.value)  # says how to change existing data
    assert dump(path) == before


# -- with a migration --------------------------------------------------------------------------


def test_rename_and_a_new_required_field_set_in_the_callback(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    logged_before = changelog_rows(path)
    calls: list[int] = []

    class Person(ts.Model):
        id: str = ts.primary_key()
        full_name: str
        initials: str
        age: int = ts.field(default=0, indexed=True)
        nick: str | None = None

    def migrate(migration: ts.Migration, old_version: int) -> None:
        calls.append(old_version)
        assert (migration.old_schema_version, migration.new_schema_version) == (0, 2)
        migration.rename_field("Person", "name", "full_name")
        for old in migration.old_db.all("Person"):
            new = migration.new_db.find(Person, old["id"])
            assert new is not None and new.full_name == old["name"]
            new.initials = "".join(w[0] for w in old["name"].split()[:2])

    with open_local([Person], path, 2, migrate) as db:
        assert calls == [0]
        assert db.schema_version == 2
        assert [(p.id, p.full_name, p.initials, p.age) for p in db.all(Person)] == [
            (f"p{i}", f"Ann Lee {i}", "AL", 20 + i) for i in range(3)
        ]
        assert len(db.query(Person, "full_name ENDSWITH '1'")) == 1
        with db.write():  # normal writes go on, and are logged
            db.find(Person, "p0").full_name = "Ann B."  # type: ignore[union-attr]
            db.add(Person(id="new", full_name="New One", initials="NO"))
    assert "name" not in columns(path, "Person")
    # the migration wrote no changeset; the write after it wrote one
    assert changelog_rows(path) == logged_before + 1
    with open_local([Person], path, 2, migrate) as db:  # once: not again at the same version
        assert calls == [0]
        assert db.find(Person, "p0").full_name == "Ann B."  # type: ignore[union-attr]


def test_a_required_field_left_unset_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    before = dump(path)

    class Person(ts.Model):
        id: str = ts.primary_key()
        name: str
        age: int = ts.field(default=0, indexed=True)
        nick: str | None = None
        email: str

    def migrate(migration: ts.Migration, old_version: int) -> None:
        migration.new_db.find(Person, "p0").email = "p0@example.com"  # type: ignore[union-attr]

    for fn in (None, migrate):
        with pytest.raises(ts.MigrationError) as info:
            open_local([Person], path, 1, fn)
        text = str(info.value)
        assert "Person.email" in text and "required" in text
        assert ("3 object(s)" if fn is None else "2 object(s)") in text
        assert dump(path) == before


def test_new_required_field_with_a_default_needs_no_callback(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    made = iter(range(100))

    class Person(ts.Model):
        id: str = ts.primary_key()
        name: str
        age: int = ts.field(default=0, indexed=True)
        level: int = 7
        serial: int = ts.field(default_factory=lambda: next(made))

    with open_local([Person], path, 1) as db:
        assert [(p.level, p.serial) for p in db.all(Person)] == [(7, 0), (7, 1), (7, 2)]
    assert "nick" not in columns(path, "Person")  # a removed optional field is gone


def test_remove_and_retype_fields(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)

    class Person(ts.Model):  # name removed, age: int -> str, nick: str|None -> str
        id: str = ts.primary_key()
        age: str = ts.field(indexed=True)
        nick: str

    def migrate(migration: ts.Migration, old_version: int) -> None:
        for old in migration.old_db.all("Person"):
            new = migration.new_db.find(Person, old["id"])
            assert new is not None and new.nick == old["nick"]  # copied: values fit
            new.age = f"{old['age']} years"

    with open_local([Person], path, 3, migrate) as db:
        assert [(p.id, p.age, p.nick) for p in db.all(Person)] == [
            (f"p{i}", f"{20 + i} years", f"a{i}") for i in range(3)
        ]
        assert len(db.query(Person, "age == '21 years'")) == 1  # the index on age is rebuilt
    assert columns(path, "Person")[:3] == ["id", "age", "nick"]
    conn = sqlite3.connect(path)
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    conn.close()
    assert "i_Person_age" in indexes


def test_retype_without_values_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)

    class Person(ts.Model):
        id: str = ts.primary_key()
        name: str
        age: str

    with pytest.raises(ts.MigrationError, match=r"Person\.age \(str\) is required"):
        open_local([Person], path, 1)


def test_add_and_delete_models(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    Person, _ = release1()

    class Group(ts.Model):
        id: str = ts.primary_key()
        members: list[Person]  # type: ignore[valid-type]

    def migrate(migration: ts.Migration, old_version: int) -> None:
        assert migration.old_db.count("Legacy") == 1
        migration.delete_model("Legacy")
        assert [r["blob"] for r in migration.old_db.all("Legacy")] == ["old"]  # still readable
        db = migration.new_db
        db.add(Group(id="all", members=list(db.all(Person))))

    with open_local([Person, Group], path, 1, migrate) as db:
        group = db.find(Group, "all")
        assert group is not None and [p.id for p in group.members] == ["p0", "p1", "p2"]
    assert "t_Legacy" not in tables(path)
    conn = sqlite3.connect(path)
    stored = {r[0] for r in conn.execute("SELECT model FROM _schema")}
    conn.close()
    assert stored == {"Person", "Group"}


def test_a_model_left_out_without_delete_model_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    Person, Legacy = release1()
    with open_local([Person], path, 1):
        pass
    assert "t_Legacy" in tables(path)
    with open_local([Person, Legacy], path, 1) as db:
        assert [obj.blob for obj in db.all(Legacy)] == ["old"]


def test_versions_one_after_another(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    seen: list[tuple[int, int]] = []

    def migrate(migration: ts.Migration, old_version: int) -> None:
        seen.append((old_version, migration.new_schema_version))

    Person, Legacy = release1()
    with open_local([Person, Legacy], path, 1, migrate) as db:  # same schema, new version
        assert db.schema_version == 1 and len(db.all(Person)) == 3
    with open_local([Person, Legacy], path, 4, migrate):
        pass
    assert seen == [(0, 1), (1, 4)]


# -- old_db and new_db ------------------------------------------------------------------------


def test_old_db_is_the_file_as_it_was_and_read_only(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    Person, Legacy = release1()
    checked: list[str] = []

    def migrate(migration: ts.Migration, old_version: int) -> None:
        old, new = migration.old_db, migration.new_db
        assert set(old.models) == {"Person", "Legacy"}
        rec = old.find("Person", "p1")
        assert rec is not None and dict(rec) == {
            "id": "p1",
            "name": "Ann Lee 1",
            "age": 21,
            "nick": "a1",
        }
        with pytest.raises(TypeError):
            rec["name"] = "x"  # type: ignore[index]
        # new_db: model objects, writable at once (the migration is one write transaction)
        p1 = new.find(Person, "p1")
        assert isinstance(p1, Person)
        p1.name = "changed"
        new.delete(new.find(Person, "p2"))
        new.add(Person(id="p9", name="added"))
        with pytest.raises(ts.NestedWriteError):
            with new.write():
                pass
        # old_db does not see the migration's writes
        assert old.find("Person", "p1")["name"] == "Ann Lee 1"  # type: ignore[index]
        assert [r["id"] for r in old.all("Person")] == ["p0", "p1", "p2"]
        assert old.find("Person", "p9") is None
        # Person's schema did not change (no rebuild): enumerate_objects reads old_db
        pairs = [(o["id"], n.name) for o, n in migration.enumerate_objects("Person")]
        assert pairs == [("p0", "Ann Lee 0"), ("p1", "changed")]
        with pytest.raises(ts.MigrationError, match="no model 'Nope'"):
            old.count("Nope")
        checked.append("ok")

    with open_local([Person, Legacy], path, 1, migrate) as db:
        assert checked == ["ok"]
        assert [(p.id, p.name) for p in db.all(Person)] == [
            ("p0", "Ann Lee 0"),
            ("p1", "changed"),
            ("p9", "added"),
        ]


def test_migration_methods_after_the_callback_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    Person, _ = release1()
    kept: list[ts.Migration] = []
    with open_local([Person], path, 1, lambda m, v: kept.append(m)):
        pass
    with pytest.raises(ts.MigrationError, match="the migration is over"):
        kept[0].delete_model("Legacy")


# -- errors -----------------------------------------------------------------------------------


def test_a_lower_schema_version_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    Person, Legacy = release1()
    with open_local([Person, Legacy], path, 3):
        pass
    before = dump(path)
    for version in (0, 2):
        with pytest.raises(ts.SchemaVersionError) as info:
            open_local([Person, Legacy], path, version)
        assert "schema version 3" in str(info.value)
        assert f"schema_version {version}" in str(info.value)
    assert isinstance(info.value, ts.SchemaMismatchError)
    assert dump(path) == before


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (("rename_field", "Person", "nope", "full_name"), "has no field 'nope'"),
        (("rename_field", "Person", "name", "nope"), "model Person has no field 'nope'"),
        (("rename_field", "Person", "age", "full_name"), "a rename keeps the type"),
        (("rename_field", "Person", "nick", "full_name"), "Person.nick is still a field"),
        (("rename_field", "Nope", "name", "full_name"), "Nope must be a model of both"),
        (("delete_model", "Person"), "Person is among the configured models"),
        (("delete_model", "Nope"), "the file has no model Nope"),
    ],
)
def test_bad_migration_calls(tmp_path: Path, call: tuple[str, ...], message: str) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    before = dump(path)

    class Person(ts.Model):
        id: str = ts.primary_key()
        full_name: str
        nick: str | None = None

    def migrate(migration: ts.Migration, old_version: int) -> None:
        getattr(migration, call[0])(*call[1:])

    with pytest.raises(ts.MigrationError, match=message):
        open_local([Person], path, 1, migrate)
    assert dump(path) == before


def test_a_primary_key_change_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)

    class Person(ts.Model):
        id: int = ts.primary_key()
        name: str

    with pytest.raises(ts.SchemaMismatchError, match="cannot change a primary key"):
        open_local([Person], path, 1)


def test_configuration_errors() -> None:
    Person, _ = release1()
    for bad in (-1, True, "2", 1.5):
        with pytest.raises(ts.ConfigurationError, match="schema_version must be"):
            ts.Configuration.local([Person], path="x", schema_version=bad)  # type: ignore[arg-type]
    with pytest.raises(ts.ConfigurationError, match="must be callable"):
        ts.Configuration.local([Person], path="x", schema_version=1, migration_callback=3)  # type: ignore[arg-type]
    user = ts.User.__new__(ts.User)  # the checks run before the user is looked at
    with pytest.raises(ts.ConfigurationError, match="migration_callback is for local"):
        ts.Configuration.flexible_sync(
            user, [Person], path="x", migration_callback=lambda m, v: None
        )
    with pytest.raises(ts.ConfigurationError, match="not supported yet"):
        ts.Configuration.flexible_sync(user, [Person], path="x", schema_version=2)


def test_a_synced_file_is_not_migrated(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    conn = sqlite3.connect(path)  # the cursor the sync client keeps in a synced file
    conn.execute("INSERT INTO _meta(key, value) VALUES ('download_cursor', 12)")
    conn.commit()
    conn.close()
    before = dump(path)
    Person, Legacy = release1()
    with pytest.raises(ts.MigrationError, match="is a synced database"):
        open_local([Person, Legacy], path, 1)
    assert dump(path) == before
    with open_local([Person, Legacy], path) as db:  # version 0 still opens it
        assert len(db.all(Person)) == 3


def test_the_sync_client_engine_and_plain_local_databases_do_not_check(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path)
    Person, Legacy = release1()
    with open_local([Person, Legacy], path, 5):
        pass
    with LocalDatabase(path, [Person, Legacy]) as db:  # no schema_version: not looked at
        assert db.schema_version == 5 and len(db.all(Person)) == 3


# -- atomicity --------------------------------------------------------------------------------


def test_an_exception_in_the_callback_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path, 500)
    before, before_bytes = dump(path), digest(path)

    class Person(ts.Model):
        id: str = ts.primary_key()
        full_name: str
        initials: str
        age: int = 0

    def migrate(migration: ts.Migration, old_version: int) -> None:
        migration.rename_field("Person", "name", "full_name")
        migration.delete_model("Legacy")
        for i, old in enumerate(migration.old_db.all("Person")):
            migration.new_db.find(Person, old["id"]).initials = "X"  # type: ignore[union-attr]
            if i == 250:
                raise RuntimeError("the app's migration failed")

    with pytest.raises(RuntimeError, match="the app's migration failed"):
        open_local([Person], path, 2, migrate)
    assert digest(path) == before_bytes
    assert dump(path) == before
    Person1, Legacy1 = release1()
    with open_local([Person1, Legacy1], path) as db:
        assert db.schema_version == 0 and len(db.all(Person1)) == 500


CHILD = """
import sys, time
from pathlib import Path
import tidesync as ts

path, marker = Path(sys.argv[1]), Path(sys.argv[2])

class Person(ts.Model):
    id: str = ts.primary_key()
    full_name: str
    initials: str
    age: int = 0

def migrate(migration, old_version):
    migration.rename_field("Person", "name", "full_name")
    migration.delete_model("Legacy")
    for i, old in enumerate(migration.old_db.all("Person")):
        migration.new_db.find(Person, old["id"]).initials = "X"
        if i == 15000:
            marker.write_text("inside")
            time.sleep(120)

ts.Database(ts.Configuration.local([Person], path=path, schema_version=2,
                                   migration_callback=migrate))
"""


def test_kill_9_in_the_middle_of_a_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path, 20_000)
    before, before_bytes = dump(path), digest(path)
    marker = tmp_path / "marker"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(Path(ts.__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the child ended before the migration's middle"
            assert time.monotonic() < deadline, "the child never reached the migration"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert digest(path) == before_bytes  # nothing of the migration reached the file
    assert dump(path) == before  # nor shows through the WAL it left

    class Person(ts.Model):
        id: str = ts.primary_key()
        full_name: str
        initials: str
        age: int = 0

    def migrate(migration: ts.Migration, old_version: int) -> None:
        migration.rename_field("Person", "name", "full_name")
        for old in migration.old_db.all("Person"):
            migration.new_db.find(Person, old["id"]).initials = old["name"][:1]  # type: ignore[union-attr]

    with open_local([Person], path, 2, migrate) as db:  # the next start migrates it
        assert len(db.all(Person)) == 20_000
        p = db.find(Person, "p7")
        assert p is not None and (p.full_name, p.initials) == ("Ann Lee 7", "A")


# -- writes inside the callback ------------------------------------------------------------


def test_enumerate_objects_and_writes_of_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path, 5)

    class Person(ts.Model):
        id: str = ts.primary_key()
        full_name: str
        initials: str
        age: int = ts.field(default=0, indexed=True)
        tags: list[str]
        hits: ts.Counter

    def migrate(migration: ts.Migration, old_version: int) -> None:
        migration.rename_field("Person", "name", "full_name")
        new_db = migration.new_db
        new_db.delete(new_db.find(Person, "p4"))
        pairs = list(migration.enumerate_objects("Person"))
        assert [old["id"] for old, _ in pairs] == ["p0", "p1", "p2", "p3"]  # p4 is gone
        for old, new in pairs:
            new.initials = old["name"][:1]
            new.tags.append("migrated")  # a collection op (the merge) after a plain set
            new.hits.increment(2)
            new.full_name = new.full_name.upper()  # and a plain set after it
        with pytest.raises(ts.ValueTypeError, match=r"Person\.initials"):
            pairs[0][1].initials = 5
        with pytest.raises(ts.MigrationError, match="not among the configured models"):
            next(migration.enumerate_objects("Legacy"))

    with open_local([Person], path, 1, migrate) as db:
        got = [(p.id, p.full_name, p.initials, list(p.tags), p.hits.value) for p in db.all(Person)]
        assert got == [(f"p{i}", f"ANN LEE {i}", "A", ["migrated"], 2) for i in range(4)]
        with db.write():  # later writes merge as usual
            p0 = db.find(Person, "p0")
            assert p0 is not None
            p0.tags.append("later")
            p0.hits.increment()
        assert (list(p0.tags), p0.hits.value) == (["migrated", "later"], 3)
    conn = sqlite3.connect(path)
    states = conn.execute('SELECT COUNT(*) FROM "t_Person" WHERE "_state" IS NULL').fetchone()[0]
    conn.close()
    assert states == 3  # the migration's states restarted; p0 was written since


def test_an_object_deleted_in_the_callback_cannot_be_set(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path, 2)

    class Person(ts.Model):
        id: str = ts.primary_key()
        name: str
        level: int = 0

    def migrate(migration: ts.Migration, old_version: int) -> None:
        p1 = migration.new_db.find(Person, "p1")
        assert p1 is not None
        migration.new_db.delete(p1)
        with pytest.raises(ts.ObjectDeletedError, match="p1"):
            p1.level = 3

    with open_local([Person], path, 1, migrate) as db:
        assert [p.id for p in db.all(Person)] == ["p0"]


# -- synced files (a real server) -------------------------------------------------------------


async def test_synced_files_are_not_migrated_locally(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    app = ts.App(
        ts.AppConfiguration(
            "notes", base_url=server.url, base_path=tmp_path / "device", sync_timeouts=FAST
        )
    )
    try:
        user = await app.log_in(ts.Credentials.anonymous())
        Person, Legacy = release1()
        synced = tmp_path / "synced.tidesync"
        config = ts.Configuration.flexible_sync(user, [Person, Legacy], path=synced)
        with await ts.Database.open(config) as db:
            with db.subscriptions.update() as subs:
                subs.add(db.all(Person), name="people")
            await db.subscriptions.wait_for_synchronization(T(20))
            with db.write():
                db.add(Person(id="s1", name="Sam"))
            await db.sync_session.wait_for_upload(T(20))
        before = dump(synced)
        with pytest.raises(ts.MigrationError, match="is a synced database"):
            open_local([Person, Legacy], synced, 1)
        assert dump(synced) == before

        migrated = tmp_path / "local.tidesync"  # and a file migrated locally is not synced
        seed(migrated)
        with open_local([Person, Legacy], migrated, 1):
            pass
        with pytest.raises(ts.SchemaVersionError, match="migrated locally to schema version 1"):
            ts.Database(ts.Configuration.flexible_sync(user, [Person, Legacy], path=migrated))
    finally:
        app.close()
        server.kill()


def test_two_opens_at_once_migrate_once(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    seed(path, 200)
    calls: list[int] = []

    class Person(ts.Model):
        id: str = ts.primary_key()
        full_name: str
        age: int = ts.field(default=0, indexed=True)

    def migrate(migration: ts.Migration, old_version: int) -> None:
        calls.append(old_version)
        migration.rename_field("Person", "name", "full_name")
        time.sleep(0.3)  # the other open waits for the file meanwhile

    results: list[Any] = []

    def open_one() -> None:
        try:
            with open_local([Person], path, 1, migrate) as db:
                results.append(len(db.query(Person, "full_name BEGINSWITH 'Ann'")))
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert results == [200, 200]
    assert calls == [0]


def test_a_new_file_starts_at_the_configured_version(tmp_path: Path) -> None:
    path = tmp_path / "app.tidesync"
    Person, Legacy = release1()
    calls: list[int] = []
    for _ in range(2):
        with open_local([Person, Legacy], path, 3, lambda m, v: calls.append(v)) as db:
            assert db.schema_version == 3
    assert calls == []  # nothing to migrate, then the same version
    assert changelog_rows(path) == 0
