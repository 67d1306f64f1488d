"""The declared schema of an app: read from the configuration, enforced on every BIND.

A production configuration pins each app's schema (``[apps.<id>.schema.<Model>]``, or a
file named by ``schema_file``). Then:

- at start, :func:`pin_declared_schemas` compares it with the schema the storage holds: a
  stored model or field the declaration drops or retypes stops the server with a
  :class:`SchemaPinError` naming each one (changing existing data needs a migration, issue
  24); otherwise the declared models are stored (additions: new models, new optional
  fields);
- every BIND is checked by :func:`check_bind` against the declaration: a model, field or
  type it does not declare is refused (session ERROR 225 naming each) before anything is
  stored. A BIND may declare fewer models and fewer fields (an older release).

Apps without a declared schema (development mode, or a production app that leaves it out)
learn it from their clients, within :class:`~tidesync.server.limits.Limits`'
``max_models_per_app`` and ``max_fields_per_model``.

Field types are written as :meth:`~tidesync.core.schema.FieldSchema.type_name` prints them
(``int``, ``str | None``, ``list[str]``, ``dict[str, float]``, ``Task | None`` for a link,
``counter``), so :func:`schema_toml` output can be pasted into the configuration.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.schema import Collection, FieldSchema, Kind, ModelSchema
from ..errors import ConfigurationError, SchemaMismatchError, SchemaPinError
from .storage.base import ServerStorage, merge_schemas

log = logging.getLogger("tidesync.server.schemapin")

if TYPE_CHECKING:
    from .config import ServerConfig

#: How many problems one error message names before it says "and N more".
MAX_NAMED = 10
#: Where a refused schema change points the operator.
MIGRATION_HINT = (
    "changing or removing stored fields needs a migration (issue 24; docs/server.md, "
    "'Changing the declared schema')"
)

_SCALARS = {k.value: k for k in Kind if k is not Kind.LINK}
_COLLECTIONS = (
    ("list[", Collection.LIST),
    ("set[", Collection.SET),
    ("dict[str, ", Collection.DICT),
)
_FIELD_KEYS = {"type", "indexed"}
_MODEL_KEYS = {"primary_key", "fields"}


# -- reading the declaration ------------------------------------------------------------------


def parse_type(name: str, text: str) -> FieldSchema:
    """The field ``name`` of type ``text`` (:meth:`FieldSchema.type_name`'s syntax).

    Raises ``ValueError`` naming the type for anything it cannot read.
    """
    if not isinstance(text, str):
        raise ValueError(f"the type must be a string, not {text!r}")
    inner, collection = text.strip(), Collection.NONE
    for prefix, shape in _COLLECTIONS:
        if inner.startswith(prefix) and inner.endswith("]"):
            inner, collection = inner[len(prefix) : -1].strip(), shape
            break
    optional = False
    base, bar, rest = inner.partition("|")
    if bar:
        if rest.strip() != "None":
            raise ValueError(f"unknown type {text!r} (only 'T | None' unions exist)")
        inner, optional = base.strip(), True
    kind = _SCALARS.get(inner)
    if kind is not None:
        return FieldSchema(name, kind, collection, optional)
    if not inner.isidentifier():
        raise ValueError(
            f"unknown type {text!r} (known: {', '.join(_SCALARS)}, a model name for a link, "
            "'T | None', list[T], set[T], dict[str, T])"
        )
    return FieldSchema(name, Kind.LINK, collection, optional, target=inner)


def _model(name: str, raw: Any, where: str) -> ModelSchema:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"[{where}] must be a table")
    unknown = sorted(set(raw) - _MODEL_KEYS)
    if unknown:
        raise ConfigurationError(f"unknown key(s) in [{where}]: {', '.join(unknown)}")
    pk, raw_fields = raw.get("primary_key"), raw.get("fields")
    if not isinstance(raw_fields, dict) or not raw_fields:
        raise ConfigurationError(f'{where}.fields must be a table of field = "type"')
    if not isinstance(pk, str) or pk not in raw_fields:
        raise ConfigurationError(f"{where}.primary_key must name one of its fields, not {pk!r}")
    fields: list[FieldSchema] = []
    for field_name, spec in raw_fields.items():
        at = f"{where}.fields.{field_name}"
        indexed = False
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - _FIELD_KEYS)
            if unknown:
                raise ConfigurationError(f"unknown key(s) in {at}: {', '.join(unknown)}")
            indexed = spec.get("indexed", False)
            if not isinstance(indexed, bool):
                raise ConfigurationError(f"{at}.indexed must be true or false")
            spec = spec.get("type")
        if not field_name.isidentifier():
            raise ConfigurationError(f"{at}: {field_name!r} is not a valid field name")
        try:
            parsed = parse_type(field_name, spec)
        except ValueError as exc:
            raise ConfigurationError(f"{at}: {exc}") from None
        is_pk = field_name == pk
        fields.append(
            FieldSchema(
                field_name,
                parsed.kind,
                parsed.collection,
                parsed.optional,
                parsed.target,
                indexed=indexed or is_pk,
                primary_key=is_pk,
            )
        )
    return ModelSchema(name, tuple(fields), pk)


def parse_schema(raw: Any, where: str) -> dict[str, ModelSchema]:
    """The models of a ``[... .schema]`` table (model name -> ``primary_key`` + ``fields``).

    Every model, field and type is checked (primary key kinds, links to declared models);
    a mistake is a :class:`ConfigurationError` that names it.
    """
    if not isinstance(raw, dict):
        raise ConfigurationError(f"[{where}] must be a table of models")
    models: list[ModelSchema] = []
    for name, body in raw.items():
        if not name.isidentifier():
            raise ConfigurationError(f"[{where}]: {name!r} is not a valid model name")
        models.append(_model(name, body, f"{where}.{name}"))
    names = {m.name for m in models}
    for model in models:
        for f in model.fields:
            if f.kind is Kind.LINK and f.target not in names:
                raise ConfigurationError(
                    f"{where}.{model.name}.fields.{f.name}: unknown type {f.type_name()!r} "
                    f"({f.target!r} is neither a type ({', '.join(_SCALARS)}) nor a "
                    "declared model)"
                )
    try:
        return merge_schemas({}, models)
    except SchemaMismatchError as exc:
        raise ConfigurationError(f"[{where}]: {exc}") from None


def load_app_schema(
    raw_app: dict[str, Any], where: str, base: Path
) -> dict[str, ModelSchema] | None:
    """An app's declared schema: ``schema`` (a table) or ``schema_file`` (a TOML file whose
    top-level tables are the models, relative to ``base``); None if it declares neither."""
    if "schema" in raw_app and "schema_file" in raw_app:
        raise ConfigurationError(f"[{where}] has both schema and schema_file: keep one")
    if "schema" in raw_app:
        return parse_schema(raw_app["schema"], f"{where}.schema")
    if "schema_file" not in raw_app:
        return None
    name = raw_app["schema_file"]
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{where}.schema_file must be a file name")
    path = base / name
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{where}.schema_file: cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{where}.schema_file: {path} is not valid TOML: {exc}") from None
    return parse_schema(raw, f"{path.name}")


# -- checks -----------------------------------------------------------------------------------


def _same_type(a: FieldSchema, b: FieldSchema) -> bool:
    return (a.kind, a.collection, a.optional, a.target) == (
        b.kind,
        b.collection,
        b.optional,
        b.target,
    )


def _summary(problems: list[str]) -> str:
    named = "; ".join(problems[:MAX_NAMED])
    more = len(problems) - MAX_NAMED
    return f"{named}; and {more} more" if more > 0 else named


def bind_problems(declared: Mapping[str, ModelSchema], bound: list[ModelSchema]) -> list[str]:
    """What ``bound`` (a BIND's schema) has that ``declared`` does not: one line each.

    Fewer models and fewer fields are fine (an older release); an undeclared model or
    field, another type or another primary key is a problem.
    """
    problems: list[str] = []
    for model in bound:
        pinned = declared.get(model.name)
        if pinned is None:
            problems.append(f"model {model.name!r} is not declared")
            continue
        if model.primary_key != pinned.primary_key:
            problems.append(
                f"model {model.name}: primary key {model.primary_key!r} is not the declared "
                f"{pinned.primary_key!r}"
            )
        for f in model.fields:
            want = pinned.by_name.get(f.name)
            if want is None:
                problems.append(f"field {model.name}.{f.name} is not declared")
            elif not _same_type(f, want):
                problems.append(
                    f"field {model.name}.{f.name} is {f.type_name()}, declared {want.type_name()}"
                )
    return problems


def cap_problem(
    stored: Mapping[str, ModelSchema], bound: list[ModelSchema], max_models: int, max_fields: int
) -> str | None:
    """Why merging ``bound`` into ``stored`` would pass a cap (None if it would not)."""
    new_models = {m.name for m in bound if m.name not in stored}
    if len(stored) + len(new_models) > max_models:
        return (
            f"limit exceeded: at most {max_models} models per app (limits.max_models_per_app); "
            f"the app has {len(stored)} and this BIND adds {len(new_models)}"
        )
    for model in bound:
        old = stored.get(model.name)
        names = set(model.by_name) | (set(old.by_name) if old is not None else set())
        if len(names) > max_fields:
            return (
                f"limit exceeded: at most {max_fields} fields per model "
                f"(limits.max_fields_per_model); model {model.name} would have {len(names)}"
            )
    return None


def _declared(config: ServerConfig, app_id: str) -> dict[str, ModelSchema] | None:
    settings = config.auth.app(app_id, config.development_mode)
    return settings.schema if settings is not None else None


def _refuse(problems: list[str]) -> SchemaMismatchError:
    return SchemaMismatchError(
        f"the schema is declared by the server's configuration: {_summary(problems)}"
    )


def precheck_bind(config: ServerConfig, app_id: str, raw: list[Any]) -> None:
    """Refuse (:class:`SchemaMismatchError`) what a BIND's raw schema shows by its names and
    sizes alone, before it is parsed (parsing costs about 60 µs a model): a model the app
    does not declare, a model named twice, or more models or fields than the caps allow.

    When this passes, at most as many models as the app declares (or the cap allows) are
    parsed and given to :func:`check_bind`.
    """
    declared = _declared(config, app_id)
    if declared is None:
        limits = config.limits
        if len(raw) > limits.max_models_per_app:
            raise SchemaMismatchError(
                f"limit exceeded: at most {limits.max_models_per_app} models per app "
                f"(limits.max_models_per_app); this BIND has {len(raw)}"
            )
        for d in raw:
            listed = d.get("fields") if isinstance(d, dict) else None
            if isinstance(listed, list) and len(listed) > limits.max_fields_per_model:
                raise SchemaMismatchError(
                    f"limit exceeded: at most {limits.max_fields_per_model} fields per model "
                    f"(limits.max_fields_per_model); model {d.get('name')!r} has {len(listed)}"
                )
        return
    problems: list[str] = []
    known: list[dict[str, Any]] = []
    seen: set[str] = set()
    for d in raw:
        name = d.get("name") if isinstance(d, dict) else None
        if not isinstance(name, str):
            continue  # malformed: the parser names it
        if name in seen:
            problems.append(f"model {name!r} appears more than once")
        elif name not in declared:
            problems.append(f"model {name!r} is not declared")
        else:
            known.append(d)
        seen.add(name)
    if problems:
        try:  # the declared models' own problems first: they are few, and easily lost
            own = bind_problems(declared, [ModelSchema.from_dict(d) for d in known])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            own = [f"invalid schema: {exc}"]
        raise _refuse(own + problems)


async def check_bind(
    config: ServerConfig, storage: ServerStorage, app_id: str, bound: list[ModelSchema]
) -> None:
    """Refuse a BIND's parsed schema (:class:`SchemaMismatchError`) that the app may not
    take: a declared schema must cover it (fewer models and fields are fine); otherwise the
    caps bound what it may add to the stored one.

    Called once per BIND (after :func:`precheck_bind`), before the schema is stored;
    nothing on the upload path.
    """
    declared = _declared(config, app_id)
    if declared is not None:
        problems = bind_problems(declared, bound)
        if problems:
            raise _refuse(problems)
        return
    limits = config.limits
    stored = await storage.get_schemas(app_id)
    problem = cap_problem(stored, bound, limits.max_models_per_app, limits.max_fields_per_model)
    if problem is not None:
        raise SchemaMismatchError(problem)


def start_problems(
    declared: Mapping[str, ModelSchema], stored: Mapping[str, ModelSchema]
) -> list[str]:
    """Why ``declared`` cannot serve the data written with ``stored``: one line each.

    A stored model or field must stay declared with its type and primary key; a field
    added to a stored model must be optional, a collection or a counter.
    """
    problems: list[str] = []
    for model in stored.values():
        pinned = declared.get(model.name)
        if pinned is None:
            problems.append(f"model {model.name!r} is stored but not declared")
            continue
        if pinned.primary_key != model.primary_key:
            problems.append(
                f"model {model.name}: primary key changed from {model.primary_key!r} to "
                f"{pinned.primary_key!r}"
            )
        for old in model.fields:
            new = pinned.by_name.get(old.name)
            if new is None:
                problems.append(
                    f"field {model.name}.{old.name} ({old.type_name()}) is stored but not declared"
                )
            elif not _same_type(old, new):
                problems.append(
                    f"field {model.name}.{old.name} changed type from {old.type_name()} "
                    f"to {new.type_name()}"
                )
        for new in pinned.fields:
            if new.name not in model.by_name and not (
                new.optional or new.is_collection or new.kind is Kind.COUNTER
            ):
                problems.append(
                    f"new field {model.name}.{new.name} ({new.type_name()}) must be optional "
                    "(or a collection or a counter) to be added to stored data"
                )
    return problems


def declared_apps(config: ServerConfig) -> dict[str, dict[str, ModelSchema]]:
    """The apps of ``config`` that declare a schema, with it."""
    return {
        app_id: app.schema for app_id, app in config.auth.apps.items() if app.schema is not None
    }


async def check_declared_schemas(storage: ServerStorage, config: ServerConfig) -> None:
    """Raise :class:`SchemaPinError` if a declared schema cannot serve the stored data."""
    for app_id, declared in declared_apps(config).items():
        problems = start_problems(declared, await storage.get_schemas(app_id))
        if problems:
            raise SchemaPinError(
                f"apps.{app_id}.schema does not match the stored data: {_summary(problems)} "
                f"({MIGRATION_HINT})"
            )


async def pin_declared_schemas(storage: ServerStorage, config: ServerConfig) -> None:
    """Check (:func:`check_declared_schemas`), then store every declared schema."""
    await check_declared_schemas(storage, config)
    for app_id, declared in declared_apps(config).items():
        await storage.put_schemas(app_id, list(declared.values()))
    if not config.development_mode:
        for app_id, app in config.auth.apps.items():
            if app.schema is None:
                log.warning(
                    "apps.%s declares no schema: it takes the models its clients declare "
                    "(within limits.max_models_per_app / max_fields_per_model); declare "
                    "[apps.%s.schema] to pin it (docs/server.md)",
                    app_id,
                    app_id,
                )


# -- printing it ------------------------------------------------------------------------------


async def export_schema(data_dir: Path, config: ServerConfig, app_id: str, prefix: str) -> str:
    """The schema the storage of ``config`` (SQLite in ``data_dir`` by default) holds for
    ``app_id``, as :func:`schema_toml` prints it; raises ``ConfigurationError`` if none."""
    from .app import storage_for

    storage = storage_for(config)(data_dir)
    await storage.open()
    try:
        models = await storage.get_schemas(app_id)
    finally:
        await storage.close()
    if not models:
        raise ConfigurationError(f"the storage holds no schema for app {app_id!r}")
    return schema_toml(models, prefix)


def _key(name: str) -> str:
    return name if name.replace("_", "a").isalnum() and name.isascii() else json.dumps(name)


def schema_toml(models: Mapping[str, ModelSchema], prefix: str = "") -> str:
    """``models`` as TOML tables ``[<prefix><Model>]`` that :func:`parse_schema` reads back.

    ``prefix`` is e.g. ``"apps.todo.schema."`` for the configuration file, ``""`` for a
    ``schema_file``.
    """
    out: list[str] = []
    for model in models.values():
        out.append(f"[{prefix}{_key(model.name)}]")
        out.append(f"primary_key = {json.dumps(model.primary_key)}")
        out.append(f"[{prefix}{_key(model.name)}.fields]")
        for f in model.fields:
            kind = json.dumps(f.type_name())
            if f.indexed and not f.primary_key:
                out.append(f"{_key(f.name)} = {{ type = {kind}, indexed = true }}")
            else:
                out.append(f"{_key(f.name)} = {kind}")
        out.append("")
    return "\n".join(out)
