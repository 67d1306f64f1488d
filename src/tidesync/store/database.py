"""``LocalDatabase``: the local, offline database of one file: writes, reads, queries.

Everything here works without a network. Writes happen in ``with db.write():`` blocks, each
one SQLite transaction that also records its changeset in the change log; reads always see
the latest committed state (and, inside a write, the write's own changes).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..core import query as q
from ..core.changeset import Instruction, Op
from ..core.packing import pack_instruction
from ..core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..core.validate import validate_value
from ..errors import (
    DatabaseClosedError,
    FutureTimestampError,
    NestedWriteError,
    ObjectDeletedError,
    SchemaError,
    ValueTypeError,
    WriteOutsideTransactionError,
)
from ..protocol.messages import DEFAULT_MAX_OBJECT_BYTES
from ..support.diskfull import disk_full_error
from . import sqlvalues as sv
from .collections import ManagedDict, ManagedList, ManagedSet
from .engine import StoreEngine
from .migration import MigrationCallback, file_schema_version, open_versioned
from .model import Counter, Model, iter_models
from .notify import Notifier
from .objsize import check_object_sizes
from .results import Results

M = TypeVar("M", bound=Model)

#: Python types whose values ``add`` stores as they are, per scalar kind (no conversion).
_FAST_TYPES: dict[Kind, set[type]] = {
    Kind.STR: {str},
    Kind.INT: {int},
    Kind.FLOAT: {float},
    Kind.BOOL: {bool},
    Kind.BYTES: {bytes},
}


class LocalDatabase:
    """A local database file holding objects of the given models."""

    def __init__(
        self,
        path: str | Path,
        models: Sequence[type[Model]],
        *,
        schema_version: int | None = None,
        migration_callback: MigrationCallback | None = None,
    ) -> None:
        """Open (or create) ``path`` for ``models``. With ``schema_version`` the file's
        schema version is checked and, if it is lower, the file is migrated first, calling
        ``migration_callback`` (``store/migration.py``, docs/migrations.md); without it the
        version is not looked at (only additive schema changes)."""
        classes = list(iter_models(models))
        if not classes:
            raise SchemaError("a database needs at least one model")
        self._classes: dict[str, type[Model]] = {m.__name__: m for m in classes}
        self._schemas: dict[str, ModelSchema] = {n: m.schema() for n, m in self._classes.items()}
        self._lock = threading.RLock()
        self._writer: int | None = None
        self._pending: list[bytes] = []
        self._local_version = 0
        self._closed = False
        self._notifier: Notifier | None = None
        self._notifier_lock = threading.Lock()
        self._add_plans: dict[str, list[tuple[str, FieldSchema, frozenset[type]]]] = {}
        #: Most bytes one transaction may write to one object (store/objsize.py).
        self.max_object_bytes = DEFAULT_MAX_OBJECT_BYTES
        #: During a migration: the models whose fields are set column by column.
        self._direct: frozenset[str] = frozenset()
        try:
            self._engine = StoreEngine(path, self._schemas, set_up=schema_version is None)
            self.path = self._engine.path
            if schema_version is not None:
                try:
                    open_versioned(
                        self._engine, self._classes, schema_version, migration_callback, self
                    )
                except BaseException:
                    self._engine.close()
                    raise
        except sqlite3.Error as exc:  # e.g. no room for the WAL index (-shm) of the file
            error = disk_full_error(exc, str(Path(path).resolve()), "opening the database")
            if error is not None:
                raise error from exc
            raise

    @property
    def schema_version(self) -> int:
        """The schema version the file records (0 when it has none)."""
        with self._lock:
            return file_schema_version(self._engine.conn)

    @contextlib.contextmanager
    def migration_writes(self, direct: frozenset[str]) -> Iterator[Callable[[], None]]:
        """For ``store/migration.py``: the calling thread writes in the transaction the
        migration holds open on this database's engine, as inside ``db.write()``, but what
        it writes goes into no changeset (a migration is not synced). Setting a field of
        an object of a model in ``direct`` (the rebuilt ones, whose merge states restart
        from their columns anyway) writes its column alone, without the merge. Yields a
        function that makes the objects re-read their values (after SQL that changed rows)."""

        def invalidate() -> None:
            self._local_version += 1

        self._writer = threading.get_ident()
        self._pending = []
        self._direct = direct
        try:
            yield invalidate
        finally:
            self._writer = None
            self._pending = []
            self._direct = frozenset()
            self._local_version += 1

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Close the database; stops its notifier thread. Idempotent."""
        if self._closed:
            return
        notifier = self._notifier
        self._notifier = None
        if notifier is not None:
            notifier.stop()
        with self._lock:
            self._closed = True
            self._engine.close()

    def __enter__(self) -> LocalDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise DatabaseClosedError(f"the database {self.path} is closed")

    @property
    def schemas(self) -> dict[str, ModelSchema]:
        """The schemas of this database's models, by name."""
        return dict(self._schemas)

    def _model_schema(self, model: type[Model] | str) -> ModelSchema:
        name = model if isinstance(model, str) else model.__name__
        schema = self._schemas.get(name)
        if schema is None:
            raise SchemaError(f"model {name} is not part of this database's configuration")
        return schema

    # --- versions (for live reads) -------------------------------------------------------

    def _version(self) -> tuple[int, int]:
        data_version = self._engine.conn.execute("PRAGMA data_version").fetchone()[0]
        return (self._local_version, int(data_version))

    # --- writes --------------------------------------------------------------------------

    @property
    def in_write(self) -> bool:
        """True inside ``with db.write():`` on the calling thread."""
        return self._writer == threading.get_ident()

    @contextlib.contextmanager
    def write(self) -> Iterator[LocalDatabase]:
        """A write transaction: committed at the end of the block, rolled back on error."""
        self._check_open()
        if self.in_write:
            raise NestedWriteError("a write is already open on this database")
        with self._lock:
            self._check_open()
            try:
                self._engine.begin()
            except sqlite3.Error as exc:
                self._raise_disk_full(exc)
                raise
            self._writer = threading.get_ident()
            self._pending = []
            try:
                yield self
            except BaseException as exc:
                self._engine.rollback()
                self._local_version += 1
                self._raise_disk_full(exc)
                raise
            else:
                try:
                    check_object_sizes(self._pending, self.max_object_bytes, self._engine.origin)
                except BaseException:
                    self._engine.rollback()
                    self._local_version += 1
                    raise
                try:
                    self._engine.commit((), exact=True, packed=self._pending)
                except sqlite3.Error as exc:  # rolled back by commit()
                    self._local_version += 1
                    self._raise_disk_full(exc)
                    raise
                self._local_version += 1
            finally:
                self._writer = None
                self._pending = []
        notifier = self._notifier
        if notifier is not None:
            notifier.poke()

    def _raise_disk_full(self, exc: BaseException) -> None:
        """Raise :class:`~tidesync.errors.DiskFullError` from ``exc`` if it is SQLite's
        answer to a full disk (see ``support/diskfull.py``); else return."""
        error = disk_full_error(exc, self.path, "db.write()")
        if error is not None:
            raise error from exc

    def _require_write(self) -> None:
        self._check_open()
        if not self.in_write:
            raise WriteOutsideTransactionError("changes must be made inside `with db.write():`")

    def _record(self, ins: Instruction) -> None:
        # kept packed: bytes are not tracked by the garbage collector (see pack_instruction)
        self._pending.append(pack_instruction(ins))
        self._local_version += 1

    def _check_value(self, fs: FieldSchema, value: Any, model: str) -> None:
        try:
            validate_value(fs, value, self._schemas)
        except ValueError as exc:
            raise ValueTypeError(f"{model}.{fs.name}: {exc}") from None

    def _to_stored(self, fs: FieldSchema, value: Any, update: bool) -> Any:
        """Turn a Python value (Counter, linked objects, managed collections) into a stored one."""
        if fs.kind is Kind.COUNTER:
            return int(value.value if isinstance(value, Counter) else value)
        snap = getattr(value, "_snapshot", None)
        if snap is not None:
            value = snap()
        if fs.kind is Kind.LINK:
            if fs.collection is Collection.NONE:
                return None if value is None else self._link_pk(fs, value, update)
            if fs.collection is Collection.DICT:
                return {
                    k: None if v is None else self._link_pk(fs, v, update) for k, v in value.items()
                }
            items = [self._link_pk(fs, v, update) for v in value]
            return items if fs.collection is Collection.LIST else set(items)
        if fs.collection is Collection.LIST:
            return list(value)
        if fs.collection is Collection.SET:
            return set(value)
        if fs.collection is Collection.DICT:
            return dict(value)
        return value

    def _link_pk(self, fs: FieldSchema, target: Any, update: bool) -> Any:
        if not isinstance(target, Model) or type(target).__name__ != fs.target:
            raise ValueTypeError(
                f"field {fs.name!r} links to {fs.target}, got {type(target).__name__}"
            )
        if target._db is None:
            self.add(target, update=update)
        elif target._db is not self:
            raise ValueTypeError(
                f"field {fs.name!r}: the linked object belongs to another database"
            )
        return target._pk

    def add(self, obj: M, update: bool = False) -> M:
        """Add an unmanaged object (and the unmanaged objects it links to); returns it managed.

        If an object with the same primary key exists: ``update=False`` raises
        :class:`DuplicatePrimaryKeyError`, ``update=True`` sets the fields that differ.
        """
        self._require_write()
        if not isinstance(obj, Model):
            raise TypeError(f"db.add takes a Model instance, got {type(obj).__name__}")
        if obj._db is not None:
            if obj._db is self:
                return obj
            raise ValueTypeError("the object belongs to another database")
        model = type(obj).__name__
        plan = self._add_plans.get(model)
        if plan is None:
            plan = self._add_plan(self._model_schema(type(obj)))
        schema = self._schemas[model]
        own = obj._values
        assert own is not None
        values: dict[str, Any] = {}
        for name, fs, fast in plan:
            value = own[name]
            if type(value) not in fast:  # anything but a plain value of the right type
                value = self._to_stored(fs, value, update)
                self._check_value(fs, value, model)
            values[name] = value
        pk = values[schema.primary_key]
        engine = self._engine
        if update and engine.load_state(model, pk)[1] == "live":
            for fs in schema.fields:
                if fs.primary_key:
                    continue
                ins = Instruction(Op.SET, model, pk, engine.tick(), fs.name, values[fs.name])
                engine.apply((ins,))
                self._record(ins)
        else:
            ins = Instruction(Op.CREATE, model, pk, engine.tick(), None, values)
            engine.create(ins)
            self._record(ins)
        obj._db = self
        obj._pk = pk
        obj._values = None
        obj._cache = None
        return obj

    def _add_plan(self, schema: ModelSchema) -> list[tuple[str, FieldSchema, frozenset[type]]]:
        """Per field: the Python types that need no conversion or check on ``add``."""
        plan = []
        for fs in schema.fields:
            fast: set[type] = set()
            if fs.collection is Collection.NONE:
                fast |= _FAST_TYPES.get(fs.kind, set())
                if fs.optional or fs.kind is Kind.LINK:
                    fast.add(type(None))
            plan.append((fs.name, fs, frozenset(fast)))
        self._add_plans[schema.name] = plan
        return plan

    def add_all(self, objs: Sequence[Model], update: bool = False) -> None:
        """Add several objects."""
        for o in objs:
            self.add(o, update=update)

    def delete(self, obj: Model) -> None:
        """Delete a managed object."""
        self._require_write()
        if obj._db is not self:
            raise ValueTypeError("db.delete takes an object managed by this database")
        model = type(obj).__name__
        _, where = self._engine.load_state(model, obj._pk)
        if where != "live":
            raise ObjectDeletedError(f"the {model} {obj._pk!r} was already deleted")
        ins = Instruction(Op.ERASE, model, obj._pk, self._engine.tick())
        self._engine.apply((ins,))
        self._record(ins)

    def delete_all(self, model: type[Model]) -> int:
        """Delete every object of a model; returns how many."""
        self._require_write()
        schema = self._model_schema(model)
        kind = schema.pk_field.kind
        rows = self._engine.conn.execute(
            f"SELECT {sv.quote(schema.primary_key)} FROM {sv.table_name(schema.name)}"
        ).fetchall()
        for (raw,) in rows:
            ins = Instruction(
                Op.ERASE, schema.name, sv.scalar_from_sql(kind, raw), self._engine.tick()
            )
            self._engine.apply((ins,))
            self._record(ins)
        return len(rows)

    def _live_obj(self, obj: Model) -> tuple[str, ModelSchema]:
        self._require_write()
        model = type(obj).__name__
        if not self._object_exists(obj):
            raise ObjectDeletedError(f"the {model} {obj._pk!r} was deleted")
        return model, self._schemas[model]

    def _set_field(self, obj: Model, name: str, value: Any) -> None:
        if self._direct and type(obj).__name__ in self._direct:
            self._set_column(obj, name, value)
            return
        model, schema = self._live_obj(obj)
        fs = schema.by_name.get(name)
        if fs is None:
            raise AttributeError(name)
        if fs.primary_key:
            raise ValueTypeError(f"{model}.{name} is the primary key and cannot change")
        stored = self._to_stored(fs, value, False)
        self._check_value(fs, stored, model)
        ins = Instruction(Op.SET, model, obj._pk, self._engine.tick(), name, stored)
        self._engine.apply((ins,))
        self._record(ins)

    def _set_column(self, obj: Model, name: str, value: Any) -> None:
        """:meth:`_set_field` during a migration, for a rebuilt model (see
        :meth:`migration_writes`): checked the same way, written to the column alone."""
        self._require_write()
        model = type(obj).__name__
        fs = self._schemas[model].by_name.get(name)
        if fs is None:
            raise AttributeError(name)
        if fs.primary_key:
            raise ValueTypeError(f"{model}.{name} is the primary key and cannot change")
        stored = self._to_stored(fs, value, False)
        self._check_value(fs, stored, model)
        if not self._engine.write_column(model, obj._pk, fs, stored):
            raise ObjectDeletedError(f"the {model} {obj._pk!r} was deleted")
        self._local_version += 1

    def _counter_add(self, obj: Model, name: str, amount: int) -> None:
        model, schema = self._live_obj(obj)
        # an amount outside 64 bits is refused here; the sum itself wraps (docs/merge.md)
        self._check_value(schema.by_name[name], amount, model)
        ins = Instruction(Op.ADD, model, obj._pk, self._engine.tick(), name, amount)
        self._engine.apply((ins,))
        self._record(ins)

    def _element_value(self, obj: Model, name: str, value: Any) -> Any:
        model, schema = self._live_obj(obj)
        fs = schema.by_name[name]
        if fs.kind is Kind.LINK:
            value = None if value is None else self._link_pk(fs, value, False)
        elem = FieldSchema(name, fs.kind, Collection.NONE, fs.optional, fs.target)
        self._check_value(elem, value, model)
        return value

    def _element_op(
        self, obj: Model, name: str, op: Op, value: Any = None, key: Any = None
    ) -> None:
        if op in (Op.SET_ADD, Op.SET_REMOVE, Op.DICT_SET):
            value = self._element_value(obj, name, value)
        model, _ = self._live_obj(obj)
        ins = Instruction(op, model, obj._pk, self._engine.tick(), name, value, key)
        self._engine.apply((ins,))
        self._record(ins)

    def _list_ids(self, obj: Model, name: str) -> list[Any]:
        state, _ = self._engine.load_state(type(obj).__name__, obj._pk)
        assert state is not None
        return state.list_ids(name)

    def _list_insert(self, obj: Model, name: str, index: int, value: Any) -> None:
        value = self._element_value(obj, name, value)
        ids = self._list_ids(obj, name)
        after = ids[index - 1] if index > 0 else None
        self._element_op_raw(obj, name, Op.LIST_INSERT, value, after)

    def _list_set(self, obj: Model, name: str, index: int, value: Any) -> None:
        value = self._element_value(obj, name, value)
        ids = self._list_ids(obj, name)
        self._element_op_raw(obj, name, Op.LIST_SET, value, ids[index])

    def _list_erase(self, obj: Model, name: str, index: int) -> None:
        self._live_obj(obj)
        ids = self._list_ids(obj, name)
        self._element_op_raw(obj, name, Op.LIST_ERASE, None, ids[index])

    def _element_op_raw(self, obj: Model, name: str, op: Op, value: Any, key: Any) -> None:
        model = type(obj).__name__
        engine = self._engine
        hlc = engine.tick()
        if key is not None and key >= hlc:  # an element op must be newer than its element
            engine.observe(key)  # adopted unless far in the future (core/hlc.py)
            hlc = engine.tick()
        if key is not None and key >= hlc:
            raise FutureTimestampError(
                f"{model} {obj._pk!r}: element {key} of list {name!r} has a timestamp "
                f"{key.wall - hlc.wall} ms in the future (written by a device whose clock "
                "was wrong); it cannot be changed, removed or inserted after until then"
            )
        ins = Instruction(op, model, obj._pk, hlc, name, value, key)
        self._engine.apply((ins,))
        self._record(ins)

    # --- reads ---------------------------------------------------------------------------

    def _decode_row(self, schema: ModelSchema, row: Sequence[Any]) -> dict[str, Any]:
        schemas = self._schemas
        return {f.name: sv.from_column(f, raw, schemas) for f, raw in zip(schema.fields, row)}

    def _managed(self, cls: type[M], pk: Any, cache: dict[str, Any] | None, version: Any) -> M:
        obj = cls.__new__(cls)
        obj._db = self
        obj._pk = pk
        obj._values = None
        obj._cache = cache
        obj._cache_version = version
        return obj

    def object_for_key(self, model: type[M], pk: Any) -> M:
        """A managed object of ``model`` for the primary key ``pk``, without reading it: its
        values are read when first used (:class:`ObjectDeletedError` then if there is no
        such object). For code that knows the object exists, such as a migration's
        ``enumerate_objects``."""
        self._check_open()
        self._model_schema(model)
        return self._managed(model, pk, None, None)

    def find(self, model: type[M], pk: Any) -> M | None:
        """The object of ``model`` with primary key ``pk``, or ``None``."""
        self._check_open()
        schema = self._model_schema(model)
        with self._lock:
            version = self._version()
            row = self._engine.conn.execute(
                self._engine.sql(schema.name, "row"),
                (sv.scalar_to_sql(schema.pk_field.kind, pk),),
            ).fetchone()
        if row is None:
            return None
        values = self._decode_row(schema, row)
        return self._managed(model, values[schema.primary_key], values, version)

    def _fetch_cache(self, obj: Model) -> dict[str, Any]:
        self._check_open()
        version = self._version()
        if obj._cache is not None and obj._cache_version == version:
            return obj._cache
        schema = self._schemas[type(obj).__name__]
        with self._lock:
            row = self._engine.conn.execute(
                self._engine.sql(schema.name, "row"),
                (sv.scalar_to_sql(schema.pk_field.kind, obj._pk),),
            ).fetchone()
        if row is None:
            obj._cache = None
            raise ObjectDeletedError(
                f"the {schema.name} {obj._pk!r} was deleted; this object is no longer valid"
            )
        obj._cache = self._decode_row(schema, row)
        obj._cache_version = version
        return obj._cache

    def _object_exists(self, obj: Model) -> bool:
        if self._closed:
            return False
        try:
            self._fetch_cache(obj)
        except ObjectDeletedError:
            return False
        return True

    def _read_raw(self, obj: Model, name: str) -> Any:
        return self._fetch_cache(obj)[name]

    def _read_field(self, obj: Model, name: str) -> Any:
        cache = self._fetch_cache(obj)
        schema = self._schemas[type(obj).__name__]
        fs = schema.by_name.get(name)
        if fs is None:
            raise AttributeError(name)
        if fs.kind is Kind.COUNTER:
            return Counter._bound(obj, name)
        if fs.collection is Collection.LIST:
            return ManagedList(obj, name)
        if fs.collection is Collection.SET:
            return ManagedSet(obj, name)
        if fs.collection is Collection.DICT:
            return ManagedDict(obj, name)
        value = cache[name]
        if fs.kind is Kind.LINK and value is not None:
            assert fs.target is not None
            return self.find(self._classes[fs.target], value)
        return value

    def _resolve_collection(self, obj: Model, name: str, raw: Any) -> Any:
        fs = self._schemas[type(obj).__name__].by_name[name]
        if fs.kind is not Kind.LINK:
            return raw
        assert fs.target is not None
        cls = self._classes[fs.target]
        if fs.collection is Collection.LIST:
            found = [self.find(cls, pk) for pk in raw]
            return [o for o in found if o is not None]
        if fs.collection is Collection.DICT:
            return {k: None if pk is None else self.find(cls, pk) for k, pk in raw.items()}
        found = [self.find(cls, pk) for pk in raw]
        return [o for o in found if o is not None]

    def all(self, model: type[M]) -> Results[M]:
        """Every object of ``model``, live, in insertion order."""
        return self.query(model, "TRUEPREDICATE")

    def query(self, model: type[M], query: str, *args: Any) -> Results[M]:
        """Objects of ``model`` matching ``query`` (tidesync's query language), live."""
        self._check_open()
        schema = self._model_schema(model)
        args = tuple(_query_arg(a) for a in args)
        parsed = q.parse(query)
        bound = q.bind(parsed, schema, self._schemas, args)
        return Results(self, model, parsed, args, bound)

    # --- notifications -------------------------------------------------------------------

    def _get_notifier(self) -> Notifier:
        self._check_open()
        with self._notifier_lock:
            if self._notifier is None:
                self._notifier = Notifier(self)
                self._notifier.start()
            return self._notifier


def _query_arg(value: Any) -> Any:
    """Query arguments: a managed object stands for its primary key (``owner == $0``)."""
    if isinstance(value, Model):
        return value._primary_key()
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_query_arg(v) for v in value)
    return value
