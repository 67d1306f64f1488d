"""Local migrations: a file's schema version, and moving its data to a new schema.

A local database file records the ``schema_version`` it was last opened with (``_meta``;
0 when it has none). :func:`open_versioned` opens a file for a configured version:

- a new file is set up and records the version;
- the same version opens as an unversioned file does: only additive changes
  (``StoreEngine.set_up``), anything else is :class:`SchemaMismatchError`;
- a lower version is :class:`SchemaVersionError`;
- a higher version migrates: in ONE SQLite write transaction, every model whose schema
  changed gets a new table (the fields whose type did not change are copied, the others
  start at the model's default or empty), then the ``migration_callback`` runs with a
  :class:`Migration` (``old_db``: the file as it was; ``new_db``: the database in the new
  schema, writable), then every required field is checked and the version recorded. An
  exception anywhere (or a crash: it is one transaction) leaves the file as it was.

A migration writes no changeset to the change log (it is not synced: a synced file is
refused, see docs/migrations.md). The objects of a migrated model restart their merge
states from their new values (``_state`` NULL, one new ``_hlc``), and their erased
states (``_dead``) are dropped: both only matter to sync.
"""

from __future__ import annotations

import json
import sqlite3
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.packing import pack
from ..core.schema import Collection, FieldSchema, Kind, ModelSchema, may_be_absent
from ..errors import MigrationError, SchemaMismatchError, SchemaVersionError
from . import sqlvalues as sv
from .engine import BUSY_TIMEOUT, StoreEngine, create_table_sql, index_sql
from .fileinfo import has_table

if TYPE_CHECKING:
    from .database import LocalDatabase
    from .model import Model

#: ``fn(migration, old_schema_version)``: what ``Configuration.local`` calls on a migration.
MigrationCallback = Callable[["Migration", int], Any]

#: The ``_meta`` key holding the file's schema version.
VERSION_KEY = "schema_version"
#: ``_meta`` keys only a synced file has (the sync client's cursors).
_SYNC_KEYS = ("download_cursor", "upload_acked")


def file_schema_version(conn: sqlite3.Connection) -> int:
    """The schema version a file records (0 for a file without one, or a new file)."""
    if not has_table(conn, "_meta"):
        return 0
    row = conn.execute("SELECT value FROM _meta WHERE key = ?", (VERSION_KEY,)).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def is_synced_file(conn: sqlite3.Connection) -> bool:
    """True when the file has sync state: a subscription set or the sync cursors."""
    if has_table(conn, "_sub_sets"):
        return True
    marks = ", ".join("?" for _ in _SYNC_KEYS)
    row = conn.execute(f"SELECT 1 FROM _meta WHERE key IN ({marks}) LIMIT 1", _SYNC_KEYS)
    return row.fetchone() is not None


def open_versioned(
    engine: StoreEngine,
    classes: Mapping[str, type[Model]],
    version: int,
    callback: MigrationCallback | None,
    new_db: LocalDatabase,
) -> None:
    """Set up ``engine`` (opened with ``set_up=False``) for schema ``version`` of the
    models ``classes``, migrating the file if it records a lower version (see the module
    docstring). ``new_db`` is the database being opened on ``engine``."""
    declared = {name: cls.schema() for name, cls in classes.items()}
    for _ in range(2):  # a second look if another process migrated the file meanwhile
        if not engine.stored_schemas():  # a new file: its version in its first transaction
            engine.set_up({VERSION_KEY: version} if version else None)
            if file_schema_version(engine.conn) == version:
                return
            continue  # another process created the file meanwhile, at another version
        current = file_schema_version(engine.conn)
        if version < current:
            raise SchemaVersionError(
                f"{engine.path} is at schema version {current}, newer than the configured "
                f"schema_version {version} (a newer release of the app migrated it); "
                "open it with schema_version >= "
                f"{current} and the models of that version"
            )
        if version == current:
            _set_up_same_version(engine, version)
            return
        engine.prepare_connection()
        engine.load_origin()  # for the clock of the migration's transaction
        if _Migrator(engine, classes, declared, version, callback, new_db).run():
            return
    raise MigrationError(f"{engine.path}: the schema version kept changing while opening")


def _set_up_same_version(engine: StoreEngine, version: int) -> None:
    try:
        engine.set_up()
    except SchemaMismatchError as exc:
        raise SchemaMismatchError(
            f"{exc} (the file is at schema version {version}: to change existing data, "
            f"open it with a higher schema_version and a migration_callback; "
            "docs/migrations.md)"
        ) from None


def _copyable(old: FieldSchema, new: FieldSchema) -> bool:
    """Whether ``old``'s column values are valid values of ``new`` (same type; a scalar
    may become optional, or required: the required check catches what is left NULL)."""
    if (old.kind, old.collection, old.target) != (new.kind, new.collection, new.target):
        return False
    return old.collection is Collection.NONE or old.optional == new.optional


def _old_table(model: str) -> str:
    return f'"_mig_old_{model}"'


def old_record(
    schemas: dict[str, ModelSchema], schema: ModelSchema, row: tuple[Any, ...]
) -> Mapping[str, Any]:
    """An object of the file as it was: a read-only mapping of its decoded columns."""
    values = {f.name: sv.from_column(f, raw, schemas) for f, raw in zip(schema.fields, row)}
    return types.MappingProxyType(values)


class OldDatabase:
    """The file as it was before the migration, read-only: ``all(model)`` and
    ``find(model, pk)`` give each object as a read-only mapping by field name (links as
    the linked object's primary key). It reads an SQLite snapshot taken when the
    migration began, so the callback's own writes never show here."""

    def __init__(self, path: str, schemas: dict[str, ModelSchema], version: int) -> None:
        uri = f"{Path(path).as_uri()}?mode=ro"
        self._conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        self._conn.execute("BEGIN")
        self._conn.execute("SELECT COUNT(*) FROM _schema").fetchone()  # the snapshot starts
        self._schemas = dict(schemas)
        #: The schema version the file had.
        self.schema_version = version

    @property
    def models(self) -> tuple[str, ...]:
        """The names of the models the file had."""
        return tuple(self._schemas)

    def schema(self, model: str) -> ModelSchema:
        """A model's schema as the file had it."""
        schema = self._schemas.get(model)
        if schema is None:
            raise MigrationError(
                f"the file had no model {model!r} (it had: {', '.join(sorted(self._schemas))})"
            )
        return schema

    def all(self, model: str) -> Iterator[Mapping[str, Any]]:
        """Every object of ``model`` as it was, in insertion order."""
        schema = self.schema(model)
        cols = ", ".join(sv.quote(f.name) for f in schema.fields)
        rows = self._conn.execute(f"SELECT {cols} FROM {sv.table_name(model)} ORDER BY rowid")
        for row in rows:
            yield self._record(schema, row)

    def find(self, model: str, pk: Any) -> Mapping[str, Any] | None:
        """The object of ``model`` with primary key ``pk`` as it was, or ``None``."""
        schema = self.schema(model)
        cols = ", ".join(sv.quote(f.name) for f in schema.fields)
        row = self._conn.execute(
            f"SELECT {cols} FROM {sv.table_name(model)} WHERE {sv.quote(schema.primary_key)} = ?",
            (sv.scalar_to_sql(schema.pk_field.kind, pk),),
        ).fetchone()
        return None if row is None else self._record(schema, row)

    def count(self, model: str) -> int:
        """How many objects of ``model`` the file had."""
        self.schema(model)
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {sv.table_name(model)}").fetchone()[0])

    def _record(self, schema: ModelSchema, row: tuple[Any, ...]) -> Mapping[str, Any]:
        return old_record(self._schemas, schema, row)

    def close(self) -> None:
        """End the snapshot and close the connection."""
        try:
            self._conn.execute("ROLLBACK")
        finally:
            self._conn.close()


class Migration:
    """What a ``migration_callback(migration, old_schema_version)`` works with.

    - ``old_db``: the file as it was (:class:`OldDatabase`, dynamic read-only records);
    - ``new_db``: the database in the new schema: normal model objects, writable without
      ``with db.write():`` (the migration is one write transaction already);
    - :meth:`rename_field`, :meth:`delete_model`, :meth:`enumerate_objects`.

    Fields whose type did not change are already copied into ``new_db`` when the callback
    runs; new and retyped fields hold the model's default (or nothing: a required field
    must get a value in the callback)."""

    def __init__(
        self,
        engine: StoreEngine,
        old_db: OldDatabase,
        new_db: LocalDatabase,
        stored: dict[str, ModelSchema],
        declared: dict[str, ModelSchema],
        new_version: int,
        classes: Mapping[str, type[Model]],
        rebuilt: frozenset[str],
    ) -> None:
        self._engine = engine
        self._classes = classes
        self._rebuilt = rebuilt
        self.old_db = old_db
        self.new_db = new_db
        self._stored = stored
        self._declared = declared
        #: The version the file had, and the version it is migrated to.
        self.old_schema_version = old_db.schema_version
        self.new_schema_version = new_version
        self._invalidate: Callable[[], None] = lambda: None
        self._active = True
        #: What the callback did so far: ``(model, old, new)`` per rename, deleted models.
        self.renamed: list[tuple[str, str, str]] = []
        self.deleted: list[str] = []

    def _check_active(self) -> None:
        if not self._active:
            raise MigrationError("the migration is over: use its methods inside the callback")

    def enumerate_objects(self, model: str) -> Iterator[tuple[Mapping[str, Any], Model]]:
        """``(old, new)`` for each object of ``model`` the file had and ``new_db`` still
        has, in insertion order: ``old`` its record in ``old_db``, ``new`` the model
        object (Realm's ``migration.enumerateObjects``)."""
        self._check_active()
        cls = self._classes.get(model)
        if cls is None:
            raise MigrationError(
                f"enumerate_objects({model!r}): {model} is not among the configured models"
            )
        if model not in self._rebuilt:
            pk = self.old_db.schema(model).primary_key
            for old in self.old_db.all(model):
                new = self.new_db.find(cls, old[pk])
                if new is not None:
                    yield old, new
            return
        # A rebuilt model: its old table is still in the transaction; one query a chunk
        # gives the old rows of the objects the new table still has.
        schema, conn = self._stored[model], self._engine.conn
        cols = ", ".join(f"o.{sv.quote(f.name)}" for f in schema.fields)
        pk_col = sv.quote(schema.primary_key)
        sql = (
            f"SELECT o.rowid, {cols} FROM {_old_table(model)} AS o WHERE o.rowid > ? AND "
            f"EXISTS (SELECT 1 FROM {sv.table_name(model)} AS n WHERE n.{pk_col} = o.{pk_col}) "
            "ORDER BY o.rowid LIMIT 1000"
        )
        last, make = -(2**63), self.new_db.object_for_key
        while True:
            self._check_active()
            rows = conn.execute(sql, (last,)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            for row in rows:
                old = old_record(self._stored, schema, row[1:])
                yield old, make(cls, old[schema.primary_key])

    def rename_field(self, model: str, old_name: str, new_name: str) -> None:
        """Give every object's ``new_name`` (a field of the new model) the value its
        ``old_name`` (a field of the file's model, not in the new one) had. Both must have
        the same type (a scalar may become optional). Call it before setting
        ``new_name`` yourself: it overwrites the field in every object the file had."""
        self._check_active()
        old, new = self._stored.get(model), self._declared.get(model)
        if old is None or new is None:
            raise MigrationError(
                f"rename_field({model!r}, ...): {model} must be a model of both the file "
                "and the configuration"
            )
        before, after = old.by_name.get(old_name), new.by_name.get(new_name)
        if before is None:
            raise MigrationError(f"rename_field: the file's {model} has no field {old_name!r}")
        if after is None:
            raise MigrationError(f"rename_field: the model {model} has no field {new_name!r}")
        if old_name in new.by_name:
            raise MigrationError(f"rename_field: {model}.{old_name} is still a field of the model")
        if new_name in old.by_name:
            raise MigrationError(f"rename_field: the file's {model} has a field {new_name!r}")
        if not _copyable(before, after):
            raise MigrationError(
                f"rename_field: {model}.{old_name} ({before.type_name()}) cannot become "
                f"{new_name} ({after.type_name()}): a rename keeps the type (set a retyped "
                "field's values in the callback instead)"
            )
        table, pk = sv.table_name(model), sv.quote(new.primary_key)
        self._engine.conn.execute(
            f"UPDATE {table} SET {sv.quote(new_name)} = o.{sv.quote(old_name)}, "
            f'"_state" = NULL, "_hlc" = COALESCE({table}."_hlc", ?) '
            f"FROM {_old_table(model)} AS o WHERE o.{pk} = {table}.{pk}",
            (pack(self._engine.tick()),),
        )
        self._engine.forget_states()
        self._invalidate()
        self.renamed.append((model, old_name, new_name))

    def delete_model(self, model: str) -> None:
        """Delete a model the file has and the configuration no longer lists: its table,
        its objects and its stored schema (``old_db`` still reads them)."""
        self._check_active()
        if model in self._declared:
            raise MigrationError(
                f"delete_model({model!r}): {model} is among the configured models; "
                "remove it from the configuration to delete it"
            )
        engine = self._engine
        if model not in engine.schemas:
            raise MigrationError(f"delete_model({model!r}): the file has no model {model}")
        linking = sorted(
            f"{s.name}.{f.name}"
            for s in engine.schemas.values()
            if s.name != model
            for f in s.fields
            if f.target == model
        )
        if linking:
            raise MigrationError(
                f"delete_model({model!r}): {', '.join(linking)} still link(s) to it"
            )
        conn = engine.conn
        conn.execute(f"DROP TABLE {sv.table_name(model)}")
        conn.execute(f"DROP TABLE IF EXISTS {_old_table(model)}")
        conn.execute("DELETE FROM _schema WHERE model = ?", (model,))
        conn.execute("DELETE FROM _dead WHERE model = ?", (model,))
        remaining = {n: s for n, s in engine.schemas.items() if n != model}
        engine.adopt_schemas(remaining)
        self._invalidate()
        self.deleted.append(model)


class _Migrator:
    """One migration of one file: :meth:`run` (see the module docstring)."""

    def __init__(
        self,
        engine: StoreEngine,
        classes: Mapping[str, type[Model]],
        declared: dict[str, ModelSchema],
        version: int,
        callback: MigrationCallback | None,
        new_db: LocalDatabase,
    ) -> None:
        self.engine = engine
        self.classes = classes
        self.declared = declared
        self.version = version
        self.callback = callback
        self.new_db = new_db

    def run(self) -> bool:
        """Migrate; False (nothing done) if the file is no longer at a lower version
        (another process migrated it first)."""
        engine = self.engine
        engine.begin()
        old_db: OldDatabase | None = None
        try:
            stored = engine.stored_schemas()
            current = file_schema_version(engine.conn)
            if current >= self.version:
                engine.rollback()
                return False
            if is_synced_file(engine.conn):
                raise MigrationError(
                    f"{engine.path} is a synced database (it has sync state): a local "
                    "migration cannot change it, or its unsynced changes and the server's "
                    "data would no longer fit its schema (docs/migrations.md)"
                )
            old_db = OldDatabase(engine.path, stored, current)
            changed = self._change_tables(stored)
            direct = frozenset(changed)  # their fields are set column by column
            migration = Migration(
                engine,
                old_db,
                self.new_db,
                stored,
                self.declared,
                self.version,
                self.classes,
                direct,
            )
            if self.callback is not None:
                with self.new_db.migration_writes(direct) as invalidate:
                    migration._invalidate = invalidate
                    try:
                        self.callback(migration, current)
                    finally:
                        migration._active = False
            migration._active = False
            changed = [n for n in changed if n in engine.schemas]
            self._check_required(changed)
            restart = pack(engine.tick())
            for name in changed:
                engine.conn.execute(f"DROP TABLE IF EXISTS {_old_table(name)}")
                engine.conn.execute(  # merge states restart from the final values
                    f'UPDATE {sv.table_name(name)} SET "_state" = NULL, '
                    '"_hlc" = COALESCE("_hlc", ?) WHERE "_state" IS NOT NULL',
                    (restart,),
                )
            engine.set_meta(VERSION_KEY, self.version)
            engine.commit(())
        except BaseException:
            engine.rollback()
            raise
        finally:
            if old_db is not None:
                old_db.close()
        return True

    def _change_tables(self, stored: dict[str, ModelSchema]) -> list[str]:
        """Bring the tables to the declared schemas (inside the transaction); returns the
        models whose tables were rebuilt."""
        engine, declared, conn = self.engine, self.declared, self.engine.conn
        everything = {**stored, **declared}
        for name, schema in declared.items():
            old = stored.get(name)
            if old is not None and old.primary_key != schema.primary_key:
                raise SchemaMismatchError(
                    f"model {name}: primary key changed from {old.primary_key!r} to "
                    f"{schema.primary_key!r}; a migration cannot change a primary key"
                )
            if old is not None and not _copyable(old.pk_field, schema.pk_field):
                raise SchemaMismatchError(
                    f"model {name}: primary key {schema.primary_key!r} changed type from "
                    f"{old.pk_field.type_name()} to {schema.pk_field.type_name()}; a "
                    "migration cannot change a primary key"
                )
            for f in schema.fields:
                if f.target is not None and f.target not in everything:
                    raise SchemaMismatchError(
                        f"model {name}, field {f.name!r}: links to {f.target}, which is not "
                        "among the configured models"
                    )
        hlc = pack(engine.tick())
        changed: list[str] = []
        for name, schema in declared.items():
            old = stored.get(name)
            if old == schema:
                continue
            if old is None:
                conn.execute(create_table_sql(schema, everything))
            else:
                self._rebuild(old, schema, everything, hlc)
                changed.append(name)
            for f in schema.fields:
                if f.indexed and not f.primary_key:
                    conn.execute(index_sql(name, f))
            conn.execute(
                "INSERT INTO _schema(model, definition) VALUES (?, ?) "
                "ON CONFLICT(model) DO UPDATE SET definition = excluded.definition",
                (name, _definition(schema)),
            )
        if changed:
            marks = ", ".join("?" for _ in changed)
            conn.execute(f"DELETE FROM _dead WHERE model IN ({marks})", changed)
        engine.adopt_schemas(everything)
        return changed

    def _rebuild(
        self, old: ModelSchema, new: ModelSchema, everything: dict[str, ModelSchema], hlc: bytes
    ) -> None:
        """Move a model's table aside (``_mig_old_<Model>``, dropped at the end), create it
        in the new schema, copy what keeps its type and fill in the model's defaults."""
        conn, name = self.engine.conn, new.name
        table, aside = sv.table_name(name), _old_table(name)
        conn.execute(f"ALTER TABLE {table} RENAME TO {aside}")
        indexes = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
            "AND sql IS NOT NULL",
            (f"_mig_old_{name}",),
        ).fetchall()
        for (index,) in indexes:  # their names are the new table's
            conn.execute(f"DROP INDEX {sv.quote(index)}")
        conn.execute(create_table_sql(new, everything))
        kept = [f.name for f in new.fields if f.name in old.by_name]
        kept = [n for n in kept if _copyable(old.by_name[n], new.by_name[n])]
        cols = ", ".join(sv.quote(n) for n in kept)
        conn.execute(
            f'INSERT INTO {table} ({cols}, "_hlc") SELECT {cols}, ? FROM {aside} ORDER BY rowid',
            (hlc,),
        )
        info = self.classes[name].__field_info__
        for f in new.fields:
            if f.name in kept or f.collection is not Collection.NONE or f.kind is Kind.COUNTER:
                continue
            field_info = info.get(f.name)
            if field_info is None or not field_info.has_default():
                continue
            column = sv.quote(f.name)
            if field_info.default_factory is None:
                value = sv.to_column(f, field_info.default, everything)
                if value is not None:
                    conn.execute(f"UPDATE {table} SET {column} = ?", (value,))
                continue
            rowids = [r[0] for r in conn.execute(f"SELECT rowid FROM {table}")]
            conn.executemany(
                f"UPDATE {table} SET {column} = ? WHERE rowid = ?",
                [(sv.to_column(f, field_info.make_default(), everything), r) for r in rowids],
            )

    def _check_required(self, changed: list[str]) -> None:
        """Every required field of a rebuilt model has a value in every object."""
        conn = self.engine.conn
        for name in changed:
            schema = self.engine.schemas[name]
            table, pk = sv.table_name(name), sv.quote(schema.primary_key)
            for f in schema.fields:
                if f.primary_key or may_be_absent(f):
                    continue
                column = sv.quote(f.name)
                row = conn.execute(
                    f"SELECT COUNT(*), MIN({pk}) FROM {table} WHERE {column} IS NULL"
                ).fetchone()
                if row[0]:
                    first = sv.scalar_from_sql(schema.pk_field.kind, row[1])
                    raise MigrationError(
                        f"{name}.{f.name} ({f.type_name()}) is required, but {row[0]} "
                        f"object(s) have no value after the migration (e.g. primary key "
                        f"{first!r}): set it in the migration_callback through "
                        "migration.new_db, or give the field a default"
                    )


def _definition(schema: ModelSchema) -> str:
    return json.dumps(schema.to_dict())


__all__ = [
    "VERSION_KEY",
    "Migration",
    "MigrationCallback",
    "OldDatabase",
    "file_schema_version",
    "is_synced_file",
    "open_versioned",
]
