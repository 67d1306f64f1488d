"""The blocking admin client (see :mod:`tidesync.admin`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Self

import httpx

from . import common as c
from . import ops
from .common import AdminAPIError, ChangeEvent, ModelRef, ObjectIn, Transaction


class AdminClient:
    """The Data API and change feed of one app, from blocking code.

    ``api_key``: one of the server's ``[server] admin_keys`` (every object, rules not
    applied); or ``access_token``: a user's (the app's rules apply). ``timeout`` bounds
    each HTTP call (a long poll adds its ``wait``). Not for use by several threads at once.
    """

    def __init__(
        self,
        base_url: str,
        app_id: str,
        *,
        api_key: str | None = None,
        access_token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.app_id = app_id
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=c.api_base(base_url, app_id),
            headers=c.auth_headers(api_key, access_token),
            timeout=timeout,
            transport=transport,
        )
        self._schemas = ops.Schemas()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def _send(self, call: c.Call) -> Any:
        try:
            response = self._http.request(
                call.method,
                call.path,
                params=call.params or None,
                json=call.body,
                timeout=self._timeout + c.waits(call),
            )
        except httpx.HTTPError as exc:
            raise c.unreachable(exc) from exc
        return c.answer(response.status_code, response.content)

    def _run(self, op: ops.Op) -> Any:
        """Drive a call that yields requests only."""
        try:
            request = next(op)
            while True:
                assert isinstance(request, c.Call)
                try:
                    answer = self._send(request)
                except AdminAPIError as exc:
                    request = op.throw(exc)
                else:
                    request = op.send(answer)
        except StopIteration as done:
            return done.value

    def _items(self, op: ops.Op) -> Iterator[Any]:
        """Drive a call that yields results too."""
        answer: Any = None
        while True:
            try:
                step = op.send(answer)
            except StopIteration:
                return
            if isinstance(step, ops.Item):
                answer = None
                yield step.value
            else:
                answer = self._send(step)

    def models(self) -> list[dict[str, Any]]:
        """The app's models with their fields and types (as the server answers them)."""
        result: list[dict[str, Any]] = self._run(ops.models(self._schemas))
        return result

    def query(
        self,
        model: ModelRef,
        query: str | None = None,
        *args: Any,
        sort: str | None = None,
        desc: bool = False,
        limit: int | None = None,
        page_size: int = 500,
        raw: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """The objects matching ``query`` (the query language, ``$0``... for ``args``),
        page after page; at most ``limit`` of them. ``raw``: values in their JSON form (as
        the API answers them) instead of Python values."""
        return self._items(
            ops.query(self._schemas, model, query, args, sort, desc, limit, page_size, raw)
        )

    def get(self, model: ModelRef, pk: Any) -> dict[str, Any] | None:
        """The object with primary key ``pk``, or None."""
        result: dict[str, Any] | None = self._run(ops.get(self._schemas, model, pk))
        return result

    def insert(
        self, model: ModelRef, obj: ObjectIn | Iterable[ObjectIn], *, raw: bool = False
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Create (or upsert, as a device's ``add(update=True)``) one object, or several in
        one commit; answers the stored object(s)."""
        result: dict[str, Any] | list[dict[str, Any]] = self._run(
            ops.insert(self._schemas, model, obj, raw)
        )
        return result

    def update(self, model: ModelRef, pk: Any, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Set fields of one object (``{"field": {"$inc": n}}`` for a counter); answers it."""
        result: dict[str, Any] = self._run(ops.update(self._schemas, model, pk, changes))
        return result

    def delete(self, model: ModelRef, pk: Any) -> None:
        """Erase one object (:class:`AdminAPIError` 404 when there is none)."""
        self._run(ops.delete(self._schemas, model, pk))

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """``with admin.transaction() as tx: tx.insert(...); tx.update(...)``: one commit
        when the block ends without an exception; nothing when it raises."""
        codec = self._run(ops.schemas_of(self._schemas))
        tx = Transaction(lambda: codec)
        yield tx
        self._run(ops.transaction(self._schemas, tx))

    def changes(
        self,
        since: Any = None,
        *,
        models: Sequence[str] | None = None,
        query: str | None = None,
        follow: bool = True,
        wait: float = 25.0,
        limit: int | None = None,
    ) -> Iterator[ChangeEvent]:
        """The change feed from cursor ``since`` (None: from the start), following new
        changes as they commit (``follow=False``: stop once caught up). Resume later from
        the last event's ``cursor``."""
        return self._items(ops.changes(since, models, query, follow, wait, limit))
