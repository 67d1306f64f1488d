"""``session.status``: one frozen value that says where a sync session stands, in words too.

:class:`SyncStatus` is read from the session's worker (connection state, what waits to be
uploaded, what the server said remains to download, the last error) and its connection
(failed attempts since the last good connection, when the next try comes). ETAs come from
the rate measured in this session (:class:`RateMeter`: bytes acknowledged / applied over the
last seconds). :func:`describe` is the pure formatting of ``str(status)``. :class:`StatusFeed`
tells listeners of changes at most every :data:`MIN_INTERVAL` seconds.
docs/sync-session.md, "Session status".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SyncAction
from ..protocol.session import ConnectionState

log = logging.getLogger("tidesync.session")

#: Least seconds between two status reports to listeners (changes meanwhile are merged).
MIN_INTERVAL = 0.1
#: Seconds of transfer history the rates are measured over.
RATE_WINDOW = 10.0


@dataclass(frozen=True)
class ErrorReport:
    """The last error the session reported: code, message, what the client does about it
    (``action``) and when (UTC)."""

    code: int
    message: str
    action: SyncAction
    when: dt.datetime


@dataclass(frozen=True)
class SyncStatus:
    """Where a sync session stands (``session.status``); ``str()`` says it in words.

    ``since`` is when ``connection_state`` began; ``attempt`` counts failed connection
    attempts since the last good connection; ``next_retry_at`` is when the client tries again
    (None unless waiting to); the ETAs are seconds from this session's measured rate (None
    when unknown); ``last_synced_at`` is when the server last acknowledged uploads or a
    download was applied."""

    connection_state: ConnectionState
    pending_changes: int = 0
    pending_upload_bytes: int = 0
    download_remaining_bytes: int = 0
    last_error: ErrorReport | None = None
    attempt: int = 0
    next_retry_at: dt.datetime | None = None
    upload_eta: float | None = None
    download_eta: float | None = None
    last_synced_at: dt.datetime | None = None
    since: dt.datetime | None = None

    def __str__(self) -> str:
        return describe(self, dt.datetime.now(dt.UTC))


def format_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``12 KiB``, ``3.4 MiB``..."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    """``0 s``, ``12 s``, ``3 min 5 s``, ``2 h 4 min``."""
    n = max(0, round(s))
    if n < 60:
        return f"{n} s"
    if n < 3600:
        return f"{n // 60} min {n % 60} s" if n % 60 else f"{n // 60} min"
    return f"{n // 3600} h {n % 3600 // 60} min"


def describe(status: SyncStatus, now: dt.datetime, tz: dt.tzinfo | None = None) -> str:
    """``str(status)`` at ``now``: e.g. "offline since 14:02:11, 37 changes (12 KiB)
    waiting, next try in 12 s (attempt 5: connection refused)". Times in ``tz`` (None: the
    machine's time zone)."""

    def clock(t: dt.datetime) -> str:
        return t.astimezone(tz).strftime("%H:%M:%S")

    state = status.connection_state
    if state is ConnectionState.CONNECTED:
        head = "online"
    elif state is ConnectionState.CONNECTING:
        head = "connecting"
    else:
        head = "offline"
    if status.since is not None and state is not ConnectionState.CONNECTING:
        head += f" since {clock(status.since)}"
    parts = [head]
    if status.pending_changes:
        n = status.pending_changes
        what = f"{n} change{'s' if n != 1 else ''} ({format_bytes(status.pending_upload_bytes)})"
        if state is ConnectionState.CONNECTED:
            eta = status.upload_eta
            parts.append(what + " uploading" + (f", about {format_seconds(eta)}" if eta else ""))
        else:
            parts.append(what + " waiting")
    if status.download_remaining_bytes and state is ConnectionState.CONNECTED:
        eta = status.download_eta
        text = f"{format_bytes(status.download_remaining_bytes)} to download"
        parts.append(text + (f", about {format_seconds(eta)}" if eta else ""))
    if (
        state is ConnectionState.CONNECTED
        and not status.pending_changes
        and not status.download_remaining_bytes
    ):
        synced = status.last_synced_at
        parts.append(f"synced at {clock(synced)}" if synced is not None else "up to date")
    if status.next_retry_at is not None and state is ConnectionState.DISCONNECTED:
        left = (status.next_retry_at - now).total_seconds()
        parts.append(f"next try in {format_seconds(left)}")
    if status.attempt and state is not ConnectionState.CONNECTED:
        why = f": {status.last_error.message}" if status.last_error is not None else ""
        parts[-1] += f" (attempt {status.attempt}{why})"
    return ", ".join(parts)


class RateMeter:
    """Bytes per second of a cumulative counter over the last :data:`RATE_WINDOW` seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        """The counter's value at ``now`` (monotonic seconds)."""
        samples = self._samples
        if samples and total < samples[-1][1]:
            samples.clear()  # the counter started over (a client reset)
        if not samples or samples[-1][1] != total:
            samples.append((now, total))
        while len(samples) > 2 and samples[0][0] < now - RATE_WINDOW:
            samples.popleft()

    def rate(self, now: float) -> float | None:
        """Bytes per second, or None when not measured (fewer than two samples, or
        nothing moved within the window)."""
        samples = self._samples
        if len(samples) < 2 or samples[-1][0] < now - RATE_WINDOW:
            return None
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        if t1 - t0 <= 0 or b1 <= b0:
            return None
        return (b1 - b0) / (t1 - t0)

    def eta(self, now: float, remaining: int) -> float | None:
        """Seconds to move ``remaining`` bytes at the measured rate (0.0 if none)."""
        if remaining <= 0:
            return 0.0
        rate = self.rate(now)
        return None if rate is None else remaining / rate


class StatusFeed:
    """The status listeners of a session: :meth:`changed` (on the sync loop) reports the
    new status at once, or after :data:`MIN_INTERVAL` since the last report; a status equal
    to the last one reported is not reported again."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float],
        read: Callable[[], SyncStatus],
    ) -> None:
        self._loop = loop
        self._clock = clock
        self._read = read
        self.listeners: list[Callable[[SyncStatus], Any]] = []
        self._last_at: float | None = None
        self._last: SyncStatus | None = None
        self._timer: asyncio.TimerHandle | None = None

    def changed(self) -> None:
        """Something the status shows changed (sync loop)."""
        if not self.listeners or self._timer is not None:
            return
        now = self._clock()
        wait = 0.0 if self._last_at is None else self._last_at + MIN_INTERVAL - now
        if wait > 0:
            self._timer = self._loop.call_later(wait, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        self._timer = None
        if not self.listeners:
            return
        try:
            status = self._read()
        except Exception:
            log.debug("the session status could not be read", exc_info=True)
            return
        if status == self._last:
            return
        self._last, self._last_at = status, self._clock()
        for cb in list(self.listeners):
            try:
                cb(status)
            except Exception:
                log.exception("a status listener failed")

    def close(self) -> None:
        """No more reports (the session ended)."""
        self.listeners.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["ErrorReport", "RateMeter", "StatusFeed", "SyncStatus", "describe", "format_bytes"]
