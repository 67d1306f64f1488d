"""History retention: a periodic task that trims sync history older than a period.

The log has no timestamps, so the trimmer samples each app's latest server version as time
goes by: the version that was latest ``retention`` seconds ago marks everything at least that
old, and is trimmed (``ServerStorage.trim_history``). Samples live in memory, so after a
restart trimming resumes one period later (it only ever keeps more than asked, never less).
Apps are tracked from the moment the hub sees them (a bound session or a commit).

Devices whose download cursor falls behind the trimmed point get ERROR 211 and reset
(``docs/client-reset.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from .storage.base import ServerStorage, StorageError

log = logging.getLogger("tidesync.server.retention")

#: The longest pause between two trimming rounds, in seconds.
MAX_INTERVAL = 60.0
#: The shortest pause between two rounds (tests use tiny retention periods).
MIN_INTERVAL = 0.05


class HistoryTrimmer:
    """Trims each known app's history older than ``retention`` seconds, every ``interval``.

    ``start()`` launches the task on the running loop; ``aclose()`` cancels it and returns
    once it has ended.
    """

    def __init__(
        self, storage: ServerStorage, retention: float, clock: Callable[[], float]
    ) -> None:
        if retention <= 0:
            raise ValueError("the retention period must be positive")
        self.storage = storage
        self.retention = retention
        self.clock = clock
        self.interval = max(MIN_INTERVAL, min(retention / 4, MAX_INTERVAL))
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._task: asyncio.Task[None] | None = None
        #: Log entries trimmed so far (for tests and diagnostics).
        self.trimmed_total = 0

    def note_app(self, app_id: str) -> None:
        """Start tracking ``app_id`` (idempotent)."""
        self._samples.setdefault(app_id, deque())

    def start(self) -> None:
        """Run the trimming rounds in a task on the current event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tidesync-history-trimmer"
            )

    async def aclose(self) -> None:
        """Stop the task; returns when it has ended."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.trim_once()
            except StorageError:
                log.exception("trimming the sync history failed; trying again later")
            await asyncio.sleep(self.interval)

    async def trim_once(self) -> int:
        """One round: sample every app's latest version, trim what is older than the
        period. Returns how many log entries were deleted."""
        deleted = 0
        for app_id, samples in list(self._samples.items()):
            now = self.clock()
            samples.append((now, await self.storage.latest_version(app_id)))
            cutoff = now - self.retention
            point = 0
            while samples and samples[0][0] <= cutoff:
                point = samples.popleft()[1]
            if point > 0:
                samples.appendleft((cutoff, point))  # keep the mark for the next round
                n = await self.storage.trim_history(app_id, point)
                if n:
                    log.info(
                        "app %s: trimmed %d history entries up to version %d", app_id, n, point
                    )
                deleted += n
        self.trimmed_total += deleted
        return deleted
