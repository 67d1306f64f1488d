"""The Data API's reads: the app's models, one object by primary key, pages of a query.

Objects come from the storage exactly as sync serves them (``read_matching`` and
``get_states``); a user's read rule filters them as it filters that user's bootstraps.

Paging (docs/backend.md, "Data API"):

- without ``sort``, objects come in the storage's primary-key order (the bytewise order of
  the packed key: stable and resumable, not necessarily numeric). ``next`` is an opaque
  cursor (base64url) naming the last key scanned; a page may hold fewer than ``limit``
  objects (a query that matches few objects of a large model is scanned for at most
  :data:`SCAN_SECONDS` per request), and only ``next: null`` means the end.
- with ``sort=field`` (a single-valued field; ``desc=true`` for descending, and ``desc``
  alone sorts by the primary key's value), each page is the next ``limit`` objects in
  ``(field value, packed primary key)`` order, nulls first ascending (NaN last); the
  cursor holds the last object's sort value and key, so an object inserted or changed
  between pages shows up or not according to its place after the cursor, never twice on
  one page. A sorted page reads every matching object (memory: ``limit`` objects).
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import time
from dataclasses import dataclass
from typing import Any

from ...core import query as q
from ...core.jsonvalues import (
    JSONValueError,
    object_converter,
    pk_from_json,
    scalar_from_json,
)
from ...core.packing import pack, unpack
from ...core.schema import Kind, ModelSchema
from ...errors import QueryError
from ..rules import Permissions
from ..storage.base import ServerStorage, StoredObject
from .access import ApiError

#: Objects per page when ``limit`` is not given, and the most a page may ask for.
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
#: Objects read from the storage per step of a scan.
SCAN_BATCH = 1000
#: How long one unsorted request scans for matches before it answers a short page.
SCAN_SECONDS = 2.0
#: Bounds every scan loop (each step reads at least one object or ends).
MAX_STEPS = 10_000_000
_PK_CURSOR, _SORT_CURSOR = 1, 2


def model_of(schemas: dict[str, ModelSchema], name: str) -> ModelSchema:
    """The model ``name`` (404 naming it when the app has none)."""
    schema = schemas.get(name)
    if schema is None:
        known = ", ".join(sorted(schemas)) or "none yet"
        raise ApiError(404, f"the app has no model {name!r} (its models: {known})", "unknown_model")
    return schema


def describe_models(schemas: dict[str, ModelSchema]) -> dict[str, Any]:
    """``GET .../data``: every model with its primary key and fields."""
    models = []
    for name in sorted(schemas):
        schema = schemas[name]
        fields = []
        for f in schema.fields:
            entry: dict[str, Any] = {
                "name": f.name,
                "type": f.type_name(),
                "kind": f.kind.value,
                "collection": f.collection.value if f.is_collection else None,
                "optional": f.optional,
            }
            if f.target is not None:
                entry["target"] = f.target
            fields.append(entry)
        models.append({"name": name, "primary_key": schema.primary_key, "fields": fields})
    return {"models": models}


def parse_pk(schema: ModelSchema, text: str) -> Any:
    """A primary key given in a URL (400 naming the model when it does not fit)."""
    try:
        return pk_from_json(schema, text)
    except JSONValueError as exc:
        raise ApiError(400, str(exc), "invalid_value", {"field": exc.field}) from None


def _json_arg(path: q.BoundPath, value: Any) -> Any:
    """A JSON query argument as ``path`` compares with it (``bind``'s converter)."""
    kind = path.kind
    if kind in (Kind.DATETIME, Kind.DECIMAL, Kind.UUID, Kind.OBJECTID, Kind.BYTES) or (
        kind in (Kind.INT, Kind.COUNTER) and isinstance(value, str)
    ):
        return scalar_from_json(kind, value, path.text)
    return value


def bad_query(exc: QueryError) -> ApiError:
    """A 400 with the parser's message and the position in the query."""
    return ApiError(
        400,
        str(exc),
        "bad_query",
        {"reason": exc.reason, "position": exc.position, "query": exc.query},
    )


def bind_query(
    schema: ModelSchema, schemas: dict[str, ModelSchema], text: str | None, args_text: str | None
) -> q.BoundQuery | None:
    """The bound ``query`` parameter (None: every object); ``args_text`` is a JSON array."""
    args: list[Any] = []
    if args_text:
        try:
            args = json.loads(args_text)
        except ValueError as exc:
            raise ApiError(400, f"args is not valid JSON: {exc}", "bad_request") from None
        if not isinstance(args, list):
            raise ApiError(400, "args must be a JSON array", "bad_request")
    if text is None or not text.strip():
        if args:
            raise ApiError(400, "args were given without a query", "bad_request")
        return None
    try:
        parsed = q.parse(text)
        if parsed.sort or parsed.limit is not None or parsed.distinct:
            raise ApiError(
                400,
                "SORT, LIMIT and DISTINCT are not supported in the query: use the sort, "
                "desc and limit parameters",
                "bad_query",
            )
        return q.bind(parsed, schema, schemas, args, _json_arg)
    except QueryError as exc:
        raise bad_query(exc) from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> Any:
    try:
        return unpack(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error, TypeError):
        raise ApiError(400, "after is not a cursor this API gave", "bad_cursor") from None


@dataclass(frozen=True)
class Page:
    """One page of a listing: the objects' values and the cursor after it (None: end)."""

    objects: list[dict[str, Any]]
    next: str | None


def _sort_key(value: Any, pk: bytes) -> tuple[Any, ...]:
    if value is None:
        return (0, 0, pk)
    if value != value:  # NaN (float or Decimal)
        return (2, 0, pk)
    return (1, value, pk)


class _Desc:
    """Reverses a sort key (for ``heapq.nsmallest`` of a descending page)."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return other.key < self.key


async def list_objects(
    storage: ServerStorage,
    app_id: str,
    schema: ModelSchema,
    bound: q.BoundQuery | None,
    perms: Permissions | None,
    *,
    sort: str | None = None,
    desc: bool = False,
    limit: int = DEFAULT_LIMIT,
    after: str | None = None,
) -> Page:
    """One page of the objects of ``schema`` matching ``bound`` that ``perms`` may read."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}", "bad_request")
    rule = None
    if perms is not None:
        readable, rule = perms.read_filter(schema.name)
        if not readable:
            return Page([], None)
    queries = [bound] if bound is not None else None
    if sort is None and desc:
        sort = schema.primary_key
    if sort is None:
        return await _pk_page(storage, app_id, schema, queries, rule, limit, after)
    field = schema.by_name.get(sort)
    if field is None or field.is_collection:
        raise ApiError(
            400,
            f"sort: {schema.name} has no single-valued field {sort!r}",
            "bad_request",
            {"field": f"{schema.name}.{sort}"},
        )
    return await _sorted_page(storage, app_id, schema, queries, rule, sort, desc, limit, after)


async def _pk_page(
    storage: ServerStorage,
    app_id: str,
    schema: ModelSchema,
    queries: list[q.BoundQuery] | None,
    rule: q.BoundQuery | None,
    limit: int,
    after: str | None,
) -> Page:
    cursor: bytes | None = None
    if after:
        raw = _unb64(after)
        if not (isinstance(raw, list) and len(raw) == 2 and raw[0] == _PK_CURSOR):
            raise ApiError(400, "after is a cursor of another sort order", "bad_cursor")
        if not isinstance(raw[1], bytes):
            raise ApiError(400, "after is not a cursor this API gave", "bad_cursor")
        cursor = raw[1]
    found: list[StoredObject] = []
    deadline = time.monotonic() + SCAN_SECONDS
    for _ in range(MAX_STEPS):
        need = limit - len(found)
        page = await storage.read_matching(
            app_id, schema.name, queries, rule, cursor, max(need, SCAN_BATCH)
        )
        hits = page.objects
        if len(hits) > need:
            hits = hits[:need]
            found.extend(hits)
            cursor = hits[-1].pk
            return _page(schema, found, _b64(pack([_PK_CURSOR, cursor])))
        found.extend(hits)
        cursor = page.cursor
        if page.done or cursor is None:
            return _page(schema, found, None)
        if len(found) >= limit or time.monotonic() > deadline:
            return _page(schema, found, _b64(pack([_PK_CURSOR, cursor])))
    raise ApiError(500, "the scan did not end", "internal")  # pragma: no cover


async def _sorted_page(
    storage: ServerStorage,
    app_id: str,
    schema: ModelSchema,
    queries: list[q.BoundQuery] | None,
    rule: q.BoundQuery | None,
    sort: str,
    desc: bool,
    limit: int,
    after: str | None,
) -> Page:
    start: tuple[Any, ...] | None = None
    if after:
        raw = _unb64(after)
        if not (
            isinstance(raw, list)
            and len(raw) == 6
            and raw[0] == _SORT_CURSOR
            and raw[1] == sort
            and raw[2] == desc
            and isinstance(raw[5], bytes)
        ):
            raise ApiError(400, "after is a cursor of another sort order", "bad_cursor")
        start = (raw[3], raw[4], raw[5])

    def key(obj: StoredObject) -> tuple[Any, ...]:
        assert obj.values is not None
        return _sort_key(obj.values.get(sort), obj.pk)

    best: list[tuple[tuple[Any, ...], StoredObject]] = []
    cursor: bytes | None = None
    for _ in range(MAX_STEPS):
        page = await storage.read_matching(app_id, schema.name, queries, rule, cursor, SCAN_BATCH)
        items = [(key(o), o) for o in page.objects if o.values is not None]
        if start is not None:
            items = [i for i in items if (i[0] < start if desc else i[0] > start)]
        if desc:
            best = heapq.nsmallest(limit + 1, best + items, key=lambda i: _Desc(i[0]))
        else:
            best = heapq.nsmallest(limit + 1, best + items, key=lambda i: i[0])
        cursor = page.cursor
        if page.done or cursor is None:
            break
    more = len(best) > limit
    best = best[:limit]
    nxt = None
    if more:
        last = best[-1][0]
        nxt = _b64(pack([_SORT_CURSOR, sort, desc, last[0], last[1], last[2]]))
    return _page(schema, [o for _, o in best], nxt)


def _page(schema: ModelSchema, found: list[StoredObject], nxt: str | None) -> Page:
    return Page([v for o in found if (v := o.values) is not None], nxt)


async def read_object(
    storage: ServerStorage, app_id: str, schema: ModelSchema, pk: Any, perms: Permissions | None
) -> dict[str, Any] | None:
    """The values of one object (None when there is none, it is erased, or ``perms`` may
    not read it: a user cannot tell an object they may not read from a missing one)."""
    key = (schema.name, pack(pk))
    found = await storage.get_states(app_id, [key])
    obj = found.get(key)
    values = obj.values if obj is not None else None
    if values is None or (perms is not None and not perms.can_read(schema.name, values)):
        return None
    return values


def objects_json(
    schema: ModelSchema, objects: list[dict[str, Any]], schemas: dict[str, ModelSchema]
) -> list[dict[str, Any]]:
    """Stored values in their JSON form."""
    convert = object_converter(schema, schemas)
    return [convert(values) for values in objects]
