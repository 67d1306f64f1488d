"""The asyncio admin client (see :mod:`tidesync.admin`): :class:`AdminClient`'s calls as
coroutines, and the change feed as an async iterator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import httpx

from . import common as c
from . import ops
from .common import AdminAPIError, ChangeEvent, ModelRef, ObjectIn, Transaction


class AsyncAdminClient:
    """The Data API and change feed of one app, from asyncio code (same arguments as
    :class:`~tidesync.admin.AdminClient`). Use ``async with`` or ``await close()``."""

    def __init__(
        self,
        base_url: str,
        app_id: str,
        *,
        api_key: str | None = None,
        access_token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.app_id = app_id
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=c.api_base(base_url, app_id),
            headers=c.auth_headers(api_key, access_token),
            timeout=timeout,
            transport=transport,
        )
        self._schemas = ops.Schemas()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def _send(self, call: c.Call) -> Any:
        try:
            response = await self._http.request(
                call.method,
                call.path,
                params=call.params or None,
                json=call.body,
                timeout=self._timeout + c.waits(call),
            )
        except httpx.HTTPError as exc:
            raise c.unreachable(exc) from exc
        return c.answer(response.status_code, response.content)

    async def _run(self, op: ops.Op) -> Any:
        try:
            request = next(op)
            while True:
                assert isinstance(request, c.Call)
                try:
                    answer = await self._send(request)
                except AdminAPIError as exc:
                    request = op.throw(exc)
                else:
                    request = op.send(answer)
        except StopIteration as done:
            return done.value

    async def _items(self, op: ops.Op) -> AsyncIterator[Any]:
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
                answer = await self._send(step)

    async def models(self) -> list[dict[str, Any]]:
        """The app's models with their fields and types."""
        result: list[dict[str, Any]] = await self._run(ops.models(self._schemas))
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
    ) -> AsyncIterator[dict[str, Any]]:
        """``async for obj in admin.query(...)``: the matching objects, page after page."""
        return self._items(
            ops.query(self._schemas, model, query, args, sort, desc, limit, page_size, raw)
        )

    async def get(self, model: ModelRef, pk: Any) -> dict[str, Any] | None:
        """The object with primary key ``pk``, or None."""
        result: dict[str, Any] | None = await self._run(ops.get(self._schemas, model, pk))
        return result

    async def insert(
        self, model: ModelRef, obj: ObjectIn | Iterable[ObjectIn], *, raw: bool = False
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Create or upsert one object, or several in one commit."""
        result: dict[str, Any] | list[dict[str, Any]] = await self._run(
            ops.insert(self._schemas, model, obj, raw)
        )
        return result

    async def update(self, model: ModelRef, pk: Any, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Set fields of one object; answers it."""
        result: dict[str, Any] = await self._run(ops.update(self._schemas, model, pk, changes))
        return result

    async def delete(self, model: ModelRef, pk: Any) -> None:
        """Erase one object."""
        await self._run(ops.delete(self._schemas, model, pk))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """``async with admin.transaction() as tx:``: one commit at the end of the block."""
        codec = await self._run(ops.schemas_of(self._schemas))
        tx = Transaction(lambda: codec)
        yield tx
        await self._run(ops.transaction(self._schemas, tx))

    def changes(
        self,
        since: Any = None,
        *,
        models: Sequence[str] | None = None,
        query: str | None = None,
        follow: bool = True,
        wait: float = 25.0,
        limit: int | None = None,
    ) -> AsyncIterator[ChangeEvent]:
        """``async for event in admin.changes(since=...)``: the change feed."""
        return self._items(ops.changes(since, models, query, follow, wait, limit))
