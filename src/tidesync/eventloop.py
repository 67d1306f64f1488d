"""The event loop that the sync client's thread and the sync server run on.

uvloop where it is installed (it is a dependency on every platform it supports), else the
standard library's loop. uvloop runs the loop's own work (waking up, reading sockets,
scheduling callbacks) several times faster; on loopback that took about 0.15 ms off the
latency from one device's write to another device's notification (docs/benchmarks.md).
``TIDESYNC_EVENT_LOOP=asyncio`` in the environment chooses the standard loop.

:func:`stream_loop` is the running loop an async iterator of the API delivers to, with a
clear error where there is none.
"""

from __future__ import annotations

import asyncio
import os

from .errors import NoEventLoopError


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


def stream_loop() -> asyncio.AbstractEventLoop:
    """The running loop of this thread, for an async iterator made here; raises
    :class:`~tidesync.NoEventLoopError` naming the callback forms where none runs."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise NoEventLoopError(
            "tidesync's async iterators (session.get_progress_stream(), "
            "session.connection_state_changes, results.changes(), obj.changes()) are made "
            "inside a coroutine and read with 'async for'; this thread runs no event loop: "
            "use their callback forms (add_progress_listener, add_connection_state_listener, "
            "add_listener) in plain code (docs/sync-session.md, 'Blocking code')"
        ) from None
