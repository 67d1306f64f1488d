"""Sync progress on the sync thread: the listeners the app registers, and the upload byte
counters read from the change log (the download counters live in the session core,
protocol/session.py; the arithmetic of a progress value is core/progress.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..core.progress import ProgressDirection, ProgressMode, ProgressTracker, SyncProgress
from ..store.engine import StoreEngine

log = logging.getLogger("tidesync.sync")


class UploadCounter:
    """Cumulative upload bytes since the worker started: committed (transferable) and
    acknowledged (transferred), counted from the change log as it grows."""

    def __init__(self, acked: int) -> None:
        self.scanned = acked  # the newest version counted
        self.pending: list[tuple[int, int]] = []  # (version, size) not yet acknowledged
        self.transferred = 0
        self.transferable = 0

    def scan(self, engine: StoreEngine, acked: int) -> None:
        """Count local changesets committed since the last scan, and acknowledged ones."""
        for version, size in engine.changelog_sizes(max(self.scanned, acked)):
            self.pending.append((version, size))
            self.transferable += size
            self.scanned = version
        pending = self.pending
        n = 0
        while n < len(pending) and pending[n][0] <= acked:
            self.transferred += pending[n][1]
            n += 1
        if n:
            del pending[:n]

    def discarded(self, last_version: int) -> None:
        """A client reset dropped the unacknowledged writes: they count as done."""
        self.transferred += sum(size for _, size in self.pending)
        self.pending.clear()
        self.scanned = last_version

    def renumbered(self, acked: int, gap: int) -> None:
        """The changesets after ``acked`` moved down by ``gap`` versions."""
        self.pending = [(v - gap if v > acked else v, n) for v, n in self.pending]
        self.scanned = max(acked, self.scanned - gap)


class ProgressListener:
    """A progress listener as the sync loop keeps it: ``deliver`` gets each value, ``end``
    is called once when the listener is finished (done, or the session closed)."""

    def __init__(
        self,
        direction: ProgressDirection,
        mode: ProgressMode,
        deliver: Callable[[SyncProgress], None],
        end: Callable[[], None] | None = None,
        *,
        from_start: bool = False,
    ) -> None:
        self.direction = direction
        self.mode = mode
        self._deliver = deliver
        self._end = end
        self.from_start = from_start
        self.tracker: ProgressTracker | None = None
        self.cancelled = False
        self.ended = False

    def deliver(self, progress: SyncProgress) -> None:
        """Hand a value to the listener (errors in it are logged, never raised here)."""
        if self.cancelled:
            return
        try:
            self._deliver(progress)
        except Exception:
            log.exception("a progress listener failed")

    def end(self) -> None:
        """Tell the listener no more values come (once)."""
        if self.ended:
            return
        self.ended = True
        if self._end is not None:
            try:
                self._end()
            except Exception:
                log.exception("a progress listener failed")
