"""Test tools for apps built on tidesync (and for tidesync's own tests).

- :class:`ServerProcess`: a real ``tidesync serve`` process on loopback that a test can stop,
  ``kill -9`` and restart on the same data folder.
- :class:`FaultProxy`: a loopback TCP proxy that cuts, stalls, delays, throttles and drops
  connections on command or at random (seeded).
- :class:`TestServer`: an in-process sync server on its own thread, optionally behind a
  :class:`FaultProxy`.
"""

from .process import ServerProcess
from .proxy import FaultProxy, FaultStats
from .server import TestServer, test_server

__all__ = ["FaultProxy", "FaultStats", "ServerProcess", "TestServer", "test_server"]
