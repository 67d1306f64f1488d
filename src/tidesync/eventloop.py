"""The event loop that the sync client's thread and the sync server run on.

uvloop where it is installed (it is a dependency on every platform it supports), else the
standard library's loop. uvloop runs the loop's own work (waking up, reading sockets,
scheduling callbacks) several times faster; on loopback that took about 0.15 ms off the
latency from one device's write to another device's notification (docs/benchmarks.md).
``TIDESYNC_EVENT_LOOP=asyncio`` in the environment chooses the standard loop.
"""

from __future__ import annotations

import asyncio
import os


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if it is installed and not switched off, else asyncio's."""
    if os.environ.get("TIDESYNC_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
