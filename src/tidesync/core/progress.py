"""Progress math: turn a session's byte counters into ``SyncProgress`` estimates.

Pure: no I/O, no clock. A session keeps two cumulative counters per direction,
``transferred`` (upload: bytes the server *acknowledged*; download: bytes applied locally) and
``transferable`` (transferred plus what is still outstanding). A :class:`ProgressTracker` per
listener turns successive counter values into estimates with the semantics of its
:class:`ProgressMode`:

- ``FOR_CURRENTLY_OUTSTANDING_WORK``: the share done of the work outstanding at registration.
  The target may only shrink (a server estimate can fall, e.g. when entries turn out not to be
  for this client), never grow with work that arrives later. Estimates never decrease, and
  the tracker is done once it has reported 1.0 (at once when there was nothing to do).
- ``REPORT_INDEFINITELY``: the share done of all work since the count last restarted; the count
  restarts when new work arrives after everything was done. Never done by itself.

An *unknown* total (``known=False``: the other side has not said what is outstanding yet,
e.g. a download while paused or before the first DOWNLOAD of a binding) never completes a
tracker and never moves its target: a tracker that has no target yet reports 0.0 and waits;
one that has a target keeps it (``FOR_CURRENTLY_OUTSTANDING_WORK``) or keeps its last value
(``REPORT_INDEFINITELY``) until the total is known again.

Bytes are an estimate (a flexible-sync DOWNLOAD may send an object whole where the server
counted its log entry), so a download's outstanding work also has a *position*: the
server's latest version when the target was fixed (``latest``). The tracker completes only
once the download cursor (``cursor``) reached it; until then a byte count that says
"done" reports just below 1.0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The highest estimate of outstanding work that is not finished yet.
ALMOST_DONE = 0.999


class ProgressDirection(enum.Enum):
    """Which transfer a progress listener follows."""

    UPLOAD = "upload"
    DOWNLOAD = "download"


class ProgressMode(enum.Enum):
    """How a progress listener counts (see the module docstring)."""

    REPORT_INDEFINITELY = "report_indefinitely"
    FOR_CURRENTLY_OUTSTANDING_WORK = "for_currently_outstanding_work"


@dataclass(frozen=True)
class SyncProgress:
    """One progress report: ``progress_estimate`` in [0.0, 1.0], and the bytes of the tracked
    work done (``transferred_bytes``) out of its total (``transferable_bytes``)."""

    progress_estimate: float
    transferred_bytes: int = 0
    transferable_bytes: int = 0

    @property
    def is_complete(self) -> bool:
        """True when the estimate is 1.0."""
        return self.progress_estimate >= 1.0


class ProgressTracker:
    """One listener's view of a pair of cumulative counters.

    ``known`` says whether ``transferable`` is known yet (a download's remaining bytes are
    unknown until the server's first DOWNLOAD); ``from_start`` counts the work from zero
    instead of from the counters' value at registration (used for the initial download).
    """

    def __init__(
        self,
        mode: ProgressMode,
        transferred: int,
        transferable: int,
        *,
        known: bool = True,
        from_start: bool = False,
        latest: int = 0,
    ) -> None:
        if transferred < 0 or transferable < 0:
            raise ValueError("progress counters must not be negative")
        self.mode = mode
        self.done = False
        self._base = 0 if from_start else transferred
        self._target: int | None = None
        self._last: SyncProgress | None = None
        self._inputs: tuple[int, int, bool, int] | None = None
        #: The version the download cursor must reach before the tracker completes.
        self._goal = 0
        if known:
            self._target = max(transferable, transferred)
            self._goal = latest

    def update(
        self,
        transferred: int,
        transferable: int,
        *,
        known: bool = True,
        complete: bool = False,
        cursor: int = 0,
        latest: int = 0,
    ) -> SyncProgress | None:
        """Feed the current counters; returns the progress to report, or None when nothing
        changed (or the tracker is done). ``complete`` says the transfer is known to be
        finished (e.g. the server answered a download-completion request). ``cursor`` and
        ``latest`` are the download cursor and the server's latest version (0 for an
        upload)."""
        if self.done:
            return None
        transferable = max(transferable, transferred)
        if complete:
            known = True
            transferable = transferred
            cursor = max(cursor, self._goal)
        if known and self._target is None:
            self._goal = latest
        inputs = (transferred, transferable, known, cursor)
        if inputs == self._inputs:
            return None
        self._inputs = inputs
        if not known and self._last is not None and self.mode is ProgressMode.REPORT_INDEFINITELY:
            return None  # nothing to say until the total is known again
        if self.mode is ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK:
            progress = self._outstanding(transferred, transferable, known, cursor)
        else:
            progress = self._indefinite(transferred, transferable, known)
        last = self._last
        if self.mode is ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK and last is not None:
            if progress.progress_estimate < last.progress_estimate:
                progress = SyncProgress(
                    last.progress_estimate, progress.transferred_bytes, progress.transferable_bytes
                )
        if self.mode is ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK and progress.is_complete:
            self.done = True
        if last is not None and progress == last and not progress.is_complete:
            return None
        self._last = progress
        return progress

    def _outstanding(
        self, transferred: int, transferable: int, known: bool, cursor: int
    ) -> SyncProgress:
        if not known:
            if self._target is None:
                return SyncProgress(0.0, 0, 0)
            target = self._target  # an unknown total neither fixes nor shrinks the target
        else:
            target = transferable if self._target is None else min(self._target, transferable)
            self._target = target
        total = target - self._base
        done = min(transferred, target) - self._base
        if total <= 0 or done >= total:
            if cursor >= self._goal:
                return SyncProgress(1.0, max(total, 0), max(total, 0))
            # the bytes say done, the cursor says not yet: just below 1.0
            return SyncProgress(ALMOST_DONE, max(total, 0), max(total, 0))
        return SyncProgress(min(ALMOST_DONE, max(0.0, done / total)), max(done, 0), total)

    def _indefinite(self, transferred: int, transferable: int, known: bool) -> SyncProgress:
        if not known:
            return SyncProgress(0.0, 0, 0)
        base = min(self._base, transferred)
        if transferred >= transferable:
            self._base = transferred
            return SyncProgress(1.0, transferred - base, transferred - base)
        total = transferable - base
        done = transferred - base
        return SyncProgress(done / total, done, total)


__all__ = ["ALMOST_DONE", "ProgressDirection", "ProgressMode", "ProgressTracker", "SyncProgress"]
