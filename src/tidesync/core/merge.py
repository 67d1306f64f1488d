"""The merge engine: the state of every object as a function of the *set* of instructions.

Client and server both fold changesets into objects with this module, and every replica
must end in the same state whatever the order or duplication of delivery (DESIGN.md §3,
docs/merge.md). An object's :class:`ObjectState` keeps exactly what that needs:

* ``created`` / ``erased``: the greatest CREATE and ERASE HLCs (alive iff create > erase);
* per field, either a *plain* entry ``(hlc, value)`` (a scalar, or a collection/counter
  whose whole value was last written at ``hlc`` with no later element operation), or a
  collection state (:class:`_Counter`, :class:`_List`, :class:`_Set`, :class:`_Dict`) that
  remembers the element operations newer than the field's *floor* (its latest whole write).

Anything older than an object's or field's floor can never show through again, so it is
dropped; what remains depends only on the instruction set, which makes the state (and its
:meth:`ObjectState.to_bytes`) canonical. Inputs are assumed validated
(:mod:`tidesync.core.validate`); structural nonsense still raises ``ValueError``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from typing import Any

from .changeset import Changeset, Instruction, Op
from .hlc import HLC, ZERO
from .packing import hlc_from_list, pack, pack_pair, packer, unpack
from .schema import Collection, Kind, ModelSchema
from .validate import validate_changeset

_FORMAT = 1
#: The format of the compact state of an object a lone CREATE made: ``[_LONE, created,
#: values]`` with every field's normalised value, in the schema's order (what the server
#: stores as the object's values). :meth:`ObjectState.from_bytes` reads it as the state
#: ``[_FORMAT, created, None, created, values, {}]``; :meth:`ObjectState.to_bytes` never
#: writes it.
_LONE = 2
#: How a :data:`_LONE` state begins (msgpack: an array of 3, then the format). Storage
#: keeps ``LONE_HEAD + packed created HLC`` beside the packed values, and the state is the
#: two joined (:func:`stored_state`): a new object's values are encoded and written once.
LONE_HEAD = b"\x93\x02"
# Field codes of a schema's merge plan.
_SCALAR, _COUNTER, _LIST, _SET, _DICT = range(5)

Norm = Callable[[Any], Any] | None

_WRAP_HALF = 2**63
_WRAP_MASK = 2**64 - 1


def wrap_int64(value: int) -> int:
    """``value`` wrapped around into the signed 64-bit range, as two's complement
    arithmetic does (``2**63`` becomes ``-2**63``): how a counter's sum is read
    (docs/merge.md, "Counters at the bounds"). Wrapping is a ring homomorphism from the
    ints, so adds wrap the same in any order and grouping."""
    return ((value + _WRAP_HALF) & _WRAP_MASK) - _WRAP_HALF


def _norm_float(value: Any) -> Any:
    return float(value) if type(value) is int else value


def _norm_set_float(value: Any) -> Any:
    """A set element of a float set: ``-0.0`` and ``0.0`` are one element (they are equal
    and hash alike, as in a Python set), kept as ``0.0`` so every replica holds the same
    one, whatever order the adds came in. (NaN cannot be a set element: validate.)"""
    return 0.0 if value == 0 else float(value)


def _norm_datetime(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=_dt.UTC)
        if value.tzinfo is not _dt.UTC:
            return value.astimezone(_dt.UTC)
    return value


class _Plan:
    """What the merge needs to know about a model, precomputed once per schema."""

    __slots__ = (
        "fields",
        "floats",
        "names",
        "normed",
        "order",
        "others",
        "scalars",
    )

    def __init__(self, schema: ModelSchema) -> None:
        order: list[tuple[str, int, Norm]] = []
        for f in schema.fields:
            if f.kind is Kind.COUNTER:
                code = _COUNTER
            else:
                code = {
                    Collection.NONE: _SCALAR,
                    Collection.LIST: _LIST,
                    Collection.SET: _SET,
                    Collection.DICT: _DICT,
                }[f.collection]
            norm: Norm = None
            if f.kind is Kind.FLOAT:
                norm = _norm_set_float if code == _SET else _norm_float
            elif f.kind is Kind.DATETIME:
                norm = _norm_datetime
            order.append((f.name, code, norm))
        self.order = tuple(order)
        self.scalars = tuple((n, norm) for n, code, norm in order if code == _SCALAR)
        self.others = tuple(entry for entry in order if entry[1] != _SCALAR)
        self.fields = {name: (code, norm) for name, code, norm in order}
        #: for :func:`created_rows_many`: the scalar names, those normalised as floats, and
        #: those with another normalisation
        self.names = tuple(n for n, _ in self.scalars)
        self.floats = tuple(n for n, norm in self.scalars if norm is _norm_float)
        self.normed = tuple(
            (n, norm) for n, norm in self.scalars if norm is not None and norm is not _norm_float
        )


_PLANS: dict[int, tuple[ModelSchema, _Plan]] = {}


def _plan(schema: ModelSchema) -> _Plan:
    entry = _PLANS.get(id(schema))
    if entry is not None and entry[0] is schema:
        return entry[1]
    if len(_PLANS) > 1024:
        _PLANS.clear()
    plan = _Plan(schema)
    _PLANS[id(schema)] = (schema, plan)
    return plan


def _whole(code: int, norm: Norm, value: Any) -> Any:
    """A whole-field value, copied and normalised (``None`` = the field's default)."""
    if code == _SCALAR:
        return value if norm is None else norm(value)
    if code == _COUNTER:
        return 0 if value is None else int(value)
    if code == _LIST:
        if value is None:
            return []
        return list(value) if norm is None else [norm(v) for v in value]
    if code == _SET:
        if value is None:
            return frozenset()
        return frozenset(value) if norm is None else frozenset(norm(v) for v in value)
    if value is None:
        return {}
    return dict(value) if norm is None else {k: norm(v) for k, v in value.items()}


def _uh(raw: Any) -> HLC | None:
    return None if raw is None else hlc_from_list(raw)


def _rows(raw: Any, width: int) -> list[list[Any]]:
    if not isinstance(raw, list) or any(not isinstance(r, list) or len(r) != width for r in raw):
        raise ValueError(f"malformed object state: expected rows of {width} items")
    return raw


class _Counter:
    """A counter with additions newer than its base (its latest whole value)."""

    __slots__ = ("adds", "base", "floor")

    def __init__(self, floor: HLC | None, base: int) -> None:
        self.floor = floor
        self.base = base
        self.adds: dict[HLC, int] = {}

    def clear(self, hlc: HLC) -> bool:
        """Drop what ``hlc`` supersedes, reset to 0 at ``hlc``; True if ops survive."""
        self.adds = {k: a for k, a in self.adds.items() if k > hlc}
        self.floor, self.base = hlc, 0
        return bool(self.adds)

    def load(self, hlc: HLC, value: int) -> None:
        """Set the base (a whole write at ``hlc``)."""
        self.floor, self.base = hlc, value

    def rebase(self, hlc: HLC, value: int) -> bool:
        """Apply a whole write; False (state not updated) if no later op survives."""
        if not self.clear(hlc):
            return False
        self.base = value
        return True

    def add(self, hlc: HLC, amount: int) -> bool:
        if hlc in self.adds:
            return False
        self.adds[hlc] = amount
        return True

    def render(self) -> int:
        total = self.base + sum(self.adds.values())
        if -_WRAP_HALF <= total < _WRAP_HALF:
            return total
        return wrap_int64(total)

    def encode(self) -> list[Any]:
        return [1, self.floor, self.base, [[k, self.adds[k]] for k in sorted(self.adds)]]

    @classmethod
    def decode(cls, raw: list[Any]) -> _Counter:
        if len(raw) != 4 or not isinstance(raw[2], int):
            raise ValueError("malformed counter state")
        st = cls(_uh(raw[1]), raw[2])
        for k, a in _rows(raw[3], 2):
            if not isinstance(a, int):
                raise ValueError("malformed counter addition")
            st.adds[hlc_from_list(k)] = a
        return st


class _Set:
    """Per element, the latest add/remove newer than the floor (the last whole write)."""

    __slots__ = ("entries", "floor")

    def __init__(self, floor: HLC | None) -> None:
        self.floor = floor
        self.entries: dict[Any, tuple[HLC, bool]] = {}

    def clear(self, hlc: HLC) -> bool:
        """Drop what ``hlc`` supersedes; True if later ops survive."""
        self.entries = {e: x for e, x in self.entries.items() if x[0] > hlc}
        self.floor = hlc
        return bool(self.entries)

    def load(self, hlc: HLC, items: Iterable[Any]) -> None:
        """Add a whole write's items at ``hlc`` (later ops on them win)."""
        self.floor = hlc
        for item in items:
            if item not in self.entries:
                self.entries[item] = (hlc, True)

    def rebase(self, hlc: HLC, items: Iterable[Any]) -> bool:
        """Apply a whole write; False (state not updated) if no later op survives."""
        if not self.clear(hlc):
            return False
        self.load(hlc, items)
        return True

    def put(self, hlc: HLC, elem: Any, present: bool) -> bool:
        entries = self.entries
        cur = entries.get(elem)
        if cur is not None:
            if cur[0] >= hlc:
                return False
            # equal elements may be spelled differently (Decimal("1") and Decimal("1.0")):
            # the latest op's own spelling represents the element, whatever the order
            del entries[elem]
        entries[elem] = (hlc, present)
        return True

    def render(self) -> set[Any]:
        return {e for e, (_, present) in self.entries.items() if present}

    def encode(self) -> list[Any]:
        rows = sorted(
            ((x[0], pack(e), e, x[1]) for e, x in self.entries.items()), key=lambda r: r[:2]
        )
        return [3, self.floor, [[r[2], r[0], r[3]] for r in rows]]

    @classmethod
    def decode(cls, raw: list[Any]) -> _Set:
        if len(raw) != 3:
            raise ValueError("malformed set state")
        st = cls(_uh(raw[1]))
        for e, k, present in _rows(raw[2], 3):
            st.entries[e] = (hlc_from_list(k), bool(present))
        return st


class _Dict:
    """Per key, the latest set/erase newer than the floor (the last whole write)."""

    __slots__ = ("entries", "floor")

    def __init__(self, floor: HLC | None) -> None:
        self.floor = floor
        self.entries: dict[str, tuple[HLC, bool, Any]] = {}

    def clear(self, hlc: HLC) -> bool:
        """Drop what ``hlc`` supersedes; True if later ops survive."""
        self.entries = {k: x for k, x in self.entries.items() if x[0] > hlc}
        self.floor = hlc
        return bool(self.entries)

    def load(self, hlc: HLC, items: dict[str, Any]) -> None:
        """Add a whole write's items at ``hlc`` (later ops on them win)."""
        self.floor = hlc
        for key, value in items.items():
            if key not in self.entries:
                self.entries[key] = (hlc, True, value)

    def rebase(self, hlc: HLC, items: dict[str, Any]) -> bool:
        """Apply a whole write; False (state not updated) if no later op survives."""
        if not self.clear(hlc):
            return False
        self.load(hlc, items)
        return True

    def put(self, hlc: HLC, key: str, present: bool, value: Any) -> bool:
        cur = self.entries.get(key)
        if cur is not None and cur[0] >= hlc:
            return False
        self.entries[key] = (hlc, present, value if present else None)
        return True

    def render(self) -> dict[str, Any]:
        return {k: self.entries[k][2] for k in sorted(self.entries) if self.entries[k][1]}

    def encode(self) -> list[Any]:
        rows = [[k, x[0], x[1], x[2]] for k, x in sorted(self.entries.items())]
        return [4, self.floor, rows]

    @classmethod
    def decode(cls, raw: list[Any]) -> _Dict:
        if len(raw) != 3:
            raise ValueError("malformed dict state")
        st = cls(_uh(raw[1]))
        for key, k, present, value in _rows(raw[2], 4):
            if not isinstance(key, str):
                raise ValueError("malformed dict state: key is not a string")
            st.entries[key] = (hlc_from_list(k), bool(present), value)
        return st


def _derived_ids(hlc: HLC, count: int) -> list[HLC]:
    """The element ids of a whole-list write's items: ``(wall, counter, origin#index)``."""
    wall, counter, origin = hlc
    return [HLC(wall, counter, f"{origin}#{i}") for i in range(count)]


class _List:
    """An RGA list: element records keyed by id, newer than the floor (last whole write).

    A record is ``[inserted, after, value_hlc, value, erased_hlc]``; records with
    ``inserted`` False hold LIST_SET/LIST_ERASE ops whose element has not arrived yet.
    ``tail`` is the last element of the floor's whole write: elements anchored to an
    element the floor cleared are re-anchored there (or at the head if it is None).
    """

    __slots__ = ("floor", "recs", "tail")

    def __init__(self, floor: HLC | None) -> None:
        self.floor = floor
        self.tail: HLC | None = None
        self.recs: dict[HLC, list[Any]] = {}

    def clear(self, hlc: HLC) -> bool:
        """Drop what ``hlc`` supersedes; True if later ops survive."""
        self.recs = {k: r for k, r in self.recs.items() if k > hlc}
        self.floor, self.tail = hlc, None
        return bool(self.recs)

    def rebase(self, hlc: HLC, items: list[Any]) -> bool:
        """Apply a whole write; False (state not updated) if no later op survives."""
        if not self.clear(hlc):
            return False
        self.load(hlc, items)
        return True

    def load(self, hlc: HLC, items: list[Any]) -> None:
        """Add a whole write's items as elements with derived ids, chained from the head."""
        self.floor = hlc
        prev: HLC | None = None
        for did, item in zip(_derived_ids(hlc, len(items)), items):
            rec = self.recs.get(did)
            if rec is None:
                self.recs[did] = [True, prev, hlc, item, None]
            else:
                rec[0], rec[1] = True, prev
                if rec[2] is None or rec[2] < hlc:
                    rec[2], rec[3] = hlc, item
            prev = did
        self.tail = prev

    def insert(self, hlc: HLC, after: HLC | None, value: Any) -> bool:
        rec = self.recs.get(hlc)
        if rec is None:
            self.recs[hlc] = [True, after, hlc, value, None]
            return True
        if rec[0]:
            return False
        rec[0], rec[1] = True, after
        if rec[2] is None or rec[2] < hlc:
            rec[2], rec[3] = hlc, value
        return True

    def _target(self, elem: HLC) -> list[Any] | None:
        if self.floor is not None and elem < self.floor:
            return None  # cleared by the floor's whole write: the op is void
        rec = self.recs.get(elem)
        if rec is None:
            rec = self.recs[elem] = [False, None, None, None, None]
        return rec

    def set_value(self, hlc: HLC, elem: HLC, value: Any) -> bool:
        rec = self._target(elem)
        if rec is None or (rec[2] is not None and rec[2] >= hlc):
            return False
        rec[2], rec[3] = hlc, value
        return True

    def erase(self, hlc: HLC, elem: HLC) -> bool:
        rec = self._target(elem)
        if rec is None or (rec[4] is not None and rec[4] >= hlc):
            return False
        rec[4] = hlc
        return True

    def visible(self) -> list[tuple[HLC, Any]]:
        """``(id, value)`` of the live elements in order (depth-first, newest sibling first)."""
        recs, floor, tail = self.recs, self.floor, self.tail
        children: dict[HLC | None, list[HLC]] = {}
        for k, rec in recs.items():
            if not rec[0]:
                continue
            anchor = rec[1]
            if anchor is not None and floor is not None and anchor < floor:
                anchor = tail
            children.setdefault(anchor, []).append(k)
        out: list[tuple[HLC, Any]] = []
        stack = sorted(children.get(None, ()))
        while stack:
            k = stack.pop()
            rec = recs[k]
            if rec[4] is None:
                out.append((k, rec[3]))
            kids = children.get(k)
            if kids:
                kids.sort()
                stack.extend(kids)
        return out

    def encode(self) -> list[Any]:
        rows = [[k, r[0], r[1], r[2], r[3], r[4]] for k, r in sorted(self.recs.items())]
        return [2, self.floor, self.tail, rows]

    @classmethod
    def decode(cls, raw: list[Any]) -> _List:
        if len(raw) != 4:
            raise ValueError("malformed list state")
        st = cls(_uh(raw[1]))
        st.tail = _uh(raw[2])
        for k, inserted, after, vh, value, eh in _rows(raw[3], 6):
            st.recs[hlc_from_list(k)] = [bool(inserted), _uh(after), _uh(vh), value, _uh(eh)]
        return st


_State = _Counter | _List | _Set | _Dict
_NEW: dict[int, Callable[[HLC | None], _State]] = {
    _COUNTER: lambda floor: _Counter(floor, 0),
    _LIST: _List,
    _SET: _Set,
    _DICT: _Dict,
}
_DECODE: dict[int, Callable[[list[Any]], _State]] = {
    1: _Counter.decode,
    2: _List.decode,
    3: _Set.decode,
    4: _Dict.decode,
}
_STATE_TYPES: dict[int, type[_State]] = {_COUNTER: _Counter, _LIST: _List, _SET: _Set, _DICT: _Dict}


class ObjectState:
    """Full merge state of one object."""

    __slots__ = ("_last", "created", "erased", "fields")

    def __init__(self) -> None:
        self.created: HLC | None = None
        self.erased: HLC | None = None
        self.fields: dict[str, Any] = {}
        self._last: HLC = ZERO

    @classmethod
    def empty(cls) -> ObjectState:
        """A state that has received no instruction."""
        return cls()

    @property
    def alive(self) -> bool:
        """True iff the latest CREATE is later than the latest ERASE."""
        c = self.created
        return c is not None and (self.erased is None or c > self.erased)

    @property
    def last_hlc(self) -> HLC:
        """The greatest HLC of any instruction applied (``ZERO`` if none)."""
        return self._last

    def _floor(self) -> HLC | None:
        c, e = self.created, self.erased
        if c is None:
            return e
        return c if e is None or c > e else e

    def apply(self, ins: Instruction, schema: ModelSchema) -> bool:
        """Fold one instruction in; True if the visible state (alive flag or values) may
        have changed. Applying an instruction again changes nothing."""
        hlc = ins.hlc
        if hlc > self._last:
            self._last = hlc
        c = self.created
        was_alive = c is not None and (self.erased is None or c > self.erased)
        op = ins.op
        if op is Op.CREATE:
            changed = self._create(hlc, ins.value, _plan(schema))
        elif op is Op.ERASE:
            changed = self._erase(hlc)
        else:
            floor = self._floor()
            if floor is not None and hlc <= floor:
                return False
            spec = _plan(schema).fields.get(ins.field) if ins.field is not None else None
            if spec is None:
                raise ValueError(f"model {schema.name} has no field {ins.field!r}")
            changed = self._field_op(ins, spec[0], spec[1])
        return changed and (was_alive or self.alive)

    def _create(self, hlc: HLC, values: Any, plan: _Plan) -> bool:
        if not isinstance(values, dict):
            raise ValueError("a CREATE instruction's value must be a dict")
        if self.created is not None and hlc <= self.created:
            return False  # a later create already reset every field
        self.created = hlc
        if self.erased is not None and hlc < self.erased:
            return True  # superseded by the erase: its values never show
        fields, get = self.fields, values.get
        if not fields:  # fresh object: the hot path of local inserts
            for name, norm in plan.scalars:
                v = get(name)
                fields[name] = (hlc, v if norm is None else norm(v))
            for name, code, norm in plan.others:
                fields[name] = (hlc, _whole(code, norm, get(name)))
            return True
        for name, code, norm in plan.order:
            if code == _SCALAR:
                cur = fields.get(name)
                if cur is None or cur[0] < hlc:
                    v = get(name)
                    fields[name] = (hlc, v if norm is None else norm(v))
            else:
                self._whole_set(name, code, hlc, _whole(code, norm, get(name)))
        return True

    def _erase(self, hlc: HLC) -> bool:
        if self.erased is not None and hlc <= self.erased:
            return False
        self.erased = hlc
        if self.created is not None and hlc < self.created:
            return True  # older than the latest create: nothing to clear
        fields = self.fields
        for name in list(fields):
            cur = fields[name]
            if type(cur) is tuple:
                if cur[0] < hlc:
                    del fields[name]
            # (a collection rewritten after the erase keeps its newer floor)
            elif (cur.floor is None or cur.floor < hlc) and not cur.clear(hlc):
                del fields[name]
        return True

    def _whole_set(self, name: str, code: int, hlc: HLC, value: Any) -> bool:
        fields = self.fields
        cur = fields.get(name)
        if cur is None or type(cur) is tuple:
            if cur is not None and cur[0] >= hlc:
                return False
            fields[name] = (hlc, value)
            return True
        if cur.floor is not None and hlc <= cur.floor:
            return False
        if not cur.rebase(hlc, value):
            fields[name] = (hlc, value)
        return True

    def _state(self, name: str, code: int, hlc: HLC) -> _State | None:
        """The collection state of a field for an element op at ``hlc`` (None: op is void)."""
        cur = self.fields.get(name)
        if cur is None:
            return _NEW[code](self._floor())
        if type(cur) is tuple:
            if hlc <= cur[0]:
                return None
            st = _NEW[code](None)
            st.load(cur[0], cur[1])
            return st
        if not isinstance(cur, _STATE_TYPES[code]):
            raise ValueError(f"field {name!r} holds a different kind of state")
        assert isinstance(cur, (_Counter, _List, _Set, _Dict))
        if cur.floor is not None and hlc <= cur.floor:
            return None
        return cur

    def _field_op(self, ins: Instruction, code: int, norm: Norm) -> bool:
        op, hlc, name = ins.op, ins.hlc, ins.field
        assert name is not None
        if op is Op.SET:
            if code == _SCALAR:
                cur = self.fields.get(name)
                if cur is not None and cur[0] >= hlc:
                    return False
                self.fields[name] = (hlc, ins.value if norm is None else norm(ins.value))
                return True
            if ins.value is None:
                raise ValueError(f"a SET of collection field {name!r} needs a value")
            return self._whole_set(name, code, hlc, _whole(code, norm, ins.value))
        if _OP_CODES.get(op) != code:
            raise ValueError(f"{op.name} does not apply to field {name!r}")
        st = self._state(name, code, hlc)
        if st is None:
            return False
        value = ins.value if norm is None or ins.value is None else norm(ins.value)
        if isinstance(st, _Counter):
            if type(value) is not int:
                raise ValueError("a counter ADD amount must be an int")
            changed = st.add(hlc, value)
        elif isinstance(st, _List):
            if op is Op.LIST_INSERT:
                anchor = None if ins.key is None else _elem_id(ins.key)
                changed = st.insert(hlc, anchor, value)
            elif op is Op.LIST_SET:
                changed = st.set_value(hlc, _elem_id(ins.key), value)
            else:
                changed = st.erase(hlc, _elem_id(ins.key))
        elif isinstance(st, _Set):
            changed = st.put(hlc, value, op is Op.SET_ADD)
        elif op is Op.DICT_SET:
            changed = st.put(hlc, _dict_key(ins.key), True, value)
        else:
            changed = st.put(hlc, _dict_key(ins.key), False, None)
        if changed:
            self.fields[name] = st
        return changed

    def render(self, schema: ModelSchema) -> dict[str, Any] | None:
        """The object's values by field name, or None if it is not alive.

        Every schema field is present: missing scalars read None, collections empty,
        counters 0.
        """
        if not self.alive:
            return None
        fields = self.fields
        out: dict[str, Any] = {}
        for name, code, _ in _plan(schema).order:
            cur = fields.get(name)
            if cur is None:
                out[name] = _whole(code, None, None) if code != _SCALAR else None
            elif type(cur) is tuple:
                v = cur[1]
                if code == _SCALAR or code == _COUNTER:
                    out[name] = v
                elif code == _LIST:
                    out[name] = list(v)
                elif code == _SET:
                    out[name] = set(v)
                else:
                    out[name] = dict(v)
            elif isinstance(cur, _List):
                out[name] = [v for _, v in cur.visible()]
            else:
                out[name] = cur.render()
        return out

    def list_ids(self, field: str) -> list[HLC]:
        """Ids of the visible elements of a list field, in order."""
        cur = self.fields.get(field)
        if cur is None:
            return []
        if type(cur) is tuple:
            if not isinstance(cur[1], list):
                raise ValueError(f"field {field!r} is not a list")
            return _derived_ids(cur[0], len(cur[1]))
        if not isinstance(cur, _List):
            raise ValueError(f"field {field!r} is not a list")
        return [k for k, _ in cur.visible()]

    def to_bytes(self) -> bytes:
        """A compact, canonical encoding (same instruction set, same bytes)."""
        created = self.created
        base: dict[str, Any] = {}  # plain values written by the latest create
        out: dict[str, Any] = {}
        fields = self.fields
        for name in sorted(fields):
            cur = fields[name]
            if type(cur) is tuple:
                h, v = cur
                tv = type(v)
                if tv is frozenset:
                    out[name] = [5, h, sorted(v, key=pack)]
                elif tv is dict:
                    out[name] = [0, h, {k: v[k] for k in sorted(v)}]
                elif h is created or h == created:
                    base[name] = v
                else:
                    out[name] = [0, h, v]
            else:
                out[name] = cur.encode()
        return pack([_FORMAT, created, self.erased, self._last, base, out])

    @classmethod
    def from_bytes(cls, data: bytes) -> ObjectState:
        """Decode :meth:`to_bytes` output; raises ``ValueError`` if malformed."""
        raw = unpack(data)
        if type(raw) is list and len(raw) == 3 and raw[0] == _LONE:
            if raw[1] is None or not isinstance(raw[2], dict):
                raise ValueError("malformed object state: a lone create without its values")
            raw = [_FORMAT, raw[1], None, raw[1], raw[2], {}]
        if not isinstance(raw, list) or len(raw) != 6 or raw[0] != _FORMAT:
            raise ValueError("malformed object state")
        if not isinstance(raw[4], dict) or not isinstance(raw[5], dict):
            raise ValueError("malformed object state: fields are not a map")
        st = cls()
        created = st.created = _uh(raw[1])
        st.erased = _uh(raw[2])
        st._last = _uh(raw[3]) or ZERO
        if raw[4] and created is None:
            raise ValueError("malformed object state: create values without a create")
        try:
            for name, v in raw[4].items():
                if not isinstance(name, str):
                    raise ValueError("malformed object state: field name is not a string")
                st.fields[name] = (created, v)
            for name, enc in raw[5].items():
                if not isinstance(name, str) or not isinstance(enc, list) or not enc:
                    raise ValueError("malformed object state: bad field entry")
                tag = enc[0]
                if tag == 0 or tag == 5:
                    if len(enc) != 3:
                        raise ValueError("malformed plain field")
                    v = frozenset(enc[2]) if tag == 5 else enc[2]
                    st.fields[name] = (hlc_from_list(enc[1]), v)
                elif tag in _DECODE:
                    st.fields[name] = _DECODE[tag](enc)
                else:
                    raise ValueError(f"malformed object state: unknown field tag {tag!r}")
        except TypeError as exc:
            raise ValueError(f"malformed object state: {exc}") from exc
        return st


def created_state(ins: Instruction, schema: ModelSchema) -> tuple[bytes, dict[str, Any]] | None:
    """The state of an object that has received nothing but the CREATE ``ins``, cheaply.

    Returns ``(state bytes, rendered values)``: the state in its compact lone-create form
    (:data:`_LONE`), which :meth:`ObjectState.from_bytes` reads as the state that
    ``ObjectState.empty()`` then ``apply(ins)`` gives, and what :meth:`ObjectState.render`
    gives, without building the state (the hot path of integrating and downloading new
    objects). Returns None for a model with collection or counter fields (build the
    state then).
    """
    parts = _created_parts(ins, schema)
    if parts is None:
        return None
    state, out = parts
    return pack(state), out


def created_values(ins: Instruction, schema: ModelSchema) -> dict[str, Any] | None:
    """Just the rendered values of :func:`created_state` (nothing is encoded)."""
    parts = _created_parts(ins, schema)
    return None if parts is None else parts[1]


def _created_parts(
    ins: Instruction, schema: ModelSchema
) -> tuple[list[Any], dict[str, Any]] | None:
    """The lone-create state array (:data:`_LONE`) and the rendered values of an object
    made by the CREATE ``ins`` alone; None for a model with collection or counter
    fields."""
    plan = _plan(schema)
    if plan.others:
        return None
    values = ins.value
    if not isinstance(values, dict):
        raise ValueError("a CREATE instruction's value must be a dict")
    get = values.get
    out = {name: get(name) if norm is None else norm(get(name)) for name, norm in plan.scalars}
    return [_LONE, ins.hlc, out], out


def simple_state(data: bytes, schema: ModelSchema) -> tuple[HLC, dict[str, Any]] | None:
    """``(created, values)`` if the state ``data`` is one that a lone CREATE gives, else None.

    ``data`` is :meth:`ObjectState.to_bytes` output. The result is not None exactly when
    the state is what ``ObjectState.empty()`` then ``apply`` of a CREATE at ``created``
    with ``values`` gives (so :func:`created_state` of that CREATE is ``data``, up to map
    order): no erase, nothing written after the create, ``values`` holding every field of
    ``schema`` already normalised. Models with collection or counter fields, malformed
    data and any other state give None (apply the merge then); nothing is raised.
    """
    read = simple_state_reader(schema)
    got = None if read is None else read(data)
    if got is None:
        return None
    wall, counter, origin = got[0]
    return HLC(wall, counter, origin), got[1]


#: What :func:`simple_state_reader`'s function gives: ``[wall, counter, origin]`` of the
#: create (the packed HLC as decoded) and the values.
SimpleState = tuple[list[Any], dict[str, Any]]


def simple_state_reader(schema: ModelSchema) -> Callable[[bytes], SimpleState | None] | None:
    """:func:`simple_state` for the many states of one model: a function of the state bytes
    that gives the create's HLC as the list ``[wall, counter, origin]`` (no HLC is built)
    and the values, or None exactly when :func:`simple_state` is None. None for a model
    with collection or counter fields."""
    check = simple_row_check(schema)
    if check is None:
        return None
    plan = _plan(schema)
    fields = plan.fields.keys()
    fmt_ok, lone = _FORMAT, _LONE
    ordered = values_getter(plan.names)

    def read(data: bytes) -> SimpleState | None:
        try:
            raw = unpack(data)
        except ValueError:
            return None
        if type(raw) is not list:
            return None
        if len(raw) == 3:
            fmt, created, base = raw
            if fmt != lone:
                return None
        elif len(raw) == 6:
            fmt, created, erased, last, base, out = raw
            if fmt != fmt_ok or erased is not None or out != {} or last != created:
                return None
        else:
            return None
        if type(base) is not dict or base.keys() != fields:
            return None
        if not check(created, ordered(base)):
            return None
        return created, base

    return read


def values_getter(names: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A function of a values dict giving the values of ``names`` in that order, as one C
    call (a single name gives a 1-tuple too)."""
    if len(names) > 1:
        return itemgetter(*names)
    name = names[0]
    return lambda values: (values[name],)


def simple_row_check(schema: ModelSchema) -> Callable[[Any, Sequence[Any]], bool] | None:
    """For the lone creates of one model given as rows: a function of the create's HLC as
    decoded (``[wall, counter, origin]``) and the values in the schema's field order, True
    exactly when that is what a CREATE at that HLC gives (a valid HLC, every value as the
    create normalises it: no int in a float field, ...). None for a model with collection
    or counter fields."""
    plan = _plan(schema)
    if plan.others:
        return None
    index = {name: i for i, name in enumerate(plan.names)}
    floats = tuple(index[name] for name in plan.floats)
    normed = tuple((index[name], norm) for name, norm in plan.normed)

    def check(created: Any, values: Sequence[Any]) -> bool:
        if type(created) is not list or len(created) != 3:
            return False
        wall, counter, origin = created
        if type(wall) is not int or type(counter) is not int or type(origin) is not str:
            return False
        if wall < 0 or counter < 0:
            return False
        # values a create would have normalised (an int in a float field, ...) are not its
        for i in floats:
            if type(values[i]) is int:
                return False
        for i, norm in normed:
            v = values[i]
            if norm(v) is not v:
                return False
        return True

    return check


def created_at(data: bytes | None) -> HLC | None:
    """The HLC of the CREATE that alone made the state ``data`` (:meth:`ObjectState.to_bytes`
    output), or None when anything else shows in it (an erase, a field written after the
    create, a collection's history) or it is malformed.

    A state with created == last HLC, no erase and every field in the create's plain
    values is the state of that one CREATE: any write with a later HLC would have moved
    ``last``, and anything older was reset by the create (HLCs are unique, so no other
    write has the same one). Nothing is raised."""
    if data is None:
        return None
    lone = lone_create(data)
    if lone is not None:
        created = lone[0]
    else:
        try:
            raw = unpack(data)
        except ValueError:
            return None
        if type(raw) is not list or len(raw) != 6 or raw[0] != _FORMAT:
            return None
        created, erased, last, out = raw[1], raw[2], raw[3], raw[5]
        if erased is not None or out != {} or created is None or created != last:
            return None
    try:
        return hlc_from_list(created)
    except ValueError:
        return None


def lone_create(data: bytes) -> tuple[Any, dict[str, Any]] | None:
    """``(create HLC as decoded, values)`` of a state in the compact lone-create form
    (:data:`_LONE`), or None for any other state or malformed data (nothing is raised)."""
    if data[:2] != LONE_HEAD:
        return None
    try:
        raw = unpack(data)
    except ValueError:
        return None
    if type(raw) is not list or len(raw) != 3 or type(raw[2]) is not dict:
        return None
    return raw[1], raw[2]


def created_rows(ins: Instruction, schema: ModelSchema) -> tuple[bytes, bytes] | None:
    """What the server stores for a new object made by the CREATE ``ins`` alone: ``(state
    head, packed values)``, the head being :data:`LONE_HEAD` and the packed HLC (the state
    is the two joined, see :func:`stored_state`). None for a model with collection or
    counter fields."""
    values = created_values(ins, schema)
    if values is None:
        return None
    created, vals = pack_pair(ins.hlc, values)
    return LONE_HEAD + created, vals


def stored_state(state: bytes, vals: bytes | None) -> bytes:
    """The state bytes of an object stored as ``(state, vals)`` (:func:`created_rows`): a
    lone-create head joined to the values, any other state as it is."""
    if vals is not None and state[:2] == LONE_HEAD:
        return state + vals
    return state


def rows_of_creates(schema: ModelSchema) -> bool:
    """True if :func:`created_rows_many` encodes CREATEs of ``schema`` (no collection or
    counter fields), i.e. it does not give None for them."""
    return not _plan(schema).others


def created_rows_many(
    instructions: Iterable[Instruction], schema: ModelSchema
) -> list[tuple[bytes, bytes]] | None:
    """:func:`created_rows` of each CREATE in ``instructions`` (all of model ``schema``),
    in one pass with one packer; the same bytes. None for a model with collection or
    counter fields; ``ValueError`` if a value is not a dict."""
    plan = _plan(schema)
    if plan.others:
        return None
    names, floats, normed = plan.names, plan.floats, plan.normed
    head = LONE_HEAD
    rows: list[tuple[bytes, bytes]] = []
    add = rows.append
    encode = packer()
    for ins in instructions:
        values = ins.value
        if not isinstance(values, dict):
            raise ValueError("a CREATE instruction's value must be a dict")
        if tuple(values) == names:  # the usual case: every field, in the schema's order
            out = values.copy()
        else:
            out = dict(zip(names, map(values.get, names), strict=True))
        for name in floats:
            value = out[name]
            if type(value) is int:
                out[name] = float(value)
        for name, norm in normed:
            out[name] = norm(out[name])
        add((head + encode(ins.hlc), encode(out)))
    return rows


_OP_CODES = {
    Op.ADD: _COUNTER,
    Op.LIST_INSERT: _LIST,
    Op.LIST_SET: _LIST,
    Op.LIST_ERASE: _LIST,
    Op.SET_ADD: _SET,
    Op.SET_REMOVE: _SET,
    Op.DICT_SET: _DICT,
    Op.DICT_ERASE: _DICT,
}


def _elem_id(key: Any) -> HLC:
    if isinstance(key, HLC):
        return key
    if isinstance(key, (list, tuple)):
        return hlc_from_list(key)
    raise ValueError(f"a list element id must be an HLC, got {key!r}")


def _dict_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ValueError(f"a dict key must be a str, got {key!r}")
    return key


class Replica:
    """Objects of several models keyed by (model, pk), plus applied-changeset tracking."""

    def __init__(self, schemas: dict[str, ModelSchema]) -> None:
        self.schemas = schemas
        self.objects: dict[tuple[str, Any], ObjectState] = {}
        self._watermark: dict[str, int] = {}
        self._extras: dict[str, set[int]] = {}

    def has_applied(self, origin: str, version: int) -> bool:
        """True if changeset ``(origin, version)`` was applied already."""
        if version <= self._watermark.get(origin, 0):
            return True
        extras = self._extras.get(origin)
        return extras is not None and version in extras

    def apply_changeset(self, cs: Changeset, *, validate: bool = True) -> bool:
        """Apply a changeset; False (and no change) if it was applied already.

        With ``validate`` (the default) the changeset is checked first, so a bad one
        raises ``ValueError`` before anything is applied.
        """
        if self.has_applied(cs.origin, cs.version):
            return False
        if validate:
            validate_changeset(cs, self.schemas)
        objects, schemas = self.objects, self.schemas
        for ins in cs.instructions:
            key = (ins.model, ins.pk)
            st = objects.get(key)
            if st is None:
                st = objects[key] = ObjectState()
            st.apply(ins, schemas[ins.model])
        self._mark(cs.origin, cs.version)
        return True

    def _mark(self, origin: str, version: int) -> None:
        mark = self._watermark.get(origin, 0)
        extras = self._extras.setdefault(origin, set())
        if version != mark + 1:
            extras.add(version)
            return
        mark = version
        while mark + 1 in extras:
            mark += 1
            extras.discard(mark)
        self._watermark[origin] = mark
        if not extras:
            del self._extras[origin]

    def snapshot(self) -> dict[str, dict[Any, dict[str, Any]]]:
        """model -> pk -> rendered values, alive objects only (every model present)."""
        out: dict[str, dict[Any, dict[str, Any]]] = {name: {} for name in self.schemas}
        for (model, pk), st in self.objects.items():
            values = st.render(self.schemas[model])
            if values is not None:
                out[model][pk] = values
        return out
