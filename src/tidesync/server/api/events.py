"""Change events from the storage's log: one event per object per committed changeset.

Pure code (no I/O): :func:`changeset_events` turns one :class:`~..storage.base.LogEntry`
into the :class:`ChangeEvent` of each object its instructions touch, in the order the
changeset first touches them; :meth:`ChangeEvent.to_json` gives the change feed's and the
webhooks' JSON form (docs/backend.md, "Change feed")::

    {"version": 12, "model": "Task", "pk": "t1", "op": "update",
     "fields": {"done": true, "votes": {"$inc": 2}},
     "by": {"user_id": "6f1c...", "origin": "f3a9..."}, "at": "2026-12-08T04:10:00.123Z"}

``op`` is ``erase`` when the changeset's last CREATE/ERASE of the object is an ERASE
(``fields`` is then empty), ``create`` when it holds a CREATE (an upsert of an existing key
too), else ``update``. ``fields`` holds what the changeset did to each field, folded:

- a whole value (CREATE, SET): the value in its JSON form (``core/jsonvalues.py``);
- counter ADDs: ``{"$inc": n}`` (their sum), or the new value when the changeset also
  set the whole field;
- set elements: ``{"$add": [...], "$remove": [...]}``; dictionary keys:
  ``{"$set": {key: value}, "$unset": [key, ...]}`` (applied to the whole value instead
  when the changeset also set it);
- list elements (whose positions are element ids no reader can use):
  ``{"$insert": [...], "$replace": [...], "$erase": n}``: the values inserted, the new
  values of replaced elements, how many were erased; read the object for its order.

``at`` is the wall time of the object's last instruction in the changeset (its HLC's, the
writer's clock as the server accepted it), ISO 8601 UTC with milliseconds.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

from ...core.changeset import Op
from ...core.jsonvalues import converter, scalar_to_json
from ...core.packing import pack_each, unpack, unpack_instructions
from ...core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..storage.base import LogEntry, ObjectKey, object_keys

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


class Ops(dict[str, Any]):
    """A field's fold made of operators (``{"$inc": 2}``, ...); any other fold is the
    field's whole value (no wrapper: the feed makes millions of them)."""


#: What a changeset did to a field: its whole value, or :class:`Ops`.
_Fold = Any
#: No fold yet.
_NONE = object()


@dataclass
class ChangeEvent:
    """What one changeset did to one object (see the module docstring)."""

    version: int
    model: str
    pk: Any
    key: ObjectKey
    op: str
    origin: str
    wall_ms: int
    fields: dict[str, _Fold] = field(default_factory=dict)
    #: True once a fold of :attr:`fields` is :class:`Ops` (else all are whole values).
    has_ops: bool = False

    def to_json(self, schemas: dict[str, ModelSchema], user_id: str | None) -> dict[str, Any]:
        """The event's JSON form; ``user_id`` is the writer's user (None: an admin)."""
        return EventJson(schemas).to_json(self, user_id)


#: The models' converters: the primary key's and each field's (with its schema).
_Converters = tuple[
    Callable[[Any], Any],
    dict[str, tuple[FieldSchema, Callable[[Any], Any]]],
    dict[str, Callable[[Any], Any]],
]

#: The C encoder json.dumps uses, called without its per-call set-up (None without _json).
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)


def _make_encode() -> Callable[[Any], str]:
    """A function equal to ``json.dumps(value, separators=(",", ":"))`` for the plain JSON
    values events are made of (no circular check: events are trees)."""
    if _c_make_encoder is None:  # pragma: no cover
        return functools.partial(json.dumps, separators=(",", ":"))

    def default(value: Any) -> Any:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    c_encode = _c_make_encoder(
        None, default, encode_basestring_ascii, None, ":", ",", False, False, True
    )

    def encode(value: Any) -> str:
        return "".join(c_encode(value, 0))

    return encode


#: ``json.dumps(value, separators=(",", ":"))``, faster (see :func:`_make_encode`).
encode_json = _make_encode()


class EventJson:
    """Events in JSON form under one set of schemas, with each model's converters made
    once (the change feed turns thousands of events a second)."""

    def __init__(self, schemas: dict[str, ModelSchema]) -> None:
        self.schemas = schemas
        self._models: dict[str, _Converters | None] = {}
        self._shared: dict[tuple[str, str, str | None], tuple[str, str]] = {}

    def _converters(self, model: str) -> _Converters | None:
        try:
            return self._models[model]
        except KeyError:
            pass
        schema = self.schemas.get(model)
        convs: _Converters | None = None
        if schema is not None:
            fields = {f.name: (f, converter(f, self.schemas)) for f in schema.fields}
            plain = {name: conv for name, (_, conv) in fields.items()}
            convs = (converter(schema.pk_field), fields, plain)
        self._models[model] = convs
        return convs

    def _pk_and_fields(self, ev: ChangeEvent) -> tuple[Any, dict[str, Any]]:
        convs = self._converters(ev.model)
        if convs is None:
            return ev.pk, {}
        pk_conv, by_name, plain = convs
        if not ev.has_ops:  # whole values only (creates, sets): one converter call each
            try:
                return pk_conv(ev.pk), {name: plain[name](v) for name, v in ev.fields.items()}
            except KeyError:  # a field the schemas do not know (left out below)
                pass
        fields: dict[str, Any] = {}
        for name, fold in ev.fields.items():
            found = by_name.get(name)
            if found is None:
                continue
            spec, conv = found
            if type(fold) is Ops:
                fields[name] = _fold_to_json(spec, fold, self.schemas)
            else:
                fields[name] = conv(fold)
        return pk_conv(ev.pk), fields

    def to_json(self, ev: ChangeEvent, user_id: str | None) -> dict[str, Any]:
        """The event's JSON form (a new dict: callers may change it)."""
        pk, fields = self._pk_and_fields(ev)
        return {
            "version": ev.version,
            "model": ev.model,
            "pk": pk,
            "op": ev.op,
            "fields": fields,
            "by": {"user_id": user_id, "origin": ev.origin},
            "at": iso_millis(ev.wall_ms),
        }

    def text(self, ev: ChangeEvent, user_id: str | None) -> str:
        """``json.dumps(self.to_json(ev, user_id), separators=(",", ":"))``, the parts
        every event of a model and writer shares encoded once
        (tests/test_json_fast_paths.py proves the two equal)."""
        pk, fields = self._pk_and_fields(ev)
        shared = self._shared.get((ev.model, ev.origin, user_id))
        if shared is None:
            by = {"user_id": user_id, "origin": ev.origin}
            shared = self._shared[(ev.model, ev.origin, user_id)] = (
                encode_json(ev.model),
                encode_json(by),
            )
        model, by_json = shared
        pk_json = str(pk) if type(pk) is int else encode_json(pk)
        # op and at are ASCII without quotes or backslashes: written as they are
        return (
            f'{{"version":{int(ev.version)},"model":{model},"pk":{pk_json},'
            f'"op":"{ev.op}","fields":{encode_json(fields)},"by":{by_json},'
            f'"at":"{iso_millis(ev.wall_ms)}"}}'
        )


@functools.lru_cache(maxsize=4096)
def iso_millis(wall_ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (``2026-12-08T04:10:00.123Z``)."""
    moment = _EPOCH + _dt.timedelta(milliseconds=wall_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _fold_to_json(spec: FieldSchema, fold: Ops, schemas: dict[str, ModelSchema]) -> Any:
    def one(v: Any) -> Any:
        return scalar_to_json(spec.kind, v, schemas, spec.target)

    out: dict[str, Any] = {}
    for name, item in fold.items():
        if name == "$inc":
            out[name] = scalar_to_json(Kind.INT, item)
        elif name in ("$add", "$remove", "$insert", "$replace"):
            out[name] = [one(v) for v in item]
        elif name == "$set":
            out[name] = {k: one(v) for k, v in item.items()}
        else:  # $unset: keys; $erase: a count
            out[name] = item
    return out


def _header_size(data: bytes) -> int:
    """The length of the msgpack array header ``data`` starts with (0: not an array)."""
    first = data[0] if data else 0
    if 0x90 <= first <= 0x9F:
        return 1
    return {0xDC: 3, 0xDD: 5}.get(first, 0)


_CREATE_RAW = int(Op.CREATE)


def create_events(entry: LogEntry) -> list[ChangeEvent] | None:
    """:func:`changeset_events` of an entry made only of CREATEs of distinct objects (bulk
    inserts, new objects from devices), without making its instructions; None for any
    other entry (the general path then decodes it, and names what is wrong). The one fast
    path of the change feed's decoding (tests/test_json_fast_paths.py proves it equal)."""
    data = entry.instructions
    start = _header_size(data)
    if not start or data[start : start + 2] != bytes((0x98, _CREATE_RAW)):
        return None  # not a list of 8-item instructions starting with a CREATE
    items = unpack(data)
    if type(items) is not list:
        return None
    models: list[str] = []
    pks: list[Any] = []
    for item in items:
        if type(item) is not list or len(item) != 8:
            return None
        op_raw, model, pk, wall, counter, name, value, _ = item
        if (
            op_raw != _CREATE_RAW
            or type(op_raw) is not int
            or type(model) is not str
            or not model
            or type(wall) is not int
            or type(counter) is not int
            or wall < 0
            or counter < 0
            or not (name is None or type(name) is str)
            or type(value) is not dict
        ):
            return None
        models.append(model)
        pks.append(pk)
    keys = list(zip(models, pack_each(pks), strict=True))
    if len(set(keys)) != len(keys):
        return None  # an object twice: folded by the general path
    version, origin = entry.server_version, entry.origin
    return [
        ChangeEvent(version, item[1], item[2], key, "create", origin, item[3], dict(item[6]))
        for item, key in zip(items, keys, strict=True)
    ]


def changeset_events(entry: LogEntry, schemas: dict[str, ModelSchema]) -> list[ChangeEvent]:
    """The events of one log entry, in the order its instructions first touch each object.

    Raises ``ValueError`` for instructions that do not decode (a corrupt entry)."""
    fast = create_events(entry)
    return fast if fast is not None else general_events(entry, schemas)


def general_events(entry: LogEntry, schemas: dict[str, ModelSchema]) -> list[ChangeEvent]:
    """:func:`changeset_events` of any entry (what :func:`create_events` must equal)."""
    instructions = unpack_instructions(entry.instructions, entry.origin)
    events: dict[ObjectKey, ChangeEvent] = {}
    for key, ins in zip(object_keys(instructions), instructions, strict=True):
        event = events.get(key)
        if event is None:
            event = events[key] = ChangeEvent(
                entry.server_version, ins.model, ins.pk, key, "update", entry.origin, 0
            )
        event.wall_ms = max(event.wall_ms, ins.hlc.wall)
        op = ins.op
        if op is Op.CREATE:
            event.op = "create"
            if event.fields:
                event.fields.update(ins.value or {})
            else:
                event.fields = dict(ins.value or {})
            continue
        if op is Op.ERASE:
            event.op = "erase"
            event.fields.clear()
            continue
        if event.op == "erase":  # changes after an erase in one changeset change nothing
            continue
        name = ins.field
        if name is None:
            continue
        schema = schemas.get(ins.model)
        spec = schema.by_name.get(name) if schema is not None else None
        fold = _fold(event.fields.get(name, _NONE), op, ins.value, ins.key, spec)
        event.fields[name] = fold
        if type(fold) is Ops:
            event.has_ops = True
    return list(events.values())


def _fold(old: _Fold, op: Op, value: Any, key: Any, spec: FieldSchema | None) -> _Fold:
    """``old`` (what the changeset did to the field so far: :data:`_NONE`, a whole value or
    :class:`Ops`) after one more instruction."""
    if op is Op.SET:
        return value
    whole = old is not _NONE and type(old) is not Ops
    ops = Ops(old) if type(old) is Ops else Ops()
    if op is Op.ADD:
        if whole:
            return (old or 0) + value
        ops["$inc"] = ops.get("$inc", 0) + value
        return ops
    if op in (Op.SET_ADD, Op.SET_REMOVE):
        if whole:
            elements = set(old or ())
            if op is Op.SET_ADD:
                elements.add(value)
            else:
                elements.discard(value)
            return elements
        name = "$add" if op is Op.SET_ADD else "$remove"
        ops[name] = [*ops.get(name, []), value]
        return ops
    if op in (Op.DICT_SET, Op.DICT_ERASE):
        if whole:
            mapping = dict(old or {})
            if op is Op.DICT_SET:
                mapping[key] = value
            else:
                mapping.pop(key, None)
            return mapping
        if op is Op.DICT_SET:
            ops["$set"] = {**ops.get("$set", {}), key: value}
        else:
            ops["$unset"] = [*ops.get("$unset", []), key]
        return ops
    # list element ops: positions are element ids (HLCs) no reader can use
    is_list = spec is None or spec.collection is Collection.LIST
    if not is_list:
        return ops
    if op is Op.LIST_INSERT:
        ops["$insert"] = [*ops.get("$insert", []), value]
    elif op is Op.LIST_SET:
        ops["$replace"] = [*ops.get("$replace", []), value]
    elif op is Op.LIST_ERASE:
        ops["$erase"] = ops.get("$erase", 0) + 1
    return ops
