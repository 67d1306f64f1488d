"""``Model``: declaring object types with annotated fields, and reading/writing their values.

A model class is turned into a :class:`~tidesync.core.schema.ModelSchema` when it is defined;
an unsupported type or a missing primary key raises :class:`SchemaError` naming the class and
field. Each field becomes a descriptor: on an *unmanaged* object (not yet added to a database)
values live in the instance; on a *managed* one, reads and writes go to its database.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import sys
import types
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Union, get_args, get_origin

from ..core.merge import wrap_int64
from ..core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..errors import SchemaError
from ..objectid import ObjectId

if TYPE_CHECKING:
    from .database import LocalDatabase

_MISSING: Any = object()

_SCALARS: dict[Any, Kind] = {
    bool: Kind.BOOL,
    int: Kind.INT,
    float: Kind.FLOAT,
    str: Kind.STR,
    bytes: Kind.BYTES,
    _dt.datetime: Kind.DATETIME,
    Decimal: Kind.DECIMAL,
    uuid.UUID: Kind.UUID,
    ObjectId: Kind.OBJECTID,
}


@dataclass
class FieldInfo:
    """Per-field options given with :func:`field` or :func:`primary_key`."""

    default: Any = _MISSING
    default_factory: Callable[[], Any] | None = None
    indexed: bool = False
    primary_key: bool = False

    def has_default(self) -> bool:
        """True when the field declares a default value or factory."""
        return self.default is not _MISSING or self.default_factory is not None

    def make_default(self) -> Any:
        """A fresh default value, or ``_MISSING``."""
        if self.default_factory is not None:
            return self.default_factory()
        return self.default


def field(
    *,
    default: Any = _MISSING,
    default_factory: Callable[[], Any] | None = None,
    indexed: bool = False,
) -> Any:
    """Declare a field's default and options.

    ``qty: int = tidesync.field(default=0, indexed=True)``
    """
    return FieldInfo(default=default, default_factory=default_factory, indexed=indexed)


def primary_key(
    *, default: Any = _MISSING, default_factory: Callable[[], Any] | None = None
) -> Any:
    """Declare the primary key.

    ``id: ObjectId = tidesync.primary_key(default_factory=ObjectId)``
    """
    return FieldInfo(
        default=default, default_factory=default_factory, indexed=True, primary_key=True
    )


class Counter:
    """An integer that merges by adding: concurrent increments on several devices all count.

    Declare a field as ``votes: tidesync.Counter``; on a managed object use
    ``obj.votes.increment(n)`` inside a write. ``int(obj.votes)`` and ``obj.votes.value`` read it.
    """

    __slots__ = ("_field", "_obj", "_value")

    def __init__(self, value: int = 0) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"a Counter holds an int, got {type(value).__name__}")
        self._value = value
        self._obj: Model | None = None
        self._field = ""

    @classmethod
    def _bound(cls, obj: Model, name: str) -> Counter:
        counter = cls.__new__(cls)
        counter._value = 0
        counter._obj = obj
        counter._field = name
        return counter

    @property
    def value(self) -> int:
        """The current value."""
        obj = self._obj
        if obj is not None:
            assert obj._db is not None
            return int(obj._db._read_raw(obj, self._field))
        return self._value

    def increment(self, amount: int = 1) -> None:
        """Add ``amount`` (may be negative); on a managed object, inside a write.

        Counters are signed 64-bit: the sum wraps around (``2**63 - 1`` plus 1 reads
        ``-2**63``); on a managed object, an ``amount`` outside that range raises
        ``ValueTypeError`` (naming the field and the amount) and nothing is written."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"a Counter is incremented by an int, got {type(amount).__name__}")
        if self._obj is not None:
            db = self._obj._db
            assert db is not None
            db._counter_add(self._obj, self._field, amount)
        else:
            self._value = wrap_int64(self._value + amount)  # as the merge reads sums

    def decrement(self, amount: int = 1) -> None:
        """Subtract ``amount``."""
        self.increment(-amount)

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Counter):
            return self.value == other.value
        if isinstance(other, int):
            return self.value == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"Counter({self.value})"


class _FieldDescriptor:
    """Reads and writes one field, on unmanaged and managed objects alike."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Model | None, owner: type[Model]) -> Any:
        if obj is None:
            return self
        return obj._read(self.name)

    def __set__(self, obj: Model, value: Any) -> None:
        obj._write(self.name, value)


def _is_model_class(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Model) and tp is not Model


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
        raise TypeError("unions other than `T | None` are not supported")
    return tp, False


def _element(tp: Any) -> tuple[Kind, bool, str | None]:
    inner, optional = _unwrap_optional(tp)
    if _is_model_class(inner):
        return Kind.LINK, optional, inner.__name__
    if inner in _SCALARS:
        return _SCALARS[inner], optional, None
    raise TypeError(f"unsupported element type {tp!r}")


def field_schema_for(name: str, tp: Any, info: FieldInfo) -> FieldSchema:
    """Turn one annotation into a :class:`FieldSchema`; ``TypeError`` if unsupported."""
    inner, optional = _unwrap_optional(tp)
    origin = get_origin(inner)
    collection = Collection.NONE
    target: str | None = None
    if inner is Counter:
        kind = Kind.COUNTER
        if optional:
            raise TypeError("a Counter cannot be optional")
    elif origin in (list, set, dict):
        if optional:
            raise TypeError("a collection cannot be optional (it is empty instead)")
        args = get_args(inner)
        if origin is dict:
            if len(args) != 2 or args[0] is not str:
                raise TypeError("dict fields must be dict[str, T]")
            elem = args[1]
            collection = Collection.DICT
        else:
            if len(args) != 1:
                raise TypeError(f"{origin.__name__} fields need one element type")
            elem = args[0]
            collection = Collection.LIST if origin is list else Collection.SET
        kind, optional, target = _element(elem)
        if collection is Collection.SET and optional:
            raise TypeError("set elements cannot be optional")
    elif _is_model_class(inner):
        kind, target, optional = Kind.LINK, inner.__name__, True
    elif inner in _SCALARS:
        kind = _SCALARS[inner]
    else:
        raise TypeError(f"unsupported type {tp!r}")
    if info.primary_key:
        if (
            optional
            or collection is not Collection.NONE
            or kind
            not in (
                Kind.INT,
                Kind.STR,
                Kind.UUID,
                Kind.OBJECTID,
            )
        ):
            raise TypeError("a primary key must be int, str, UUID or ObjectId (not optional)")
    return FieldSchema(
        name=name,
        kind=kind,
        collection=collection,
        optional=optional,
        target=target,
        indexed=info.indexed or info.primary_key,
        primary_key=info.primary_key,
    )


#: Every model class defined, by name (used to resolve links declared as strings).
_REGISTRY: dict[str, type[Model]] = {}


class Model:
    """Base class of every object type stored by tidesync.

    ::

        class Task(tidesync.Model):
            id: ObjectId = tidesync.primary_key(default_factory=ObjectId)
            summary: str
            done: bool = False
            tags: list[str]
            votes: tidesync.Counter
    """

    __schema__: ClassVar[ModelSchema]
    __field_info__: ClassVar[dict[str, FieldInfo]]
    __field_types__: ClassVar[dict[str, Any]]
    __pending__: ClassVar[bool] = False
    _init_plan_: ClassVar[list[tuple[str, FieldSchema, FieldInfo, bool]]]

    __slots__ = ("__weakref__", "_cache", "_cache_version", "_db", "_pk", "_values")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls
        infos: dict[str, FieldInfo] = {}
        raw = inspect.get_annotations(cls)
        for name in raw:
            if name.startswith("_"):
                continue
            value = cls.__dict__.get(name, _MISSING)
            if isinstance(value, FieldInfo):
                infos[name] = value
            elif value is not _MISSING:
                infos[name] = FieldInfo(default=value)
            else:
                infos[name] = FieldInfo()
        cls.__field_info__ = infos
        for name in infos:
            setattr(cls, name, _FieldDescriptor(name))
        try:
            cls._resolve_schema()
        except NameError:
            cls.__pending__ = True  # a link to a model defined later; resolved on first use

    @classmethod
    def _resolve_schema(cls) -> ModelSchema:
        module = sys.modules.get(cls.__module__)
        globalns = dict(vars(module)) if module is not None else {}
        localns: dict[str, Any] = dict(_REGISTRY)
        localns.update({"Counter": Counter, "ObjectId": ObjectId})
        localns.setdefault("typing", typing)
        for name in ("Optional", "Union", "List", "Set", "Dict", "ClassVar"):
            localns.setdefault(name, getattr(typing, name))
        hints: dict[str, Any] = {}
        for name, ann in inspect.get_annotations(cls).items():
            if name not in cls.__field_info__:
                continue
            if isinstance(ann, str):
                try:
                    ann = eval(ann, globalns, localns)  # annotations are code by definition
                except NameError:
                    raise
                except Exception as exc:
                    raise SchemaError(
                        f"model {cls.__name__}, field {name!r}: cannot read its annotation: {exc}"
                    ) from None
            hints[name] = ann
        fields: list[FieldSchema] = []
        pk: str | None = None
        for name, info in cls.__field_info__.items():
            tp = hints.get(name)
            if get_origin(tp) is ClassVar:
                continue
            try:
                fs = field_schema_for(name, tp, info)
            except TypeError as exc:
                raise SchemaError(f"model {cls.__name__}, field {name!r}: {exc}") from None
            if fs.primary_key:
                if pk is not None:
                    raise SchemaError(
                        f"model {cls.__name__}: two primary keys ({pk!r} and {name!r})"
                    )
                pk = name
            fields.append(fs)
        if pk is None:
            raise SchemaError(
                f"model {cls.__name__} has no primary key: declare one field as "
                "`id: ObjectId = tidesync.primary_key(default_factory=ObjectId)`"
            )
        cls.__field_types__ = {f.name: hints[f.name] for f in fields}
        cls.__schema__ = ModelSchema(name=cls.__name__, fields=tuple(fields), primary_key=pk)
        cls.__pending__ = False
        if "_init_plan_" in cls.__dict__:
            del cls._init_plan_
        return cls.__schema__

    @classmethod
    def schema(cls) -> ModelSchema:
        """This model's schema (resolving links declared before their target existed)."""
        if cls.__pending__:
            try:
                return cls._resolve_schema()
            except NameError as exc:
                raise SchemaError(f"model {cls.__name__}: unknown type in a field: {exc}") from None
        return cls.__schema__

    def __init__(self, **values: Any) -> None:
        cls = type(self)
        plan = cls.__dict__.get("_init_plan_")
        if plan is None:
            plan = cls._build_init_plan()
        self._db: LocalDatabase | None = None
        self._pk: Any = None
        self._cache: dict[str, Any] | None = None
        self._cache_version: Any = None
        own: dict[str, Any] = {}
        missing: list[str] = []
        found = 0
        for name, fs, info, plain in plan:
            if name in values:
                value = values[name]
                found += 1
            else:
                value = info.make_default()
                if value is _MISSING:
                    value = _implicit_default(fs)
                    if value is _MISSING:
                        missing.append(name)
                        continue
            own[name] = value if plain else _normalize_unmanaged(fs, value)
        if found != len(values):
            unknown = sorted(set(values) - {p[0] for p in plan})
            raise TypeError(f"{cls.__name__}() got unknown fields: {unknown}")
        if missing:
            raise TypeError(f"{cls.__name__}() missing required fields: {missing}")
        self._values: dict[str, Any] | None = own

    @classmethod
    def _build_init_plan(cls) -> list[tuple[str, FieldSchema, FieldInfo, bool]]:
        schema = cls.schema()
        plan = [
            (
                fs.name,
                fs,
                cls.__field_info__[fs.name],
                fs.collection is Collection.NONE and fs.kind is not Kind.COUNTER,
            )
            for fs in schema.fields
        ]
        cls._init_plan_ = plan
        return plan

    # --- value access -------------------------------------------------------------------

    @property
    def is_managed(self) -> bool:
        """True once the object was added to a database."""
        return self._db is not None

    @property
    def is_valid(self) -> bool:
        """False once a managed object was deleted (or its database closed)."""
        if self._db is None:
            return True
        return self._db._object_exists(self)

    def _read(self, name: str) -> Any:
        if self._db is None:
            assert self._values is not None
            return self._values[name]
        return self._db._read_field(self, name)

    def _write(self, name: str, value: Any) -> None:
        if self._db is None:
            schema = type(self).schema()
            fs = schema.by_name.get(name)
            if fs is None:
                raise AttributeError(name)
            assert self._values is not None
            self._values[name] = _normalize_unmanaged(fs, value)
            return
        self._db._set_field(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The object's values (links as the linked objects' primary keys)."""
        out: dict[str, Any] = {}
        for fs in type(self).schema().fields:
            value = self._read(fs.name)
            if isinstance(value, Counter):
                value = value.value
            elif isinstance(value, Model):
                value = value._primary_key()
            elif fs.kind is Kind.LINK and fs.collection is Collection.LIST:
                value = [v._primary_key() for v in value]
            elif isinstance(value, (list, set, dict)) or hasattr(value, "_snapshot"):
                value = _plain(value)
            out[fs.name] = value
        return out

    def add_listener(self, callback: Callable[[Any], Any]) -> Any:
        """Call ``callback(ObjectChange)`` after every commit that changes or deletes this
        managed object (on the database's notifier thread). Returns a token with ``cancel()``."""
        from .notify import ObjectListener

        db = self._require_managed()
        return db._get_notifier().register(ObjectListener(self, callback))

    def changes(self) -> AsyncIterator[Any]:
        """An async iterator of ``ObjectChange`` for this managed object (ends once deleted)."""
        from .notify import ChangeStream

        self._require_managed()
        return ChangeStream(self.add_listener)

    def _require_managed(self) -> LocalDatabase:
        if self._db is None:
            raise TypeError("only managed objects (added to a database) report changes")
        return self._db

    def _primary_key(self) -> Any:
        if self._db is not None:
            return self._pk
        assert self._values is not None
        return self._values[type(self).schema().primary_key]

    def __repr__(self) -> str:
        try:
            pk = self._primary_key()
        except Exception:
            pk = "?"
        state = "" if self._db is None else " managed"
        return f"<{type(self).__name__} {pk!r}{state}>"

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if isinstance(other, Model) and type(other) is type(self):
            if self._db is not None and other._db is not None:
                return self._db is other._db and self._pk == other._pk
        return False

    def __hash__(self) -> int:
        return id(self) if self._db is None else hash((type(self).__name__, self._pk))


def _plain(value: Any) -> Any:
    snap = getattr(value, "_snapshot", None)
    if snap is not None:
        return snap()
    if isinstance(value, list):
        return list(value)
    if isinstance(value, set):
        return set(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _implicit_default(fs: FieldSchema) -> Any:
    if fs.collection is Collection.LIST:
        return []
    if fs.collection is Collection.SET:
        return set()
    if fs.collection is Collection.DICT:
        return {}
    if fs.kind is Kind.COUNTER:
        return 0
    if fs.optional:
        return None
    return _MISSING


def _normalize_unmanaged(fs: FieldSchema, value: Any) -> Any:
    if fs.kind is Kind.COUNTER and fs.collection is Collection.NONE:
        if isinstance(value, Counter):
            return value if value._obj is None else Counter(value.value)
        return Counter(value)
    if fs.collection is Collection.LIST:
        return list(_plain(value))
    if fs.collection is Collection.SET:
        return set(_plain(value))
    if fs.collection is Collection.DICT:
        return dict(_plain(value))
    return value


def iter_models(models: Any) -> Iterator[type[Model]]:
    """Validate a sequence of model classes, yielding them (``SchemaError`` otherwise)."""
    for m in models:
        if not _is_model_class(m):
            raise SchemaError(f"{m!r} is not a tidesync.Model subclass")
        m.schema()
        yield m
