"""``Results``: the live answer to a query; reading it always reflects the latest state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ..core import query as q
from . import sqlvalues as sv
from .model import Model
from .sqlquery import CompiledQuery, compile_query

if TYPE_CHECKING:
    from .database import LocalDatabase
    from .notify import NotificationToken, ResultsChange

M = TypeVar("M", bound=Model)


class Results(Generic[M]):
    """Objects of one model matching a query, in the query's order (insertion order by
    default). ``len()``, iteration and indexing run against the latest committed state."""

    def __init__(
        self,
        db: LocalDatabase,
        model: type[M],
        parsed: q.Query,
        args: Sequence[Any],
        bound: q.BoundQuery,
        parent: Results[M] | None = None,
    ) -> None:
        self._db = db
        self.model = model
        self._schema = db._schemas[model.__name__]
        compiled = compile_query(bound, db._schemas)
        self._filters: list[CompiledQuery] = [*(parent._filters if parent else []), compiled]
        bound_text: str = getattr(bound, "text", "")
        self.description: str = (
            f"{parent.description} AND ({bound_text})" if parent is not None else bound_text
        )
        self._cache: list[tuple[Any, ...]] | None = None
        self._cache_version: Any = None
        # What a subscription needs to send this query to the server (client/subscriptions.py)
        self._parsed = parsed
        self._args = tuple(args)
        self._parent = parent

    # --- SQL -----------------------------------------------------------------------------

    def _select(self, columns: str) -> tuple[str, list[Any]]:
        where = " AND ".join(f"({f.where})" for f in self._filters) or "1"
        params: list[Any] = []
        for f in self._filters:
            params.extend(f.params)
        order: list[str] = []
        limit: int | None = None
        distinct: list[str] = []
        for f in self._filters:
            if f.order_by:
                order = list(f.order_by)
            if f.limit is not None:
                limit = f.limit if limit is None else min(limit, f.limit)
            if f.distinct:
                distinct = list(f.distinct)
        order.append("t0.rowid")
        sql = f"SELECT {columns} FROM {sv.table_name(self._schema.name)} AS t0 WHERE {where}"
        if distinct:
            sql += f" GROUP BY {', '.join(distinct)}"
        sql += f" ORDER BY {', '.join(order)}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, params

    def _columns(self) -> str:
        return ", ".join(f"t0.{sv.quote(f.name)}" for f in self._schema.fields)

    def snapshot_sql(self) -> tuple[str, list[Any]]:
        """The SQL (and parameters) selecting every field of every matching object."""
        return self._select(self._columns())

    def _rows(self) -> list[tuple[Any, ...]]:
        db = self._db
        db._check_open()
        with db._lock:
            version = db._version()
            if self._cache is not None and self._cache_version == version:
                return self._cache
            sql, params = self.snapshot_sql()
            rows = db._engine.conn.execute(sql, params).fetchall()
        self._cache, self._cache_version = rows, version
        return rows

    def _make(self, row: tuple[Any, ...]) -> M:
        db = self._db
        values = db._decode_row(self._schema, row)
        return db._managed(
            self.model, values[self._schema.primary_key], values, self._cache_version
        )

    # --- sequence protocol ---------------------------------------------------------------

    def __len__(self) -> int:
        """How many objects match, counted by SQLite (no row is fetched) unless this
        version's rows are already loaded."""
        db = self._db
        db._check_open()
        with db._lock:
            if self._cache is not None and self._cache_version == db._version():
                return len(self._cache)
            sql, params = self._select("1")
            row = db._engine.conn.execute(f"SELECT COUNT(*) FROM ({sql})", params).fetchone()
        return int(row[0])

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[M]:
        rows = self._rows()
        return (self._make(r) for r in rows)

    @overload
    def __getitem__(self, index: int) -> M: ...

    @overload
    def __getitem__(self, index: slice) -> list[M]: ...

    def __getitem__(self, index: int | slice) -> M | list[M]:
        rows = self._rows()
        if isinstance(index, slice):
            return [self._make(r) for r in rows[index]]
        return self._make(rows[index])

    def first(self) -> M | None:
        """The first object, or ``None``."""
        rows = self._rows()
        return self._make(rows[0]) if rows else None

    def query(self, query: str, *args: Any) -> Results[M]:
        """Narrow these results further with another query."""
        from .database import _query_arg

        db = self._db
        args = tuple(_query_arg(a) for a in args)
        parsed = q.parse(query)
        bound = q.bind(parsed, self._schema, db._schemas, args)
        return Results(db, self.model, parsed, args, bound, parent=self)

    def __repr__(self) -> str:
        return f"<Results {self.model.__name__} [{self.description}]>"

    # --- notifications -------------------------------------------------------------------

    def add_listener(self, callback: Callable[[ResultsChange], Any]) -> NotificationToken:
        """Call ``callback(change)`` (on the database's notifier thread) after every commit
        that changes these results. Returns a token; ``token.cancel()`` stops it."""
        from .notify import ResultsListener

        return self._db._get_notifier().register(ResultsListener(self, callback))

    def changes(self) -> AsyncIterator[ResultsChange]:
        """An async iterator of :class:`ResultsChange`, one per commit that changes these
        results (registered when called; stop it with ``break`` or ``aclose()``)."""
        from .notify import ChangeStream

        return ChangeStream(self.add_listener)
