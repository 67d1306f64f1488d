"""Live collections of managed objects: lists, sets and dicts whose edits become instructions.

Reading one always shows the latest committed state (or the current write's); changing one
is allowed only inside ``db.write()`` and records list/set/dict instructions, so concurrent
edits on several devices merge element by element instead of overwriting each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..core.changeset import Op

if TYPE_CHECKING:
    from .model import Model


class _Managed:
    __slots__ = ("_field", "_obj")

    def __init__(self, obj: Model, field: str) -> None:
        self._obj = obj
        self._field = field

    def _db(self) -> Any:
        db = self._obj._db
        assert db is not None
        return db

    def _raw(self) -> Any:
        return self._db()._read_raw(self._obj, self._field)

    def _snapshot(self) -> Any:
        return self._db()._resolve_collection(self._obj, self._field, self._raw())

    def __len__(self) -> int:
        return len(self._raw())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._snapshot()!r})"


class ManagedList(_Managed):
    """A list field of a managed object."""

    __slots__ = ()

    def __getitem__(self, index: int | slice) -> Any:
        return self._snapshot()[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._snapshot())

    def __contains__(self, value: object) -> bool:
        return value in self._snapshot()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ManagedList):
            other = other._snapshot()
        return bool(self._snapshot() == other)

    __hash__ = None  # type: ignore[assignment]

    def _index(self, index: int, *, insert: bool = False) -> int:
        n = len(self)
        if index < 0:
            index += n
        if insert:
            return max(0, min(index, n))
        if not 0 <= index < n:
            raise IndexError("list index out of range")
        return index

    def insert(self, index: int, value: Any) -> None:
        """Insert ``value`` before position ``index``."""
        self._db()._list_insert(self._obj, self._field, self._index(index, insert=True), value)

    def append(self, value: Any) -> None:
        """Add ``value`` at the end."""
        self._db()._list_insert(self._obj, self._field, len(self), value)

    def extend(self, values: Iterable[Any]) -> None:
        """Append each of ``values``."""
        for v in values:
            self.append(v)

    def __setitem__(self, index: int, value: Any) -> None:
        self._db()._list_set(self._obj, self._field, self._index(index), value)

    def __delitem__(self, index: int) -> None:
        self._db()._list_erase(self._obj, self._field, self._index(index))

    def pop(self, index: int = -1) -> Any:
        """Remove and return the element at ``index``."""
        i = self._index(index)
        value = self._snapshot()[i]
        self._db()._list_erase(self._obj, self._field, i)
        return value

    def remove(self, value: Any) -> None:
        """Remove the first element equal to ``value``."""
        i = self._snapshot().index(value)
        self._db()._list_erase(self._obj, self._field, i)

    def move(self, source: int, destination: int) -> None:
        """Move the element at ``source`` to ``destination`` (an erase plus an insert)."""
        value = self.pop(source)
        self.insert(destination, value)

    def clear(self) -> None:
        """Remove every element."""
        self._obj._write(self._field, [])

    def index(self, value: Any) -> int:
        """Position of the first element equal to ``value``."""
        return int(self._snapshot().index(value))


class ManagedSet(_Managed):
    """A set field of a managed object."""

    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._snapshot())

    def __contains__(self, value: object) -> bool:
        return value in self._snapshot()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ManagedSet):
            other = other._snapshot()
        return bool(self._snapshot() == other)

    __hash__ = None  # type: ignore[assignment]

    def add(self, value: Any) -> None:
        """Add ``value``."""
        self._db()._element_op(self._obj, self._field, Op.SET_ADD, value=value)

    def discard(self, value: Any) -> None:
        """Remove ``value`` if present."""
        if value in self:
            self._db()._element_op(self._obj, self._field, Op.SET_REMOVE, value=value)

    def remove(self, value: Any) -> None:
        """Remove ``value``; ``KeyError`` if absent."""
        if value not in self:
            raise KeyError(value)
        self._db()._element_op(self._obj, self._field, Op.SET_REMOVE, value=value)

    def update(self, values: Iterable[Any]) -> None:
        """Add each of ``values``."""
        for v in values:
            self.add(v)

    def clear(self) -> None:
        """Remove every element."""
        self._obj._write(self._field, set())


class ManagedDict(_Managed):
    """A ``dict[str, T]`` field of a managed object."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        return self._snapshot()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshot())

    def __contains__(self, key: object) -> bool:
        return key in self._snapshot()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ManagedDict):
            other = other._snapshot()
        return bool(self._snapshot() == other)

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: str, default: Any = None) -> Any:
        """The value for ``key``, or ``default``."""
        return self._snapshot().get(key, default)

    def keys(self) -> Any:
        """The keys."""
        return self._snapshot().keys()

    def values(self) -> Any:
        """The values."""
        return self._snapshot().values()

    def items(self) -> Any:
        """The ``(key, value)`` pairs."""
        return self._snapshot().items()

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"dict keys are str, got {type(key).__name__}")
        self._db()._element_op(self._obj, self._field, Op.DICT_SET, key=key, value=value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._db()._element_op(self._obj, self._field, Op.DICT_ERASE, key=key)

    def pop(self, key: str, *default: Any) -> Any:
        """Remove ``key`` and return its value."""
        snap = self._snapshot()
        if key not in snap:
            if default:
                return default[0]
            raise KeyError(key)
        del self[key]
        return snap[key]

    def update(self, other: Any = (), **kwargs: Any) -> None:
        """Set several keys."""
        for k, v in dict(other, **kwargs).items():
            self[k] = v

    def clear(self) -> None:
        """Remove every key."""
        self._obj._write(self._field, {})
