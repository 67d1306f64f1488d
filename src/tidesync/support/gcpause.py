"""Pausing Python's cyclic garbage collector around allocation-heavy work (shared by the
device's download path and the server's integration)."""

from __future__ import annotations

import gc
import threading


class GCPause:
    """A context manager pausing Python's cyclic garbage collector while allocation-heavy
    work that creates no reference cycles runs (parsing and integrating an upload of
    100,000 instructions otherwise runs dozens of collections over every live object,
    about a third of the time). Re-entrant and shared across threads: the collector
    runs again when the last pause ends (and only if it was enabled when the first
    began); cyclic garbage made meanwhile is collected then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._resume:
                gc.enable()


#: The process's one :class:`GCPause` (the device and the server share it).
gc_paused = GCPause()
