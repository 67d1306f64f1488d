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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
    ) -> None:
        if transferred < 0 or transferable < 0:
            raise ValueError("progress counters must not be negative")
        self.mode = mode
        self.done = False
        self._base = 0 if from_start else transferred
        self._target: int | None = None
        self._last: SyncProgress | None = None
        self._inputs: tuple[int, int, bool] | None = None
        if known:
            self._target = max(transferable, transferred)

    def update(
        self, transferred: int, transferable: int, *, known: bool = True, complete: bool = False
    ) -> SyncProgress | None:
        """Feed the current counters; returns the progress to report, or None when nothing
        changed (or the tracker is done). ``complete`` says the transfer is known to be
        finished (e.g. the server answered a download-completion request)."""
        if self.done:
            return None
        transferable = max(transferable, transferred)
        if complete:
            known = True
            transferable = transferred
        inputs = (transferred, transferable, known)
        if inputs == self._inputs:
            return None
        self._inputs = inputs
        if self.mode is ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK:
            progress = self._outstanding(transferred, transferable, known)
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

    def _outstanding(self, transferred: int, transferable: int, known: bool) -> SyncProgress:
        if not known and self._target is None:
            return SyncProgress(0.0, 0, 0)
        target = transferable if self._target is None else min(self._target, transferable)
        self._target = target
        total = target - self._base
        done = min(transferred, target) - self._base
        if total <= 0 or done >= total:
            return SyncProgress(1.0, max(total, 0), max(total, 0))
        return SyncProgress(max(0.0, done / total), max(done, 0), total)

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


__all__ = ["ProgressDirection", "ProgressMode", "ProgressTracker", "SyncProgress"]
