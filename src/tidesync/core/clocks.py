"""Device clocks against the server's: the offset a device learns, and the re-stamping of
its own changesets that a clock far ahead made (docs/merge.md, "Clocks").

A device stamps its HLCs with ``local time + offset``, the offset being the server's
time minus the device's as measured at WELCOME (:func:`measure_offset`,
:func:`corrected`). Changesets it wrote before it knew a right offset (a new device
whose clock is fast, writing offline) may carry timestamps beyond what the server
accepts; no other replica has seen them, so :func:`plan_restamp` gives them new ones
from a clock set back to the corrected time, in the same order, and :func:`remap` moves
every place the old ones appear (the changesets' element ids, the objects' merge
states) to the new ones.

Everything here is pure: times come in as arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .changeset import Instruction
from .hlc import HLC, MAX_AHEAD_MS, RESERVED_SHIFT, ZERO, HybridClock

#: ``(wall, counter)`` of an old timestamp -> that of its replacement.
Mapping = dict[tuple[int, int], tuple[int, int]]


def measure_offset(server_ms: int, sent_ms: int, received_ms: int) -> int:
    """Server time minus local time, from a reply that carried ``server_ms`` and came back
    ``received_ms`` for a request sent at ``sent_ms`` (local clock): the server's clock
    is taken to have read ``server_ms`` half way between the two."""
    if received_ms < sent_ms:  # the local clock stepped back meanwhile
        sent_ms = received_ms
    return server_ms - (sent_ms + (received_ms - sent_ms) // 2)


def corrected(local_ms: int, offset_ms: int) -> int:
    """The time a device stamps with: its local time plus its offset (never below 0)."""
    return max(0, local_ms + offset_ms)


def is_ahead(wall: int, now_ms: int, ahead_ms: int = MAX_AHEAD_MS) -> bool:
    """True if a timestamp's ``wall`` is more than ``ahead_ms`` ahead of ``now_ms``."""
    return wall > now_ms + ahead_ms


def _mine(origin: str, who: str) -> bool:
    """``who`` is ``origin`` or one of its derived list element ids (``origin#i``)."""
    return who == origin or (who.startswith(origin) and who[len(origin) : len(origin) + 1] == "#")


def remap_hlc(hlc: HLC, origin: str, mapping: Mapping) -> HLC:
    """``hlc`` moved by ``mapping`` if it is one of ``origin``'s (or derived from one)."""
    new = mapping.get((hlc.wall, hlc.counter))
    if new is None or not _mine(origin, hlc.origin):
        return hlc
    return HLC(new[0], new[1], hlc.origin)


def hlcs_in(obj: Any) -> Iterable[HLC]:
    """Every timestamp-shaped ``[wall, counter, who]`` in a decoded structure."""
    if type(obj) is HLC:
        yield obj
    elif isinstance(obj, list | tuple):
        if len(obj) == 3 and type(obj[0]) is int and type(obj[1]) is int and type(obj[2]) is str:
            yield HLC(obj[0], obj[1], obj[2])
            return
        for x in obj:
            yield from hlcs_in(x)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from hlcs_in(v)


def remap_instruction(ins: Instruction, origin: str, mapping: Mapping) -> Instruction:
    """An instruction with its timestamp and element id (``key``) moved by ``mapping``."""
    key = ins.key
    if type(key) is HLC:
        key = remap_hlc(key, origin, mapping)
    return ins._replace(hlc=remap_hlc(ins.hlc, origin, mapping), key=key)


def first_ahead(pending: Sequence[tuple[Instruction, ...]], now_ms: int) -> int:
    """Index of the first changeset with a timestamp more than :data:`MAX_AHEAD_MS` ahead
    of ``now_ms`` (``len(pending)`` if none): it and all after it get re-stamped."""
    limit = now_ms + MAX_AHEAD_MS
    for i, cs in enumerate(pending):
        for ins in cs:
            if ins.hlc.wall > limit:
                return i
    return len(pending)


@dataclass(frozen=True, slots=True)
class Restamp:
    """What :func:`plan_restamp` decided."""

    #: index (in the changesets given) of the first changeset re-stamped; len() if none
    first: int
    #: the re-stamped changesets, in order (those from ``first`` on)
    changesets: list[tuple[Instruction, ...]]
    #: old ``(wall, counter)`` -> new, for every re-stamped instruction
    mapping: Mapping
    #: the clock's new latest timestamp
    last: HLC
    #: the clock's ``reserved`` (see :class:`~tidesync.core.hlc.HybridClock`)
    reserved: tuple[int, int] | None
    #: element ops left out: they named an element whose id is far in the future (only
    #: data stored before servers bounded timestamps), below which no valid one exists
    dropped: int = 0


def plan_restamp(
    origin: str,
    pending: Sequence[tuple[Instruction, ...]],
    now_ms: int,
    *,
    first: int | None = None,
    floor: HLC = ZERO,
    acked_last: HLC = ZERO,
    reserved: tuple[int, int] | None = None,
) -> Restamp:
    """Set a clock that is ahead back to ``now_ms``, re-stamping what it must.

    ``pending`` are the changesets the server has not integrated, in order; those from
    index ``first`` on (default: :func:`first_ahead`, the first with a timestamp more
    than :data:`MAX_AHEAD_MS` ahead of ``now_ms``) no other replica can have seen (the
    server refused the first of them). Each of their instructions gets a new timestamp
    from a clock started at ``floor``
    (the greatest timestamp, not among those re-stamped and not itself ahead, that the
    new ones must stay above: the earlier pending ones, what the objects they touch hold)
    and ticked at ``now_ms``: their order among themselves is kept, and they sort after
    ``floor``. ``acked_last`` is the latest timestamp of the changesets already integrated:
    when it (or one of the pending changesets before ``first``) is ahead, the clock goes
    back below timestamps others have or will see, so it reserves them (``reserved``)
    and never issues one of them again.
    """
    limit = now_ms + MAX_AHEAD_MS
    if first is None:
        first = first_ahead(pending, now_ms)
    first = max(0, min(first, len(pending)))
    seen = acked_last  # the latest of this replica's timestamps others have or will see
    for cs in pending[:first]:
        for ins in cs:
            if ins.hlc > seen:
                seen = ins.hlc
    if floor.wall > limit:
        floor = ZERO
    start = max(floor, seen) if seen.wall <= limit else floor
    new_reserved = reserved
    if seen.wall > limit:  # the clock goes back below them: never issue those again
        old_wall, old_shift = reserved if reserved is not None else (-1, 0)
        new_reserved = (max(old_wall, seen.wall), old_shift + RESERVED_SHIFT)
    # an element op must stay newer than the element it names (validate.py): the new
    # timestamps go above every element id they name that is not re-stamped with them
    old = {(i.hlc.wall, i.hlc.counter) for cs in pending[first:] for i in cs}
    for cs in pending[first:]:
        for ins in cs:
            key = ins.key
            if type(key) is HLC and key.wall <= limit and key > start:
                if not (_mine(origin, key.origin) and (key.wall, key.counter) in old):
                    start = key
    clock = HybridClock(origin, HLC(start.wall, start.counter, origin), new_reserved)
    mapping: Mapping = {}
    out: list[tuple[Instruction, ...]] = []
    dropped = 0
    for cs in pending[first:]:
        for ins in cs:
            new = clock.tick(now_ms)
            mapping[(ins.hlc.wall, ins.hlc.counter)] = (new.wall, new.counter)
        kept: list[Instruction] = []
        for ins in cs:
            moved = remap_instruction(ins, origin, mapping)
            if type(moved.key) is HLC and moved.key >= moved.hlc:
                dropped += 1  # names a far-future element: no valid timestamp exists now
                continue
            kept.append(moved)
        out.append(tuple(kept))
    return Restamp(first, out, mapping, clock.last, new_reserved, dropped)
