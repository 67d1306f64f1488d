"""Hybrid logical clocks: a total order over every instruction of every replica.

An :class:`HLC` is ``(wall, counter, origin)``: milliseconds of physical time, a logical
counter that breaks ties and keeps the clock monotone when the wall clock stalls or goes
back, and the id of the replica that made it. Tuples compare lexicographically, so HLCs from
different replicas are totally ordered and two distinct instructions never compare equal.

:class:`HybridClock` is pure: the caller passes the wall time in milliseconds.
"""

from __future__ import annotations

from typing import NamedTuple

#: How far (ms) a remote timestamp may be ahead of our wall clock before we refuse it.
MAX_DRIFT_MS = 24 * 3600 * 1000


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
    """A monotone HLC source for one replica (origin)."""

    __slots__ = ("_counter", "_wall", "origin")

    def __init__(self, origin: str, last: HLC | None = None) -> None:
        if not origin:
            raise ValueError("an HLC origin must be a non-empty string")
        self.origin = origin
        self._wall = last.wall if last is not None else 0
        self._counter = last.counter if last is not None else 0

    @property
    def last(self) -> HLC:
        """The latest timestamp issued or observed."""
        return HLC(self._wall, self._counter, self.origin)

    def tick(self, now_ms: int) -> HLC:
        """Issue a new timestamp, later than every one issued or observed before."""
        if now_ms > self._wall:
            self._wall, self._counter = now_ms, 0
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

    def observe(self, remote: HLC, now_ms: int) -> None:
        """Move the clock past a timestamp received from another replica."""
        if remote.wall > now_ms + MAX_DRIFT_MS:
            raise ValueError(f"remote timestamp {remote} is too far ahead of the local clock")
        if (remote.wall, remote.counter) > (self._wall, self._counter):
            self._wall, self._counter = remote.wall, remote.counter
