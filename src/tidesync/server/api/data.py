"""The Data API's routes, under ``/api/v1/apps/{app_id}/data`` (docs/backend.md).

==========================================  ============================================
``GET    .../data``                          the app's models, fields and types
``GET    .../data/{Model}``                  a page: ``query``, ``args``, ``sort``,
                                             ``desc``, ``limit``, ``after``
``POST   .../data/{Model}``                  create or upsert one object or an array
``GET    .../data/{Model}/{pk}``             one object (404 if none)
``PATCH  .../data/{Model}/{pk}``             change fields (``$inc``, ``$push``, ...)
``DELETE .../data/{Model}/{pk}``             erase it
``POST   .../data/_transaction``             operations applied in one commit, or none
==========================================  ============================================

Reads: :mod:`.reads`; operations: :mod:`.building`; the commit path: :mod:`.writes`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ...core.changeset import Instruction
from ...core.jsonvalues import object_converter, object_reader, object_to_json
from ...core.merge import created_values
from ...core.schema import ModelSchema
from ..hub import SyncHub
from ..rules import Permissions
from ..storage.base import ObjectKey, StorageError, StoredObject
from .access import ApiError, Caller, endpoint, json_body
from .building import (
    CREATE,
    DELETE,
    UPDATE,
    WriteOp,
    not_found,
    parse_create,
    parse_pk_json,
    parse_update,
)
from .perms import permissions_of
from .reads import (
    DEFAULT_LIMIT,
    bind_query,
    describe_models,
    list_objects,
    model_of,
    objects_json,
    parse_pk,
    read_object,
)
from .writes import writer_of

DATA_PATH = "/api/v1/apps/{app_id}/data"


async def _schemas(hub: SyncHub, app_id: str) -> dict[str, ModelSchema]:
    try:
        return await hub.storage.get_schemas(app_id)
    except StorageError as exc:
        raise ApiError(503, f"the storage failed: {exc}", "unavailable") from None


def _flag(request: Request, name: str) -> bool:
    text = request.query_params.get(name, "false").strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ApiError(400, f"{name} must be true or false, got {text!r}", "bad_request")


def _limit(request: Request) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, got {text!r}", "bad_request") from None


async def _models(request: Request, hub: SyncHub, caller: Caller) -> Response:
    return JSONResponse(describe_models(await _schemas(hub, caller.app_id)))


async def _collection(request: Request, hub: SyncHub, caller: Caller) -> Response:
    schemas = await _schemas(hub, caller.app_id)
    schema = model_of(schemas, request.path_params["model"])
    perms = await permissions_of(hub, caller, schemas)
    if request.method == "GET":
        params = request.query_params
        bound = bind_query(schema, schemas, params.get("query"), params.get("args"))
        page = await list_objects(
            hub.storage,
            caller.app_id,
            schema,
            bound,
            perms,
            sort=params.get("sort") or None,
            desc=_flag(request, "desc"),
            limit=_limit(request),
            after=params.get("after") or None,
        )
        objects = objects_json(schema, page.objects, schemas)
        return JSONResponse({"objects": objects, "next": page.next})
    body = await json_body(request)
    many = isinstance(body, list)
    items = body if many else [body]
    read = object_reader(schema, schemas)
    ops = []
    for i, item in enumerate(items):
        ops.append(
            _at(i if many else None, lambda item=item: parse_create(schema, schemas, item, read))
        )
    written = await writer_of(hub).write(caller, schemas, perms, ops)
    stored = await _read_back(hub, caller.app_id, schemas, perms, written.keys, written.created)
    if many:
        return JSONResponse({"objects": [stored[op.key] for op in ops]})
    return JSONResponse(stored[ops[0].key])


async def _object(request: Request, hub: SyncHub, caller: Caller) -> Response:
    schemas = await _schemas(hub, caller.app_id)
    schema = model_of(schemas, request.path_params["model"])
    pk = parse_pk(schema, request.path_params["pk"])
    perms = await permissions_of(hub, caller, schemas)
    if request.method == "GET":
        values = await read_object(hub.storage, caller.app_id, schema, pk, perms)
        if values is None:
            raise not_found(schema.name, pk)
        return JSONResponse(object_to_json(schema, values, schemas))
    if perms is not None:  # a user cannot tell an object they may not read from none
        if await read_object(hub.storage, caller.app_id, schema, pk, perms) is None:
            raise not_found(schema.name, pk)
    if request.method == "DELETE":
        op = WriteOp(DELETE, schema.name, pk)
        await _write(hub, caller, schemas, perms, [op])
        gone = {"deleted": True, "model": schema.name, "pk": request.path_params["pk"]}
        return JSONResponse(gone)
    op = parse_update(schema, schemas, pk, await json_body(request))
    keys = await _write(hub, caller, schemas, perms, [op])
    stored = await _read_back(hub, caller.app_id, schemas, perms, keys)
    return JSONResponse(stored[op.key])


def _at(index: int | None, parse: Any) -> WriteOp:
    """``parse()``, its refusal prefixed with the operation's index (``[3]``)."""
    try:
        op: WriteOp = parse()
        return op
    except ApiError as exc:
        if index is None:
            raise
        raise ApiError(exc.status, f"[{index}] {exc.message}", exc.code, exc.extra) from None


def _transaction_op(schemas: dict[str, ModelSchema], item: Any) -> WriteOp:
    if not isinstance(item, dict):
        raise ApiError(400, "an operation is a JSON object", "bad_request")
    kind = item.get("op")
    if kind not in (CREATE, UPDATE, DELETE):
        raise ApiError(400, 'op must be "create", "update" or "delete"', "bad_request")
    name = item.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "model must be a model name", "bad_request")
    schema = model_of(schemas, name)
    allowed = {"op", "model", "object"} if kind == CREATE else {"op", "model", "pk", "fields"}
    if kind == DELETE:
        allowed = {"op", "model", "pk"}
    extra = sorted(set(item) - allowed)
    if extra:
        raise ApiError(400, f"unknown member(s) {extra} of a {kind} operation", "bad_request")
    if kind == CREATE:
        return parse_create(schema, schemas, item.get("object"))
    if "pk" not in item:
        raise ApiError(400, f"a {kind} operation needs pk", "bad_request")
    pk = parse_pk_json(schema, item["pk"])
    if kind == DELETE:
        return WriteOp(DELETE, schema.name, pk)
    return parse_update(schema, schemas, pk, item.get("fields"))


async def _transaction(request: Request, hub: SyncHub, caller: Caller) -> Response:
    schemas = await _schemas(hub, caller.app_id)
    body = await json_body(request)
    items = body.get("operations") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise ApiError(
            400,
            'a transaction is a JSON array of operations (or {"operations": [...]})',
            "bad_request",
        )
    ops = [_at(i, lambda item=item: _transaction_op(schemas, item)) for i, item in enumerate(items)]
    perms = await permissions_of(hub, caller, schemas)
    written = await writer_of(hub).write(caller, schemas, perms, ops)
    stored = await _read_back(hub, caller.app_id, schemas, perms, written.keys, written.created)
    return JSONResponse({"results": [stored.get(op.key) for op in ops]})


async def _write(
    hub: SyncHub,
    caller: Caller,
    schemas: dict[str, ModelSchema],
    perms: Permissions | None,
    ops: list[WriteOp],
) -> list[ObjectKey]:
    result = await writer_of(hub).write(caller, schemas, perms, ops)
    return result.keys


async def _read_back(
    hub: SyncHub,
    app_id: str,
    schemas: dict[str, ModelSchema],
    perms: Permissions | None,
    keys: list[ObjectKey],
    created: dict[ObjectKey, Instruction] | None = None,
) -> dict[ObjectKey, dict[str, Any] | None]:
    """The objects as stored after a write, in JSON (None: erased or not readable).

    An object the write made from nothing with one CREATE (``created``, confirmed by the
    storage) is as that CREATE stored it: its values are rendered from the CREATE without
    reading them back (:func:`~tidesync.core.merge.created_values`, the values the storage
    stores for it; tests/test_data_api_bulk.py proves the answer equal to a read)."""
    known: dict[ObjectKey, dict[str, Any]] = {}
    for key, ins in (created or {}).items():
        values = created_values(ins, schemas[key[0]])
        if values is not None:
            known[key] = values
    missing = [key for key in keys if key not in known]
    found: dict[ObjectKey, StoredObject] = {}
    if missing:
        try:
            found = await hub.storage.get_states(app_id, missing)
        except StorageError as exc:
            raise ApiError(
                503, f"stored, but reading it back failed: {exc}", "unavailable"
            ) from None
    out: dict[ObjectKey, dict[str, Any] | None] = {}
    converters: dict[str, Any] = {}
    for key in keys:
        values = known.get(key)
        if values is None:
            obj = found.get(key)
            values = obj.values if obj is not None else None
        model = key[0]
        if values is None or (perms is not None and not perms.can_read(model, values)):
            out[key] = None
            continue
        convert = converters.get(model)
        if convert is None:
            convert = converters[model] = object_converter(schemas[model], schemas)
        out[key] = convert(values)
    return out


def data_routes() -> list[BaseRoute]:
    """The Data API's routes."""
    return [
        Route(DATA_PATH, endpoint(_models), methods=["GET"]),
        Route(f"{DATA_PATH}/_transaction", endpoint(_transaction), methods=["POST"]),
        Route(f"{DATA_PATH}/{{model}}", endpoint(_collection), methods=["GET", "POST"]),
        Route(
            f"{DATA_PATH}/{{model}}/{{pk:path}}",
            endpoint(_object),
            methods=["GET", "PATCH", "DELETE"],
        ),
    ]
