"""Coroutines that cannot be forgotten, and their blocking forms.

Every coroutine of the public API is declared with :func:`awaitable`: calling it returns a
:class:`Call`, an awaitable (a ``collections.abc.Coroutine``, so ``await``,
``asyncio.run``, ``create_task`` and ``gather`` take it) that makes the forgotten ``await``
loud: reading an attribute of it or testing its truth raises :class:`TypeError` at once
("app.log_in() was not awaited ..."), and one dropped without being awaited warns with
:class:`~tidesync.errors.NotAwaitedWarning` pointing at the line that made it.

Every such coroutine ``name`` has a blocking form ``name_blocking`` (:func:`blocking_form`,
:func:`run_blocking`) with the same arguments, result and errors: it runs the coroutine to
completion on a private event loop in the calling thread, and refuses with
:class:`~tidesync.errors.BlockingCallError` in a thread whose event loop is running (there
it would block that loop, or deadlock the sync thread). docs/sync-session.md, "Blocking code".
"""

from __future__ import annotations

import asyncio
import functools
import sys
import warnings
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from ..errors import BlockingCallError, NotAwaitedWarning

P = ParamSpec("P")
T = TypeVar("T")

#: The suffix of every blocking form (``wait_for_upload`` -> ``wait_for_upload_blocking``).
SUFFIX = "_blocking"
_DOC = "docs/sync-session.md, 'Blocking code'"


class Call(Coroutine[Any, Any, T]):
    """What a tidesync coroutine returns: await it (``await session.wait_for_upload()``).

    The coroutine is made on the first ``await`` (or the first step of a task running it),
    so a call never awaited runs nothing; dropping it warns (:class:`NotAwaitedWarning`),
    and using it as if it were the result raises :class:`TypeError` naming the fix."""

    __slots__ = ("_coro", "_make", "_name", "_where")

    def __init__(
        self, make: Callable[[], Coroutine[Any, Any, T]], name: str, where: tuple[str, int]
    ) -> None:
        self._make: Callable[[], Coroutine[Any, Any, T]] | None = make
        self._coro: Coroutine[Any, Any, T] | None = None
        self._name = name
        self._where = where

    def _started(self) -> Coroutine[Any, Any, T]:
        if self._coro is None:
            make, self._make = self._make, None
            if make is None:
                raise RuntimeError(f"{self._name}() was closed before it was awaited")
            self._coro = make()
        return self._coro

    def __await__(self) -> Generator[Any, None, T]:
        return self._started().__await__()

    def send(self, value: Any) -> Any:
        """Step the coroutine (what an event loop's task does)."""
        return self._started().send(value)

    def throw(
        self,
        typ: type[BaseException] | BaseException,
        val: object = None,
        tb: TracebackType | None = None,
    ) -> Any:
        """Raise ``typ`` inside the coroutine (what cancelling a task does)."""
        if isinstance(typ, BaseException):
            exc = typ
        elif isinstance(val, BaseException):
            exc = val
        else:
            exc = typ() if val is None else typ(val)
        return self._started().throw(exc)

    def close(self) -> None:
        """Close the coroutine; one never started is dropped without a warning."""
        self._make = None
        if self._coro is not None:
            self._coro.close()

    def _message(self) -> str:
        return (
            f"{self._name}() was not awaited, so it did nothing: write "
            f"'await {self._name}(...)' in async code, or call "
            f"'{self._name}{SUFFIX}(...)' from plain code ({_DOC})"
        )

    def __bool__(self) -> bool:
        raise TypeError(self._message())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name.startswith("cr_") or name.startswith("gi_"):
            raise AttributeError(name)  # asyncio and inspect probe these on any coroutine
        raise TypeError(f"{self._message()}; reading .{name} of it")

    def __del__(self) -> None:
        if self._make is not None:  # never awaited, never closed
            self._make = None
            filename, lineno = self._where
            try:
                warnings.warn_explicit(self._message(), NotAwaitedWarning, filename, lineno)
            except NotAwaitedWarning:
                raise  # made an error by a warnings filter: reported as unraisable
            except Exception:  # the interpreter is shutting down: nothing left to warn with
                pass

    @property
    def __name__(self) -> str:
        """The coroutine's name, e.g. ``App.log_in`` (a task's repr shows it)."""
        return self._name

    def __repr__(self) -> str:
        return f"<tidesync call {self._name}()>"


def awaitable(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Call[T]]:
    """Declare a public coroutine: calls return a :class:`Call` (see the module docstring)."""
    name = fn.__qualname__

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> Call[T]:
        frame = sys._getframe(1)
        where = (frame.f_code.co_filename, frame.f_lineno)
        return Call(lambda: fn(*args, **kwargs), name, where)

    return call


def refuse_in_running_loop(name: str) -> None:
    """Raise :class:`BlockingCallError` if this thread runs an event loop (``name`` is the
    blocking form, e.g. ``Session.wait_for_upload_blocking``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    plain = name.removesuffix(SUFFIX)
    raise BlockingCallError(
        f"{name}() would block the event loop running in this thread (in a tidesync "
        f"callback: the sync thread's loop, which would deadlock); write "
        f"'await {plain}(...)' here, or run the blocking form in a thread with "
        f"'await asyncio.to_thread(...)' ({_DOC})"
    )


def run_blocking(name: str, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``make()`` to completion on a private event loop in this thread and return its
    result (its errors propagate unchanged); refused where a loop is running."""
    refuse_in_running_loop(name)
    from ..eventloop import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(make())


def blocking_form(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """The blocking form of the coroutine function ``fn`` (a method declared with
    :func:`awaitable`), named ``<name>_blocking``, with its arguments, result and errors."""
    qualname = fn.__qualname__ + SUFFIX

    @functools.wraps(fn)
    def blocking(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_blocking(qualname, lambda: fn(*args, **kwargs))

    blocking.__name__ = fn.__name__ + SUFFIX
    blocking.__qualname__ = qualname
    blocking.__doc__ = (
        f"The blocking form of :meth:`{fn.__name__}`: the same arguments, result and "
        "errors, for code that runs no event loop (raises BlockingCallError in a thread "
        f"whose event loop is running; {_DOC})."
    )
    return blocking
