"""Hybrid logical clocks: a total order over every instruction of every replica.

An :class:`HLC` is ``(wall, counter, origin)``: milliseconds of physical time, a logical
counter that breaks ties and keeps the clock monotone when the wall clock stalls or goes
back, and the id of the replica that made it. Tuples compare lexicographically, so HLCs from
different replicas are totally ordered and two distinct instructions never compare equal.

:class:`HybridClock` is pure: the caller passes the wall time in milliseconds.
"""

from __future__ import annotations

from typing import NamedTuple

#: How far (ms) ahead of a replica's own (corrected) wall clock its HLC clock may go: a
#: remote timestamp further ahead is not adopted by :meth:`HybridClock.observe`
#: (docs/merge.md, "Clocks"). The server refuses uploads further ahead of its clock than
#: its bound (``Limits.max_clock_skew_ms``), which is at most this: every timestamp a
#: server accepted is adopted, and a replica's timestamps after it are accepted too.
MAX_AHEAD_MS = 3_600_000
#: The counter step that keeps a clock that went back (see ``reserved`` in
#: :class:`HybridClock`) from issuing a timestamp it issued before.
RESERVED_SHIFT = 2**32


class HLC(NamedTuple):
    """A hybrid logical timestamp. Compare with ``<``; equal only if the same instruction."""

    wall: int
    counter: int
    origin: str

    def __str__(self) -> str:
        return f"{self.wall}.{self.counter}@{self.origin}"


#: An HLC below every real one (used for "no timestamp yet").
ZERO = HLC(0, 0, "")


class HybridClock:
    """A monotone HLC source for one replica (origin).

    ``reserved`` is ``(wall, shift)`` for a clock that was set back (a replica whose
    clock was ahead, docs/merge.md "Clocks"): it may have issued timestamps up to
    ``wall`` with counters below ``shift``, so every timestamp it issues or adopts with a
    wall at most ``wall`` gets a counter of at least ``shift`` (counters below
    :data:`RESERVED_SHIFT` per millisecond are all one replica can use up), and two
    instructions never share a timestamp.
    """

    __slots__ = ("_counter", "_reserved_wall", "_shift", "_wall", "origin")

    def __init__(
        self, origin: str, last: HLC | None = None, reserved: tuple[int, int] | None = None
    ) -> None:
        if not origin:
            raise ValueError("an HLC origin must be a non-empty string")
        self.origin = origin
        self._wall = last.wall if last is not None else 0
        self._counter = last.counter if last is not None else 0
        self._reserved_wall, self._shift = reserved if reserved is not None else (-1, 0)
        if self._wall <= self._reserved_wall and self._counter < self._shift:
            self._counter = self._shift  # still past ``last``; and ticks stay above the shift

    @property
    def reserved(self) -> tuple[int, int] | None:
        """``(wall, shift)`` of a clock that was set back, else None (see the class)."""
        return None if self._reserved_wall < 0 else (self._reserved_wall, self._shift)

    @property
    def last(self) -> HLC:
        """The latest timestamp issued or observed."""
        return HLC(self._wall, self._counter, self.origin)

    def tick(self, now_ms: int) -> HLC:
        """Issue a new timestamp, later than every one issued or observed before."""
        if now_ms > self._wall:
            self._wall = now_ms
            self._counter = self._shift if now_ms <= self._reserved_wall else 0
        else:
            self._counter += 1
        return HLC(self._wall, self._counter, self.origin)

    def reserve(self, now_ms: int, count: int) -> HLC:
        """Issue ``count`` consecutive timestamps at once; returns the first.

        They are ``(wall, counter + i, origin)`` for ``i`` in ``range(count)``.
        """
        first = self.tick(now_ms)
        if count > 1:
            self._counter += count - 1
        return first

    def observe(self, remote: HLC, now_ms: int) -> bool:
        """Move the clock past a timestamp received from another replica; never raises.

        A timestamp more than :data:`MAX_AHEAD_MS` ahead of ``now_ms`` is not adopted
        (returns False): one far-future timestamp cannot drag this replica's clock, and
        every timestamp it issues later, years ahead. The merge does not depend on it
        (it is a function of the instructions alone); only this replica's later writes
        stay below that timestamp until the wall clock reaches it."""
        wall = remote.wall
        if wall > now_ms + MAX_AHEAD_MS:
            return False
        if (wall, remote.counter) > (self._wall, self._counter):
            counter = remote.counter
            if wall <= self._reserved_wall and counter < self._shift:
                counter = self._shift
            self._wall, self._counter = wall, counter
        return True
