"""Test tools for apps built on tidesync (and for tidesync's own tests).

- :class:`ServerProcess`: a real ``tidesync serve`` process on loopback that a test can stop,
  ``kill -9`` and restart on the same data folder.
"""

from .process import ServerProcess

__all__ = ["ServerProcess"]
