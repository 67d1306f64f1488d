"""What the device tells the app when the server refused whole transactions (ERROR 232).

The server integrates a changeset it refuses (larger than its ``max_changeset_bytes``, or
malformed) as nothing, acknowledges it with the versions after it, and says so in ERROR 232
(docs/sync-session.md, "Limits"). The device reads what each refused transaction wrote
from its own change log, which still holds it (the ERROR comes before the
acknowledgement), and hands the list to the error handler as a
:class:`~tidesync.errors.ChangesetRefusedError`; the session stays bound.
"""

from __future__ import annotations

from typing import Any

from ..core.packing import pack, unpack_instructions
from ..errors import ChangesetRefusedError
from ..protocol.messages import refused_changesets_of
from ..store.engine import StoreEngine


def refused_error(engine: StoreEngine, message: str) -> ChangesetRefusedError:
    """The error handler's view of an ERROR 232: each refused version, the server's
    reason and the objects (model, primary key) that transaction wrote."""
    refused: list[tuple[int, str, list[tuple[str, Any]]]] = []
    for version, reason in refused_changesets_of(message):
        refused.append((version, reason, _objects_of(engine, version)))
    return ChangesetRefusedError(message.split("\n", 1)[0], refused)


def _objects_of(engine: StoreEngine, version: int) -> list[tuple[str, Any]]:
    """The objects local changeset ``version`` wrote, in order (empty if it is gone)."""
    entries = engine.read_changelog(version - 1, 0)
    if not entries or entries[0][0] != version:
        return []
    try:
        instructions = unpack_instructions(entries[0][1], engine.origin)
    except ValueError:
        return []
    seen: dict[tuple[str, bytes], tuple[str, Any]] = {}
    for ins in instructions:
        key = (ins.model, pack(ins.pk))
        if key not in seen:
            seen[key] = (ins.model, ins.pk)
    return list(seen.values())
