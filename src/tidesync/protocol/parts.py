"""Changesets larger than a frame: splitting them into parts and joining the parts again.

Protocol version 3 lets one changeset travel in several messages (docs/protocol.md,
"Changeset parts"): every part but the last is marked ``more``, each part is the only
changeset of its UPLOAD or DOWNLOAD, and the receiver joins the parts before it does
anything with the changeset, so a changeset is integrated (server) or applied (device) whole
or not at all. Splitting cuts the packed instruction bytes at any byte: joining is plain
concatenation. This module is pure (no I/O); both state machines use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import DownloadChangeset

#: Bytes a message adds around the changesets it carries (type, session, cursors, headers),
#: with room to spare; a part is at most ``frame limit - FRAME_OVERHEAD`` bytes.
FRAME_OVERHEAD = 1024
#: Bytes each changeset adds inside a message (its array, version, origin, byte header).
CHANGESET_OVERHEAD = 160


def part_size_for(max_frame_size: int) -> int:
    """The largest part that fits a frame of ``max_frame_size`` bytes with its message."""
    return max(1, max_frame_size - FRAME_OVERHEAD - CHANGESET_OVERHEAD)


def split_parts(data: bytes, part_size: int) -> list[bytes]:
    """``data`` cut into parts of at most ``part_size`` bytes (one part if it fits);
    ``b"".join(split_parts(data, n)) == data`` for every ``n >= 1``."""
    if part_size < 1:
        raise ValueError("part_size must be positive")
    if len(data) <= part_size:
        return [data]
    view = memoryview(data)
    return [bytes(view[i : i + part_size]) for i in range(0, len(data), part_size)]


def group_by_size(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """Split indices ``0..len(sizes)`` into consecutive runs ``(start, stop)`` whose sizes
    (each plus :data:`CHANGESET_OVERHEAD`) add up to at most ``budget``; an item over the
    budget alone is a run of its own (the caller splits it into parts)."""
    runs: list[tuple[int, int]] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        cost = size + CHANGESET_OVERHEAD
        if index > start and used + cost > budget:
            runs.append((start, index))
            start, used = index, 0
        used += cost
    if sizes:
        runs.append((start, len(sizes)))
    return runs


class PartsTooLargeError(ValueError):
    """The parts of one changeset add up to more than the assembler's limit."""

    def __init__(self, key: object, size: int, limit: int) -> None:
        super().__init__(f"changeset {key} has more than {limit} bytes ({size} so far)")
        self.key = key
        self.size = size
        self.limit = limit


class PartOrderError(ValueError):
    """A part does not continue the changeset being assembled."""


@dataclass(slots=True)
class PartAssembler:
    """Joins the parts of one changeset at a time, at most ``limit`` bytes.

    :meth:`add` takes each part with the changeset's identity (``key``, compared for
    equality) and ``more``; it returns the whole changeset's bytes with the last part, None
    before. With ``discard_over_limit`` the parts of a changeset that passes the limit are
    dropped as they come (memory stays bounded) and :meth:`add` returns ``b""`` with its
    last part while :attr:`overflow` holds the size it had; otherwise
    :class:`PartsTooLargeError` is raised at once. :meth:`reset` forgets a half-received
    changeset (a disconnect: the sender sends it again).
    """

    limit: int
    discard_over_limit: bool = False
    key: object | None = None
    size: int = 0
    overflow: int | None = None
    _parts: list[bytes] | None = None

    @property
    def pending(self) -> bool:
        """True while a changeset's first parts arrived and its last has not."""
        return self.key is not None

    def add(self, key: object, data: bytes, more: bool) -> bytes | None:
        """Add one part; the joined changeset with its last part, else None."""
        if self.key is None:
            if not more:
                self.overflow = None
                if len(data) > self.limit:
                    if not self.discard_over_limit:
                        raise PartsTooLargeError(key, len(data), self.limit)
                    self.overflow = len(data)
                    return b""
                return data
            self.key, self.size, self._parts, self.overflow = key, 0, [], None
        elif key != self.key:
            raise PartOrderError(f"a part of {key} arrived while {self.key} was incomplete")
        self.size += len(data)
        parts = self._parts
        if self.size > self.limit:
            if not self.discard_over_limit:
                size = self.size
                self.reset()
                raise PartsTooLargeError(key, size, self.limit)
            parts = self._parts = None
        elif parts is not None:
            parts.append(data)
        if more:
            return None
        size = self.size
        self.reset()
        if parts is None:
            self.overflow = size
            return b""
        self.overflow = None
        return b"".join(parts)

    def reset(self) -> None:
        """Forget the changeset being assembled."""
        self.key, self.size, self._parts = None, 0, None


def join_download_parts(changesets: list[DownloadChangeset], limit: int) -> list[DownloadChangeset]:
    """Join the parts in a list of downloaded changesets: every run of parts (``more``)
    ending with a part whose ``more`` is false becomes one whole changeset. Raises
    :class:`PartOrderError` if a run mixes changesets or the list ends inside one, and
    :class:`PartsTooLargeError` if one changeset passes ``limit`` bytes."""
    out: list[DownloadChangeset] = []
    assembler = PartAssembler(limit)
    for cs in changesets:
        if not cs.more and not assembler.pending:
            out.append(cs)
            continue
        key = (cs.server_version, cs.origin, cs.client_version)
        whole = assembler.add(key, cs.instructions, cs.more)
        if whole is not None:
            out.append(DownloadChangeset(cs.server_version, cs.origin, cs.client_version, whole))
    if assembler.pending:
        raise PartOrderError(f"changeset {assembler.key} ends without its last part")
    return out
