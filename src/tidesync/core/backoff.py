"""Reconnect delays: exponential backoff with jitter, as a pure object (randomness passed in)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """Delays of ``initial * multiplier**n``, capped at ``maximum``, each reduced by a random
    0 to ``jitter`` share. :meth:`reset` starts over (after a connection that worked)."""

    initial: float = 1.0
    maximum: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.25
    _attempt: int = 0

    def next_delay(self, rand: float) -> float:
        """The next delay in seconds; ``rand`` is a uniform random number in [0, 1)."""
        base = min(self.maximum, self.initial * self.multiplier**self._attempt)
        if base < self.maximum:
            self._attempt += 1
        return base * (1.0 - self.jitter * rand)

    def reset(self) -> None:
        """Start again from the initial delay."""
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset (while below the maximum)."""
        return self._attempt
