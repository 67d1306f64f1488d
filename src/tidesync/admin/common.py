"""What the blocking and the asyncio admin clients share: each call as a request to make
(:class:`Call`) and the parsing of its answer, the JSON mapping of values both ways, the
error, and the change feed's events. No I/O here: the clients only send and receive."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..core.jsonvalues import from_json, scalar_to_json, to_json
from ..core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..errors import TidesyncError
from ..store.model import Model

#: What names a model: its class or its name.
ModelRef = type[Model] | str
#: An object to write: a model instance or a mapping of field values.
ObjectIn = Model | Mapping[str, Any]


class AdminAPIError(TidesyncError):
    """The server refused a call: ``status`` (HTTP), ``code`` and the server's message;
    ``refused`` lists ``{"model", "pk", "reason"}`` for a write the rules refused."""

    def __init__(
        self, status: int, code: str, message: str, refused: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message
        self.refused = list(refused)


#: ``ChangeEvent.from_json``'s default cursor: the event's version.
_VERSION: Any = object()


@dataclass(frozen=True)
class ChangeEvent:
    """One committed change of the change feed (docs/backend.md, "Change feed")."""

    version: int
    model: str
    pk: Any
    op: str  # "create", "update" or "erase"
    fields: dict[str, Any]
    by: dict[str, Any]
    at: str | None
    #: The cursor to resume from once this event is handled: nothing after it is lost
    #: (events of its own changeset before it may come again, unless it is the last).
    cursor: Any = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], cursor: Any = _VERSION) -> ChangeEvent:
        """An event as the feed answers it; ``cursor`` to resume from (by default its
        ``version``: right only for the last event of its changeset)."""
        return cls(
            version=int(data.get("version", 0)),
            model=str(data.get("model", "")),
            pk=data.get("pk"),
            op=str(data.get("op", "")),
            fields=dict(data.get("fields") or {}),
            by=dict(data.get("by") or {}),
            at=data.get("at"),
            cursor=data.get("cursor", data.get("version")) if cursor is _VERSION else cursor,
            raw=dict(data),
        )


@dataclass(frozen=True)
class Call:
    """One HTTP request to make: method, path under the app, query parameters, JSON body."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: Any = None


def model_name(model: ModelRef) -> str:
    """The name of a model given by class or name."""
    if isinstance(model, str):
        if not model:
            raise ValueError("a model name cannot be empty")
        return model
    if isinstance(model, type) and issubclass(model, Model):
        return model.schema().name
    raise TypeError(f"expected a tidesync.Model class or a model name, got {model!r}")


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def pk_segment(schema: ModelSchema | None, pk: Any) -> str:
    """A primary key as a URL path segment."""
    if schema is not None:
        value = scalar_to_json(schema.pk_field.kind, pk)
    else:
        value = pk
    if isinstance(value, bool) or value is None:
        raise TypeError(f"invalid primary key {pk!r}")
    return str(value)


class Codec:
    """Values both ways, with the schemas the server answered (``GET .../data``)."""

    def __init__(self, models: Iterable[Mapping[str, Any]]) -> None:
        self.schemas: dict[str, ModelSchema] = {}
        for m in models:
            schema = _schema_of(m)
            self.schemas[schema.name] = schema

    def schema(self, name: str) -> ModelSchema:
        """The named model's schema (a clear error for a model the server lacks)."""
        schema = self.schemas.get(name)
        if schema is None:
            known = ", ".join(sorted(self.schemas)) or "none"
            raise AdminAPIError(404, "unknown_model", f"unknown model {name!r} (known: {known})")
        return schema

    def encode(self, name: str, obj: ObjectIn) -> dict[str, Any]:
        """An object (model instance or mapping of Python values) in JSON form. A value that
        is already in JSON form (a datetime's ISO string) passes as it is."""
        values = obj.to_dict() if isinstance(obj, Model) else dict(obj)
        schema = self.schema(name)
        out: dict[str, Any] = {}
        for key, value in values.items():
            fs = schema.by_name.get(key)
            out[key] = value if fs is None else _to_json_lenient(fs, value, self.schemas)
        return out

    def encode_fields(self, name: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """A PATCH body: values in JSON form; operators (``{"$inc": 1}``) kept."""
        schema = self.schema(name)
        out: dict[str, Any] = {}
        for key, value in changes.items():
            fs = schema.by_name.get(key)
            if fs is None or _is_operator(value):
                out[key] = _operator_json(fs, value, self.schemas) if fs else value
            else:
                out[key] = _to_json_lenient(fs, value, self.schemas)
        return out

    def decode(self, name: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """An object from the API with Python values (datetime, Decimal, bytes, ...)."""
        schema = self.schemas.get(name)
        if schema is None:
            return dict(data)
        out: dict[str, Any] = {}
        for key, value in data.items():
            fs = schema.by_name.get(key)
            out[key] = value if fs is None else from_json(fs, value, name, self.schemas)
        return out


def _schema_of(model: Mapping[str, Any]) -> ModelSchema:
    """A model as ``GET .../data`` describes it."""
    pk = str(model["primary_key"])
    fields = tuple(
        FieldSchema(
            name=str(f["name"]),
            kind=Kind(f["kind"]),
            collection=Collection(f.get("collection") or "none"),
            optional=bool(f.get("optional", False)),
            target=f.get("target"),
            primary_key=f["name"] == pk,
        )
        for f in model["fields"]
    )
    return ModelSchema(str(model["name"]), fields, pk)


def _is_operator(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)).startswith("$")


def _operator_json(fs: Any, value: Mapping[str, Any], schemas: dict[str, ModelSchema]) -> Any:
    ((op, arg),) = value.items()
    if op == "$inc":
        return {op: arg}
    elements = list(arg) if isinstance(arg, list | tuple | set | frozenset) else [arg]
    return {op: [_element_json(fs, v, schemas) for v in elements]}


def _element_json(fs: Any, value: Any, schemas: dict[str, ModelSchema]) -> Any:
    try:
        return scalar_to_json(fs.kind, value, schemas, fs.target)
    except (TypeError, ValueError, AttributeError):
        return value


def _to_json_lenient(fs: Any, value: Any, schemas: dict[str, ModelSchema]) -> Any:
    if isinstance(value, Model):
        value = value.to_dict().get(type(value).schema().primary_key)
    try:
        return to_json(fs, value, schemas)
    except (TypeError, ValueError, AttributeError):
        return value  # already JSON (or wrong: the server names the field)


def models_call() -> Call:
    """``GET .../data``."""
    return Call("GET", "/data")


def query_call(
    name: str,
    query: str | None,
    args: Sequence[Any],
    sort: str | None,
    desc: bool,
    limit: int | None,
    after: Any,
) -> Call:
    """``GET .../data/{Model}`` with the query and paging parameters."""
    params: dict[str, str] = {}
    if query:
        params["query"] = query
    if args:
        params["args"] = json.dumps([_arg_json(a) for a in args])
    if sort:
        params["sort"] = sort
        if desc:
            params["desc"] = "true"
    if limit is not None:
        params["limit"] = str(limit)
    if after is not None:
        params["after"] = str(after)
    return Call("GET", _path("data", name), params)


def _arg_json(value: Any) -> Any:
    """A query argument's JSON form, by its Python type."""
    if isinstance(value, _dt.datetime):
        return scalar_to_json(Kind.DATETIME, value)
    if isinstance(value, bytes | bytearray):
        return scalar_to_json(Kind.BYTES, bytes(value))
    if isinstance(value, float):
        return scalar_to_json(Kind.FLOAT, value)
    if isinstance(value, int | str | bool) or value is None:
        return value
    return str(value)  # Decimal, UUID, ObjectId


def get_call(name: str, pk: str) -> Call:
    """``GET .../data/{Model}/{pk}``."""
    return Call("GET", _path("data", name, pk))


def insert_call(name: str, objects: list[dict[str, Any]], many: bool) -> Call:
    """``POST .../data/{Model}`` with one object or an array."""
    return Call("POST", _path("data", name), body=objects if many else objects[0])


def update_call(name: str, pk: str, changes: dict[str, Any]) -> Call:
    """``PATCH .../data/{Model}/{pk}``."""
    return Call("PATCH", _path("data", name, pk), body=changes)


def delete_call(name: str, pk: str) -> Call:
    """``DELETE .../data/{Model}/{pk}``."""
    return Call("DELETE", _path("data", name, pk))


def transaction_call(operations: list[dict[str, Any]]) -> Call:
    """``POST .../data/_transaction``."""
    return Call("POST", "/data/_transaction", body=operations)


def changes_call(
    since: Any, models: Sequence[str] | None, query: str | None, wait: float, limit: int | None
) -> Call:
    """``GET .../changes`` (long-polling ``wait`` seconds)."""
    params: dict[str, str] = {}
    if since is not None:
        params["since"] = str(since)
    if models:
        params["models"] = ",".join(models)
    if query:
        params["query"] = query
    if wait > 0:
        params["wait"] = f"{wait:g}"
    if limit is not None:
        params["limit"] = str(limit)
    return Call("GET", "/changes", params)


def check(status: int, body: Any) -> Any:
    """The answer's body, or :class:`AdminAPIError` for a refusal."""
    if 200 <= status < 300:
        return body
    if isinstance(body, Mapping):
        raise AdminAPIError(
            status,
            str(body.get("code", "error")),
            str(body.get("error", "the server refused the call")),
            body.get("refused") or (),
        )
    raise AdminAPIError(status, "error", f"the server answered HTTP {status}")


class Transaction:
    """Operations collected by ``with client.transaction() as tx:``, sent as one
    ``_transaction`` call when the block ends without an exception (all in one commit, or
    none)."""

    def __init__(self, codec_of: Callable[[], Codec]) -> None:
        self._codec_of = codec_of
        self.operations: list[dict[str, Any]] = []

    def insert(self, model: ModelRef, obj: ObjectIn) -> None:
        """Create (or upsert) one object."""
        name = model_name(model)
        body = self._codec_of().encode(name, obj)
        self.operations.append({"op": "create", "model": name, "object": body})

    def update(self, model: ModelRef, pk: Any, changes: Mapping[str, Any]) -> None:
        """Set fields of one object (``{"$inc": n}`` for counters)."""
        name = model_name(model)
        codec = self._codec_of()
        key = _pk_json(codec, name, pk)
        fields = codec.encode_fields(name, changes)
        self.operations.append({"op": "update", "model": name, "pk": key, "fields": fields})

    def delete(self, model: ModelRef, pk: Any) -> None:
        """Erase one object."""
        name = model_name(model)
        key = _pk_json(self._codec_of(), name, pk)
        self.operations.append({"op": "delete", "model": name, "pk": key})


def _pk_json(codec: Codec, name: str, pk: Any) -> Any:
    return scalar_to_json(codec.schema(name).pk_field.kind, pk)


def as_list(obj: ObjectIn | Iterable[ObjectIn]) -> tuple[list[ObjectIn], bool]:
    """``(objects, many)`` for ``insert``'s argument."""
    if isinstance(obj, Model | Mapping):
        return [obj], False
    items = list(obj)
    return items, True


def objects_of(answer: Any) -> list[dict[str, Any]]:
    """The objects of a write's answer (``{"objects": [...]}``, one object, or an array)."""
    if isinstance(answer, Mapping) and "objects" in answer:
        return [dict(o) for o in answer["objects"]]
    if isinstance(answer, list):
        return [dict(o) for o in answer]
    return [dict(answer)]


def api_base(base_url: str, app_id: str) -> str:
    """The URL the app's API paths are under."""
    if not isinstance(app_id, str) or not app_id:
        raise ValueError("app_id must be a non-empty string")
    return f"{base_url.rstrip('/')}/api/v1/apps/{quote(app_id, safe='')}"


def auth_headers(api_key: str | None, access_token: str | None) -> dict[str, str]:
    """The Authorization header of an admin key or a user's access token."""
    if (api_key is None) == (access_token is None):
        raise ValueError("give exactly one of api_key= (an admin key) and access_token=")
    token = api_key if api_key is not None else access_token
    if not isinstance(token, str) or not token.strip():
        raise ValueError("the admin key or access token must be a non-empty string")
    return {"Authorization": f"Bearer {token.strip()}"}


def waits(call: Call) -> float:
    """How long the server may hold ``call`` (a long poll's ``wait``)."""
    try:
        return float(call.params.get("wait", 0))
    except ValueError:
        return 0.0


def unreachable(exc: Exception) -> AdminAPIError:
    """The error for a call that got no answer."""
    return AdminAPIError(0, "unreachable", f"the server could not be reached: {exc}")


def answer(status: int, content: bytes) -> Any:
    """An HTTP answer's JSON body, or :class:`AdminAPIError` for a refusal."""
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = None
    return check(status, body)
