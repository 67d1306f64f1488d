"""The per-object size limit of a write transaction (``Configuration.max_object_bytes``).

An object travels whole in flexible sync (bootstrap pages, the authoritative state sent
back after an upload), so it must fit one frame: the device refuses, at commit, a
transaction that writes more than the limit to one object, and writes nothing of it
(docs/sync-session.md, "Limits"). What counts is the packed size of the instructions the
transaction made to that object (its values as they go on the wire). The check costs one
``sum`` of the pending instructions' lengths: only a transaction larger than the limit as
a whole can hold an object over it, and only then are its instructions grouped by object.
"""

from __future__ import annotations

from typing import Any

from ..core.packing import join_packed, pack, unpack_instructions
from ..errors import ObjectTooLargeError


def check_object_sizes(packed: list[bytes], limit: int, origin: str) -> None:
    """Raise :class:`ObjectTooLargeError` naming the first object that the transaction's
    instructions (``packed``, one entry each) write more than ``limit`` bytes to."""
    if sum(map(len, packed)) <= limit:
        return
    sizes: dict[tuple[str, bytes], int] = {}
    names: dict[tuple[str, bytes], tuple[str, Any]] = {}
    for data in packed:
        (ins,) = unpack_instructions(join_packed([data]), origin)
        key = (ins.model, pack(ins.pk))
        sizes[key] = sizes.get(key, 0) + len(data)
        names.setdefault(key, (ins.model, ins.pk))
    for key, size in sizes.items():
        if size > limit:
            model, pk = names[key]
            raise ObjectTooLargeError(model, pk, size, limit)
