"""``ObjectId``: a 12-byte, roughly time-ordered, globally unique identifier.

A value type like :class:`uuid.UUID`: it lives outside ``core/`` because making a new one
reads the clock and the OS's randomness, while ``core/`` and ``protocol/`` only carry and
compare existing ones. Layout (as MongoDB's): 4 bytes of seconds since the epoch, 5 random
bytes fixed per process, 3 bytes of a counter starting at a random value.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

_PROCESS_RANDOM = os.urandom(5)
_COUNTER = itertools.count(int.from_bytes(os.urandom(3), "big"))
_LOCK = threading.Lock()
_PID = os.getpid()


def _process_random() -> bytes:
    global _PROCESS_RANDOM, _PID
    pid = os.getpid()
    if pid != _PID:  # forked: a child must not repeat its parent's ids
        _PROCESS_RANDOM, _PID = os.urandom(5), pid
    return _PROCESS_RANDOM


class ObjectId:
    """A 12-byte identifier; ``ObjectId()`` makes a new one, ``ObjectId(hex_or_bytes)`` parses."""

    __slots__ = ("_bytes",)

    def __init__(self, value: str | bytes | ObjectId | None = None) -> None:
        if value is None:
            with _LOCK:
                count = next(_COUNTER) & 0xFFFFFF
            self._bytes = (
                int(time.time()).to_bytes(4, "big") + _process_random() + count.to_bytes(3, "big")
            )
        elif isinstance(value, ObjectId):
            self._bytes = value._bytes
        elif isinstance(value, bytes):
            if len(value) != 12:
                raise ValueError(f"an ObjectId is 12 bytes, got {len(value)}")
            self._bytes = value
        elif isinstance(value, str):
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raw = b""
            if len(raw) != 12 or len(value) != 24:
                raise ValueError(f"an ObjectId is 24 hex digits, got {value!r}")
            self._bytes = raw
        else:
            raise TypeError(f"cannot make an ObjectId from {type(value).__name__}")

    @classmethod
    def from_bytes(cls, raw: bytes) -> ObjectId:
        """Make an ObjectId from its 12 bytes without checks beyond the length."""
        oid = cls.__new__(cls)
        oid._bytes = raw
        return oid

    @property
    def binary(self) -> bytes:
        """The 12 raw bytes."""
        return self._bytes

    @property
    def generation_time(self) -> int:
        """Seconds since the epoch when this id was made."""
        return int.from_bytes(self._bytes[:4], "big")

    def __str__(self) -> str:
        return self._bytes.hex()

    def __repr__(self) -> str:
        return f"ObjectId('{self._bytes.hex()}')"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ObjectId) and other._bytes == self._bytes

    def __ne__(self, other: Any) -> bool:
        return not self.__eq__(other)

    def __lt__(self, other: ObjectId) -> bool:
        return self._bytes < other._bytes

    def __le__(self, other: ObjectId) -> bool:
        return self._bytes <= other._bytes

    def __gt__(self, other: ObjectId) -> bool:
        return self._bytes > other._bytes

    def __ge__(self, other: ObjectId) -> bool:
        return self._bytes >= other._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)
