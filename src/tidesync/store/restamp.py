"""Re-stamping a file's unsent changesets when the server refused them for a clock ahead.

The server refuses an upload whose timestamps are further ahead of its clock than its
bound (ERROR 236, docs/merge.md "Clocks"); nothing from the refused changeset on was
integrated, and no other replica has seen it. :func:`restamp_unsent` gives those
changesets new timestamps from the corrected time (``core/clocks.py`` decides them) in
the change log, then resets the file's objects as a client reset that recovers unsynced
changes does (:func:`reset_objects`): the objects are cleared, every unsent changeset is
applied again, and the download starts over from the beginning. Moving the timestamps
inside the stored merge states instead is not enough: a re-stamped write can move past a
write of another device the state already merged (or dropped, having lost to the old
timestamp), and only the server's history can say what the state is then. One write
transaction; the app's own transactions see all of it or none.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..core.changeset import Instruction
from ..core.clocks import hlcs_in, is_ahead, plan_restamp
from ..core.hlc import HLC, MAX_AHEAD_MS, ZERO, HybridClock
from ..core.packing import pack_instructions, unpack, unpack_instructions
from . import sqlvalues as sv
from .engine import StoreEngine

log = logging.getLogger("tidesync.sync")


def _greatest(data: bytes | None, origin: str) -> HLC:
    if data is None:
        return ZERO
    instructions = unpack_instructions(data, origin)
    return max((ins.hlc for ins in instructions), default=ZERO)


def restamp_unsent(engine: StoreEngine, acked: int, refused: int, now_ms: int) -> int:
    """Re-stamp the changesets with versions from ``refused`` on (all above ``acked``, the
    last version the server integrated) at ``now_ms``, the corrected time, and set the
    clock back. Returns how many changesets were re-stamped."""
    origin = engine.origin
    engine.begin()
    try:
        conn = engine.conn
        rows = conn.execute(
            "SELECT version, data FROM _changelog WHERE version > ? ORDER BY version", (acked,)
        ).fetchall()
        pending = [unpack_instructions(data, origin) for _, data in rows]
        first = next((i for i, (v, _) in enumerate(rows) if v >= refused), len(rows))
        row = conn.execute("SELECT data FROM _changelog WHERE version = ?", (acked,)).fetchone()
        acked_last = _greatest(row[0] if row else None, origin)
        # the objects the re-stamped changesets touched, and the timestamps they hold
        old = {(i.hlc.wall, i.hlc.counter) for cs in pending[first:] for i in cs}
        touched: dict[tuple[str, Any], None] = {}
        for cs in pending[first:]:
            for ins in cs:
                if ins.model in engine.schemas:
                    touched[(ins.model, ins.pk)] = None
        floor = ZERO
        beyond = 0
        for model, pk in touched:
            state, _ = engine.load_state(model, pk)
            if state is None:
                continue
            for h in hlcs_in(unpack(state.to_bytes())):
                if (h.wall, h.counter) in old and (
                    h.origin == origin or h.origin.startswith(origin + "#")
                ):
                    continue
                if is_ahead(h.wall, now_ms):
                    beyond += 1  # far-future data: it stays above whatever is stamped now
                elif h > floor:
                    floor = h
        plan = plan_restamp(
            origin,
            pending,
            now_ms,
            first=first,
            floor=floor,
            acked_last=acked_last,
            reserved=engine.clock.reserved if engine.clock is not None else None,
        )
        for (version, _), instructions in zip(rows[plan.first :], plan.changesets, strict=True):
            data = pack_instructions(instructions)
            conn.execute(
                "UPDATE _changelog SET data = ?, size = ? WHERE version = ?",
                (data, len(data), version),
            )
        if plan.changesets:
            reset_objects(engine, acked, list(pending[: plan.first]) + list(plan.changesets))
        engine.clock = HybridClock(origin, plan.last, plan.reserved)
        meta = {"hlc_reserved": json.dumps(list(plan.reserved))} if plan.reserved else None
        engine.commit((), meta=meta)
    except BaseException:
        engine.rollback()
        raise
    count = len(plan.changesets)
    notes = []
    if beyond:
        notes.append(f"{beyond} far-future timestamp(s) in those objects stay above them")
    if plan.dropped:
        notes.append(f"{plan.dropped} change(s) to far-future list elements left out")
    log.warning(
        "%s: this device's clock was ahead of the server's; clock set back to the "
        "corrected time, %d unsent changeset(s) re-stamped%s",
        engine.path,
        count,
        f" ({'; '.join(notes)})" if notes else "",
    )
    return count


def reset_objects(
    engine: StoreEngine, acked: int, pending: list[tuple[Instruction, ...]] | None
) -> None:
    """Inside an open write transaction: clear every object, forget the changesets up to
    ``acked`` and the download cursor, and apply ``pending`` (the unsent changesets, in
    order) again; with ``pending`` None every changeset is forgotten. The file then holds
    only what this device has not uploaded, and downloads everything else from the start
    (a client reset: ``client/reset.py``)."""
    conn = engine.conn
    for model in engine.schemas:
        conn.execute(f"DELETE FROM {sv.table_name(model)}")
    conn.execute("DELETE FROM _dead")
    if pending is None:
        conn.execute("DELETE FROM _changelog")
    else:
        conn.execute("DELETE FROM _changelog WHERE version <= ?", (acked,))
    engine.set_meta("download_cursor", 0)
    engine.set_meta("upload_acked", 0)
    for instructions in pending or ():
        engine.apply(instructions)


def clock_ahead(engine: StoreEngine, now_ms: int) -> bool:
    """True if the file's clock (its last timestamp) is more than
    :data:`~tidesync.core.hlc.MAX_AHEAD_MS` ahead of ``now_ms`` (a read, no lock)."""
    raw = engine.get_meta("hlc")
    if not raw:
        return False
    wall = int(json.loads(raw)[0])
    return wall > now_ms + MAX_AHEAD_MS
