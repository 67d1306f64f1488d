"""Cancellation tokens: give any wait a way to be cancelled, or a deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import OperationCancelledError

T = TypeVar("T")


class CancellationToken:
    """Cancel waits from any thread with :meth:`cancel`; a cancelled wait raises
    :class:`~tidesync.OperationCancelledError`, also when the token was cancelled before."""

    def __init__(self) -> None:
        self._cancelled = False
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def is_cancelled(self) -> bool:
        """True once cancelled."""
        return self._cancelled

    def cancel(self) -> None:
        """Cancel every wait using this token (idempotent)."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def _deadline(self) -> float | None:
        return None

    def _on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) on cancel; returns an unregister function."""
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)

                def remove() -> None:
                    with self._lock:
                        if callback in self._callbacks:
                            self._callbacks.remove(callback)

                return remove
        callback()
        return lambda: None


class TimeoutCancellationToken(CancellationToken):
    """A token that cancels itself ``seconds`` after it was made."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        if seconds < 0:
            raise ValueError("the timeout must not be negative")
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    @property
    def is_cancelled(self) -> bool:
        """True once cancelled or past its deadline."""
        return self._cancelled or time.monotonic() >= self._at

    def _deadline(self) -> float | None:
        return self._at


async def await_with_token(
    awaitable: Awaitable[T], token: CancellationToken | None, what: str
) -> T:
    """Await ``awaitable`` unless ``token`` cancels first (then ``OperationCancelledError``)."""
    fut = asyncio.ensure_future(awaitable)
    if token is None:
        return await fut
    if token.is_cancelled:
        fut.cancel()
        raise OperationCancelledError(f"{what} was cancelled")
    loop = asyncio.get_running_loop()
    cancelled = asyncio.Event()

    def on_cancel() -> None:
        loop.call_soon_threadsafe(cancelled.set)

    remove = token._on_cancel(on_cancel)
    stopper = asyncio.ensure_future(cancelled.wait())
    try:
        deadline = token._deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait(
            {fut, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if fut in done:
            return fut.result()
        fut.cancel()
        timed = isinstance(token, TimeoutCancellationToken) and not token._cancelled
        reason = f"timed out after {token.seconds} s" if timed else "was cancelled"  # type: ignore[attr-defined]
        raise OperationCancelledError(f"{what} {reason}")
    finally:
        remove()
        stopper.cancel()
