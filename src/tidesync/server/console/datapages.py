"""The console's data pages: a model's objects by query, an object, edit, delete, export.

Everything goes through the Data API's own code (``server/api/``): queries are bound by
:func:`~tidesync.server.api.reads.bind_query` and paged by
:func:`~tidesync.server.api.reads.list_objects`; edits and deletes are parsed by
``building.py`` and committed by :class:`~tidesync.server.api.writes.DataWriter` as an admin
caller, so merge, rules checks of commits and the fan-out to devices are the Data API's.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

from starlette.responses import Response, StreamingResponse

from ...core.jsonvalues import object_to_json
from ...core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..api.access import ApiError, Caller
from ..api.building import DELETE, WriteOp, not_found, parse_update
from ..api.reads import bind_query, list_objects, model_of, parse_pk, read_object
from ..api.writes import writer_of
from ..hub import SyncHub
from ..storage.base import StorageError
from .pages import live_apps
from .web import PREFIX, SECURITY_HEADERS, Ctx, page, redirect

#: Objects per page in the table.
PAGE_SIZE = 50
#: Characters of a value shown in a table cell.
CELL_CHARS = 120
#: Objects per storage page while exporting, and the most pages one export reads.
EXPORT_PAGE = 1000
EXPORT_MAX_PAGES = 100_000


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _object_href(app: str, model: str, pk: Any) -> str:
    query = urlencode({"pk": _json_text(pk)})
    return f"{PREFIX}/data/{quote(app, safe='')}/{quote(model, safe='')}/object?{query}"


def _cells(
    app: str, schema: ModelSchema, obj: dict[str, Any], limit: int | None
) -> list[dict[str, Any]]:
    """One object's fields for display: name, text, and links to follow."""
    out = []
    for f in schema.fields:
        value = obj.get(f.name)
        text = "" if value is None and f.name not in obj else _json_text(value)
        if limit is not None and len(text) > limit:
            text = text[: limit - 1] + "…"
        links: list[tuple[str, str]] = []
        if f.primary_key:
            links = [(text, _object_href(app, schema.name, value))]
        elif f.kind is Kind.LINK and f.target and value is not None:
            targets = value if isinstance(value, list) else [value]
            if isinstance(value, dict):
                targets = list(value.values())
            links = [(_json_text(t), _object_href(app, f.target, t)) for t in targets if t]
        out.append({"field": f, "text": text, "links": links, "type": f.type_name()})
    return out


async def _schemas(hub: SyncHub, app: str) -> dict[str, ModelSchema]:
    try:
        return await hub.storage.get_schemas(app)
    except StorageError as exc:
        raise ApiError(503, f"the storage failed: {exc}", "unavailable") from None


@page
async def data_apps(ctx: Ctx) -> Response:
    """Choose an app."""
    hub = ctx.require_hub()
    app = ctx.request.query_params.get("app", "").strip()
    if app:
        return redirect(f"/data/{quote(app, safe='')}")
    return ctx.render("data_apps.html", nav="data", apps=live_apps(hub))


@page
async def data_models(ctx: Ctx) -> Response:
    """An app's models."""
    hub = ctx.require_hub()
    app = ctx.request.path_params["app"]
    try:
        schemas = await _schemas(hub, app)
    except ApiError as exc:
        return ctx.render("error.html", exc.status, message=exc.message)
    return ctx.render("data_models.html", nav="data", app=app, models=list(schemas.values()))


@page
async def data_table(ctx: Ctx) -> Response:
    """A page of a model's objects matching the query."""
    hub = ctx.require_hub()
    app, name = ctx.request.path_params["app"], ctx.request.path_params["model"]
    params = ctx.request.query_params
    query, args = params.get("query", ""), params.get("args", "")
    sort, desc, after = params.get("sort", ""), params.get("desc") == "1", params.get("after")
    error, objects, nxt, status = None, [], None, 200
    schema = None
    try:
        schemas = await _schemas(hub, app)
        schema = model_of(schemas, name)
        bound = bind_query(schema, schemas, query, args)
        found = await list_objects(
            hub.storage,
            app,
            schema,
            bound,
            None,
            sort=sort or None,
            desc=desc,
            limit=PAGE_SIZE,
            after=after or None,
        )
        objects = [
            _cells(app, schema, object_to_json(schema, v, schemas), CELL_CHARS)
            for v in found.objects
        ]
        nxt = found.next
    except ApiError as exc:
        error, status = exc.message, exc.status
        if schema is None:
            return ctx.render("error.html", status, message=exc.message)
    keep = {"query": query, "args": args, "sort": sort, "desc": "1" if desc else ""}
    keep = {k: v for k, v in keep.items() if v}
    next_href = f"?{urlencode({**keep, 'after': nxt})}" if nxt else None
    export = urlencode(keep)
    return ctx.render(
        "data_table.html",
        status,
        nav="data",
        app=app,
        model=schema,
        objects=objects,
        query=query,
        args=args,
        sort=sort,
        desc=desc,
        error=error,
        next_href=next_href,
        first_href=f"?{urlencode(keep)}" if after else None,
        export=export,
    )


async def _one(ctx: Ctx, pk_text: str) -> tuple[SyncHub, dict[str, ModelSchema], ModelSchema, Any]:
    hub = ctx.require_hub()
    app, name = ctx.request.path_params["app"], ctx.request.path_params["model"]
    schemas = await _schemas(hub, app)
    schema = model_of(schemas, name)
    return hub, schemas, schema, parse_pk(schema, pk_text)


async def _object_page(
    ctx: Ctx, pk_text: str, error: str | None = None, status: int = 200, edited: str = ""
) -> Response:
    app = ctx.request.path_params["app"]
    try:
        hub, schemas, schema, pk = await _one(ctx, pk_text)
        values = await read_object(hub.storage, app, schema, pk, None)
        if values is None:
            raise not_found(schema.name, pk)
    except ApiError as exc:
        return ctx.render("error.html", exc.status, message=exc.message)
    cells = _cells(app, schema, object_to_json(schema, values, schemas), None)
    for cell in cells:
        cell["editable"] = not cell["field"].primary_key
        cell["raw"] = _is_plain_str(cell["field"])
    return ctx.render(
        "data_object.html",
        status,
        nav="data",
        app=app,
        model=schema,
        pk=pk_text,
        cells=cells,
        error=error,
        edited=edited,
        delete_href=_object_href(app, schema.name, pk_text).replace("/object?", "/object/delete?"),
    )


def _is_plain_str(f: FieldSchema) -> bool:
    return f.kind is Kind.STR and f.collection is Collection.NONE and not f.optional


@page
async def data_object(ctx: Ctx) -> Response:
    """One object with every field, each editable."""
    return await _object_page(ctx, ctx.request.query_params.get("pk", ""))


def _form_text(ctx: Ctx, name: str) -> str:
    assert ctx.form is not None
    return ctx.form.get(name, "")


@page
async def data_edit(ctx: Ctx) -> Response:
    """POST ``pk``, ``field``, ``value``: set one field (JSON, or plain text for a str)."""
    pk_text, name, text = (_form_text(ctx, n) for n in ("pk", "field", "value"))
    app = ctx.request.path_params["app"]
    try:
        hub, schemas, schema, pk = await _one(ctx, pk_text)
        f = schema.by_name.get(name)
        if f is None or f.primary_key:
            raise ApiError(400, f"{schema.name} has no editable field {name!r}", "bad_request")
        if _is_plain_str(f):
            value: Any = text
        else:
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ApiError(
                    400, f"{name}: not JSON ({exc}); a string needs double quotes", "bad_value"
                ) from None
        if await read_object(hub.storage, app, schema, pk, None) is None:
            raise not_found(schema.name, pk)
        op = parse_update(schema, schemas, pk, {name: value})
        await writer_of(hub).write(Caller(app, None), schemas, None, [op])
    except ApiError as exc:
        return await _object_page(ctx, pk_text, exc.message, exc.status)
    return await _object_page(ctx, pk_text, edited=name)


@page
async def data_delete_form(ctx: Ctx) -> Response:
    """Ask before deleting."""
    pk_text = ctx.request.query_params.get("pk", "")
    app = ctx.request.path_params["app"]
    try:
        _, _, schema, _ = await _one(ctx, pk_text)
    except ApiError as exc:
        return ctx.render("error.html", exc.status, message=exc.message)
    return ctx.render("data_delete.html", nav="data", app=app, model=schema, pk=pk_text)


@page
async def data_delete(ctx: Ctx) -> Response:
    """POST ``pk``: erase the object, then back to the model's table."""
    pk_text = _form_text(ctx, "pk")
    app = ctx.request.path_params["app"]
    try:
        hub, schemas, schema, pk = await _one(ctx, pk_text)
        if await read_object(hub.storage, app, schema, pk, None) is None:
            raise not_found(schema.name, pk)
        await writer_of(hub).write(
            Caller(app, None), schemas, None, [WriteOp(DELETE, schema.name, pk)]
        )
    except ApiError as exc:
        return ctx.render("error.html", exc.status, message=exc.message)
    return redirect(f"/data/{quote(app, safe='')}/{quote(schema.name, safe='')}")


@page
async def data_export(ctx: Ctx) -> Response:
    """The query's whole result as JSON Lines (``format=jsonl``) or CSV (``format=csv``)."""
    hub = ctx.require_hub()
    app, name = ctx.request.path_params["app"], ctx.request.path_params["model"]
    params = ctx.request.query_params
    kind = params.get("format", "jsonl")
    if kind not in ("jsonl", "csv"):
        return ctx.render("error.html", 400, message="format must be jsonl or csv")
    try:
        schemas = await _schemas(hub, app)
        schema = model_of(schemas, name)
        bound = bind_query(schema, schemas, params.get("query"), params.get("args"))
    except ApiError as exc:
        return ctx.render("error.html", exc.status, message=exc.message)
    names = [f.name for f in schema.fields]
    sort, desc = params.get("sort") or None, params.get("desc") == "1"

    async def lines() -> AsyncIterator[str]:
        if kind == "csv":
            yield _csv_row(names)
        after = None
        for _ in range(EXPORT_MAX_PAGES):
            found = await list_objects(
                hub.storage,
                app,
                schema,
                bound,
                None,
                sort=sort,
                desc=desc,
                limit=EXPORT_PAGE,
                after=after,
            )
            for values in found.objects:
                obj = object_to_json(schema, values, schemas)
                if kind == "jsonl":
                    yield json.dumps(obj, ensure_ascii=False) + "\n"
                else:
                    yield _csv_row(
                        ["" if obj.get(n) is None else _json_text(obj[n]) for n in names]
                    )
            if found.next is None:
                return
            after = found.next

    media = "application/x-ndjson" if kind == "jsonl" else "text/csv; charset=utf-8"
    filename = f"{schema.name}.{kind}"
    headers = {
        **SECURITY_HEADERS,
        "Content-Disposition": f'attachment; filename="{quote(filename)}"',
    }
    return StreamingResponse(lines(), media_type=media, headers=headers)


def _csv_row(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue()
