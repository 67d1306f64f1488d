"""Compact binary encoding (msgpack) of values, instructions and changesets.

Used by the wire codec, the local change log and server storage, so a changeset has one
byte form everywhere. Scalar types msgpack lacks travel as extension types (HLCs,
being tuples, travel as ``[wall, counter, origin]`` arrays):

====  =========  ======================================
code  type       payload
====  =========  ======================================
1     datetime   int64 microseconds since the epoch (UTC)
2     Decimal    its canonical string, UTF-8
3     UUID       16 bytes
4     ObjectId   12 bytes
6     set        msgpack array of its elements
====  =========  ======================================

Decoding checks shapes and raises ``ValueError`` on anything malformed; it never executes
anything and bounds nesting depth (msgpack's own limits plus ours).
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack

from ..objectid import ObjectId
from .changeset import Changeset, Instruction, Op
from .hlc import HLC

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
EXT_DATETIME, EXT_DECIMAL, EXT_UUID, EXT_OBJECTID, EXT_SET = 1, 2, 3, 4, 6


def datetime_to_micros(value: _dt.datetime) -> int:
    """Microseconds since the epoch; naive datetimes are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def micros_to_datetime(micros: int) -> _dt.datetime:
    """The UTC datetime for microseconds since the epoch."""
    return _EPOCH + _dt.timedelta(microseconds=micros)


def _default(obj: Any) -> Any:
    if isinstance(obj, _dt.datetime):
        return msgpack.ExtType(EXT_DATETIME, msgpack.packb(datetime_to_micros(obj)))
    if isinstance(obj, Decimal):
        return msgpack.ExtType(EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(EXT_UUID, obj.bytes)
    if isinstance(obj, ObjectId):
        return msgpack.ExtType(EXT_OBJECTID, obj.binary)
    if isinstance(obj, (set, frozenset)):
        return msgpack.ExtType(EXT_SET, msgpack.packb(list(obj), default=_default))
    raise TypeError(f"cannot encode a value of type {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    try:
        if code == EXT_DATETIME:
            micros = msgpack.unpackb(data)
            if not isinstance(micros, int):
                raise ValueError("datetime payload is not an int")
            return micros_to_datetime(micros)
        if code == EXT_DECIMAL:
            return Decimal(data.decode())
        if code == EXT_UUID:
            return uuid.UUID(bytes=data)
        if code == EXT_OBJECTID:
            return ObjectId(data)
        if code == EXT_SET:
            items = unpack(data)
            if not isinstance(items, list):
                raise ValueError("set payload is not an array")
            return frozenset(items)
    except (ValueError, TypeError, OverflowError, InvalidOperation, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed extension value (type {code}): {exc}") from exc
    except msgpack.ExtraData as exc:
        raise ValueError(f"malformed extension value (type {code})") from exc
    raise ValueError(f"unknown extension type {code}")


def hlc_from_list(parts: Any) -> HLC:
    """Parse ``[wall, counter, origin]``; raises ``ValueError`` if malformed."""
    if (
        not isinstance(parts, (list, tuple))
        or len(parts) != 3
        or not isinstance(parts[0], int)
        or not isinstance(parts[1], int)
        or not isinstance(parts[2], str)
        or isinstance(parts[0], bool)
        or isinstance(parts[1], bool)
        or parts[0] < 0
        or parts[1] < 0
    ):
        raise ValueError(f"malformed HLC {parts!r}")
    return HLC(parts[0], parts[1], parts[2])


_PACKER_OPTS: dict[str, Any] = {"default": _default, "use_bin_type": True, "datetime": False}


#: Idle packers (``msgpack.packb`` builds a new Packer per call, which costs more than
#: packing a small value). A caller pops one for its exclusive use and puts it back after:
#: ``list.pop``/``append`` are atomic, so threads never share one.
_PACKERS: list[msgpack.Packer] = []


def pack(obj: Any) -> bytes:
    """Encode a value (scalars, lists, dicts, sets, and the extension types)."""
    try:
        packer = _PACKERS.pop()
    except IndexError:
        packer = msgpack.Packer(**_PACKER_OPTS)
    data = packer.pack(obj)  # on error the packer is dropped, not reused
    if len(_PACKERS) < 16:
        _PACKERS.append(packer)
    return data  # type: ignore[no-any-return]


def pack_pair(first: Any, second: Any) -> tuple[bytes, bytes]:
    """:func:`pack` of two values with one pooled packer (a hot path's saving)."""
    try:
        packer = _PACKERS.pop()
    except IndexError:
        packer = msgpack.Packer(**_PACKER_OPTS)
    data = (packer.pack(first), packer.pack(second))
    if len(_PACKERS) < 16:
        _PACKERS.append(packer)
    return data


def pack_each(values: Iterable[Any]) -> list[bytes]:
    """:func:`pack` of each value, all with one pooled packer (for hot loops)."""
    try:
        packer = _PACKERS.pop()
    except IndexError:
        packer = msgpack.Packer(**_PACKER_OPTS)
    data = list(map(packer.pack, values))
    if len(_PACKERS) < 16:
        _PACKERS.append(packer)
    return data


def packer() -> Callable[[Any], bytes]:
    """A private :func:`pack` for one caller's loop (not to be shared between threads)."""
    return msgpack.Packer(**_PACKER_OPTS).pack  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Decode :func:`pack` output; raises ``ValueError`` on malformed input."""
    try:
        return msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=False,
            use_list=True,
        )
    except ValueError:
        raise
    except (msgpack.UnpackException, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed msgpack data: {exc}") from exc
    except Exception as exc:  # msgpack raises assorted types for corrupt data
        raise ValueError(f"malformed msgpack data: {exc}") from exc


def instruction_to_list(ins: Instruction) -> list[Any]:
    """The compact array form of an instruction (its HLC's origin is the changeset's)."""
    return [
        int(ins.op),
        ins.model,
        ins.pk,
        ins.hlc.wall,
        ins.hlc.counter,
        ins.field,
        ins.value,
        ins.key,
    ]


def instruction_from_list(item: Any, origin: str) -> Instruction:
    """Parse :func:`instruction_to_list` output; raises ``ValueError`` if malformed."""
    # Fast path for the common shapes (plain types, an op whose key needs no parsing): the
    # same checks as below, then the tuples are built without NamedTuple.__new__'s frame.
    if type(item) is list and len(item) == 8:
        op_raw, model, pk, wall, counter, field, value, key = item
        op = _PLAIN_OPS.get(op_raw) if type(op_raw) is int else None
        if (
            op is not None
            and type(model) is str
            and model
            and type(wall) is int
            and type(counter) is int
            and wall >= 0
            and counter >= 0
            and (field is None or type(field) is str)
            and (op is not Op.CREATE or type(value) is dict)
        ):
            hlc = _tuple_new(HLC, (wall, counter, origin))
            return _tuple_new(Instruction, (op, model, pk, hlc, field, value, key))
    return _instruction_from_list(item, origin)


_tuple_new = tuple.__new__


def _instruction_from_list(item: Any, origin: str) -> Instruction:
    if not isinstance(item, list) or len(item) != 8:
        raise ValueError("an instruction must be an array of 8 items")
    op_raw, model, pk, wall, counter, field, value, key = item
    try:
        op = _OPS.get(op_raw)  # a dict lookup: Op(x) costs an Enum call per instruction
    except TypeError:  # unhashable
        op = None
    if op is None:
        raise ValueError(f"unknown instruction op {op_raw!r}")
    if not isinstance(model, str) or not model:
        raise ValueError("an instruction's model must be a non-empty string")
    if not isinstance(wall, int) or not isinstance(counter, int) or wall < 0 or counter < 0:
        raise ValueError("an instruction's timestamp must be two non-negative ints")
    if field is not None and not isinstance(field, str):
        raise ValueError("an instruction's field must be a string")
    if op is Op.CREATE and not isinstance(value, dict):
        raise ValueError("a CREATE instruction's value must be a map")
    if isinstance(value, list) and op in (Op.SET_ADD, Op.SET_REMOVE):
        raise ValueError("a set element cannot be a list")
    if op is Op.LIST_SET or op is Op.LIST_ERASE or (op is Op.LIST_INSERT and key is not None):
        key = hlc_from_list(key)
    return Instruction(op, model, pk, HLC(wall, counter, origin), field, value, key)


#: Op by its value (what ``Op(x)`` finds, without the Enum machinery).
_OPS: dict[Any, Op] = {op.value: op for op in Op}
#: The ops whose instructions :func:`instruction_from_list` builds on its fast path (the
#: others parse their element key or refuse a list value).
_PLAIN_OPS: dict[int, Op] = {
    op.value: op
    for op in Op
    if op not in (Op.LIST_INSERT, Op.LIST_SET, Op.LIST_ERASE, Op.SET_ADD, Op.SET_REMOVE)
}


class _Unpacked(tuple):  # type: ignore[type-arg]
    """What :func:`unpack_instructions` returns: the instructions, and the bytes they were
    decoded from (so :func:`pack_instructions` of the very same tuple costs nothing; a
    tuple built from it, e.g. a slice or a filtered copy, is a plain tuple again)."""

    packed: bytes


def pack_instructions(instructions: tuple[Instruction, ...] | list[Instruction]) -> bytes:
    """Encode a list of instructions (all from one origin)."""
    if type(instructions) is _Unpacked:
        return instructions.packed
    return pack([instruction_to_list(i) for i in instructions])


def pack_instruction(ins: Instruction) -> bytes:
    """One instruction's bytes; :func:`join_packed` of these equals :func:`pack_instructions`.

    The local store keeps a transaction's instructions packed as it goes: bytes are not
    tracked by the cyclic garbage collector, so a large transaction does not make every
    collection walk all of its pending instructions."""
    return pack(instruction_to_list(ins))


def join_packed(parts: list[bytes]) -> bytes:
    """A msgpack array of already packed items (the same bytes as packing the list)."""
    n = len(parts)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 0x10000:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return header + b"".join(parts)


def unpack_instructions(data: bytes, origin: str) -> tuple[Instruction, ...]:
    """Decode :func:`pack_instructions` output."""
    items = unpack(data)
    if not isinstance(items, list):
        raise ValueError("instructions must be an array")
    # instruction_from_list's fast path, inlined (one frame per upload, not per instruction)
    parsed: list[Instruction] = []
    add = parsed.append
    plain_ops = _PLAIN_OPS
    create = Op.CREATE
    new = _tuple_new
    for item in items:
        if type(item) is list and len(item) == 8:
            op_raw, model, pk, wall, counter, field, value, key = item
            op = plain_ops.get(op_raw) if type(op_raw) is int else None
            if (
                op is not None
                and type(model) is str
                and model
                and type(wall) is int
                and type(counter) is int
                and wall >= 0
                and counter >= 0
                and (field is None or type(field) is str)
                and (op is not create or type(value) is dict)
            ):
                hlc = new(HLC, (wall, counter, origin))
                add(new(Instruction, (op, model, pk, hlc, field, value, key)))
                continue
        add(_instruction_from_list(item, origin))
    out = _Unpacked(parsed)
    out.packed = bytes(data)
    return out


def pack_changeset(cs: Changeset) -> bytes:
    """Encode a whole changeset."""
    return pack([cs.origin, cs.version, [instruction_to_list(i) for i in cs.instructions]])


def unpack_changeset(data: bytes) -> Changeset:
    """Decode :func:`pack_changeset` output; raises ``ValueError`` if malformed."""
    items = unpack(data)
    if not isinstance(items, list) or len(items) != 3:
        raise ValueError("a changeset must be an array of 3 items")
    origin, version, instrs = items
    if not isinstance(origin, str) or not origin:
        raise ValueError("a changeset's origin must be a non-empty string")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError("a changeset's version must be a positive int")
    if not isinstance(instrs, list):
        raise ValueError("a changeset's instructions must be an array")
    return Changeset(origin, version, tuple(instruction_from_list(i, origin) for i in instrs))
