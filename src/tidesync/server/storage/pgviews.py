"""Read-only SQL views of an app's data, for reporting tools and SQL users (PostgreSQL).

Per app, :class:`~.postgres.PostgresStorage` keeps a PostgreSQL schema of views (its name:
:func:`views_schema_name`): one per model, named like the model, with one typed column per
field over the alive objects' ``objects.doc`` (see ``postgres.to_json``), and ``_log``, the
app's history (the ``log`` table with each client's user). ``docs/storage.md`` ("Reading the
data with SQL") is the user's guide; this module only makes the DDL and runs it.

Column types (``doc`` renders values as JSON; each column casts its JSON back):

- ``bool`` -> ``boolean``; ``int`` and ``counter`` -> ``bigint``; ``float`` -> ``double
  precision`` (NaN and the infinities kept); ``str`` -> ``text``; ``bytes`` -> ``bytea``;
  ``datetime`` -> ``timestamptz``; ``Decimal`` -> ``numeric`` (NaN kept; a signalling NaN,
  an exponent beyond 999 or a text over 1,000 characters read as NULL: ``numeric`` cannot
  hold them all and one cast error would fail every query of the view); ``UUID`` ->
  ``uuid``; ``ObjectId`` -> ``text`` (24 hexadecimal digits);
- a link -> the linked object's primary key, typed as that key's column;
- a list, set or dict -> ``jsonb``: an array (a set's sorted) or an object, elements in the
  ``doc`` JSON form (datetimes ISO 8601, bytes base64, Decimals strings, ...).

Names. App ids, model and field names go into the DDL only through :func:`quote_ident` and
:func:`quote_literal` (so no name can end the quoting), and every identifier is at most 63
bytes (PostgreSQL would silently cut it: :func:`pg_identifier` shortens a longer one with a
hash of the whole). The views are not updatable (two ``FROM`` entries), so INSERT, UPDATE
and DELETE through them fail for every role, the owner's included.

Upkeep. ``put_schemas`` calls :func:`refresh_views` in its transaction (the app's counter row
locked) for the models it changed; ``open`` calls it for apps whose views are missing or
were made from another schema generation or :data:`VIEWS_FORMAT`. Fields are only ever added
at the end of a model, so ``CREATE OR REPLACE VIEW`` keeps the columns, the grants and any
user's views built on them; if PostgreSQL refuses that, the view is dropped and created
again with its grants copied. DDL waits at most :data:`VIEW_LOCK_TIMEOUT` for a view a
report is reading. A view that cannot be made is logged and rolled back to a savepoint:
views never stop sync. The push path does not touch them (views are DDL only).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable

import asyncpg

from ...core.schema import Collection, FieldSchema, Kind, ModelSchema

log = logging.getLogger("tidesync.server.storage.pgviews")

__all__ = [
    "LOG_VIEW",
    "VIEWS_FORMAT",
    "VIEWS_TABLE_DDL",
    "VIEW_LOCK_TIMEOUT",
    "column_sql",
    "drop_app_views",
    "drop_views_of_storage",
    "log_view_ddl",
    "model_view_ddl",
    "pg_identifier",
    "quote_ident",
    "quote_literal",
    "refresh_views",
    "stale_apps",
    "views_current",
    "views_schema_name",
]

#: The generation of the view DDL below; a change rebuilds every app's views at ``open``.
VIEWS_FORMAT = 1
#: The change-log view's name (a model by that name gets no view: it is logged).
LOG_VIEW = "_log"
#: How long (seconds) view DDL waits for a view's lock (a reporting query reading it); then
#: the views are left as they were (and the app's sync goes on).
VIEW_LOCK_TIMEOUT = 2.0
#: PostgreSQL keeps this many bytes of an identifier (NAMEDATALEN - 1).
MAX_IDENTIFIER = 63
#: The storage's table of made views (a migration of ``postgres.MIGRATIONS`` creates it).
VIEWS_TABLE_DDL = """
    CREATE TABLE sql_views (
        app TEXT PRIMARY KEY,
        view_schema TEXT NOT NULL UNIQUE,
        generation BIGINT NOT NULL,
        format INTEGER NOT NULL
    );
"""

_PLAIN = re.compile(r"^[a-z0-9_]+$")
_NOT_PLAIN = re.compile(r"[^a-z0-9_]+")
#: A Decimal's text that ``numeric`` takes exactly (bounded: see the module docstring).
_NUMERIC_TEXT = r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]{1,3})?$"
_NUMERIC_LENGTH = 1000
_PK_TYPES = {Kind.INT: "bigint", Kind.STR: "text", Kind.UUID: "uuid", Kind.OBJECTID: "text"}


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (``"`` doubled); a U+0000 is refused."""
    if "\x00" in name:
        raise ValueError(f"an SQL identifier cannot hold U+0000: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """``text`` as an SQL string literal, whatever ``standard_conforming_strings`` says
    (an ``E''`` literal: backslashes and quotes doubled); a U+0000 is refused."""
    if "\x00" in text:
        raise ValueError(f"an SQL literal cannot hold U+0000: {text!r}")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def pg_identifier(name: str) -> str:
    """``name`` if it fits in 63 bytes (UTF-8), else its start and ``_`` and a hash of the
    whole name (so two long names never become one)."""
    if len(name.encode("utf-8", "surrogatepass")) <= MAX_IDENTIFIER:
        return name
    room = MAX_IDENTIFIER - 13
    start = name.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
    return f"{start}_{_digest(name)}"


def views_schema_name(storage_schema: str, app_id: str) -> str:
    """The PostgreSQL schema of ``app_id``'s views: ``<storage schema>_app_<app id>`` when
    the app id is lower-case letters, digits and ``_`` and the name fits in 63 bytes; else
    ``<storage schema>_app_<app id cleaned>-<hash>`` (the ``-``, never in the first form,
    keeps the two forms apart; the storage's ``sql_views`` table refuses any other clash)."""
    base = f"{storage_schema}_app_"
    if _PLAIN.match(app_id) and len(base) + len(app_id) <= MAX_IDENTIFIER:
        return base + app_id
    cleaned = _NOT_PLAIN.sub("_", app_id.lower())
    room = MAX_IDENTIFIER - len(base) - 13
    return f"{base}{cleaned[:room]}-{_digest(app_id)}"


def column_sql(
    f: FieldSchema, schemas: dict[str, ModelSchema], *, numeric_infinity: bool = True
) -> tuple[str, str]:
    """``(SQL expression over o.doc, SQL type)`` of field ``f``'s column (module docstring);
    ``numeric_infinity``: the server's ``numeric`` holds infinities (PostgreSQL 14+)."""
    key = quote_literal(f.name)
    if f.collection is not Collection.NONE:
        return f"(o.doc -> {key})", "jsonb"
    kind = f.kind
    if kind is Kind.LINK:
        target = schemas.get(f.target or "")
        if target is None:  # merge_schemas refuses such links; keep the raw JSON
            return f"(o.doc -> {key})", "jsonb"
        kind = target.pk_field.kind
    text = f"(o.doc ->> {key})"
    if kind is Kind.BOOL:
        return f"{text}::boolean", "boolean"
    if kind in (Kind.INT, Kind.COUNTER):
        return f"{text}::bigint", "bigint"
    if kind is Kind.FLOAT:
        return f"{text}::double precision", "double precision"
    if kind is Kind.BYTES:
        return f"decode({text}, 'base64')", "bytea"
    if kind is Kind.DATETIME:
        return f"{text}::timestamptz", "timestamptz"
    if kind is Kind.DECIMAL:
        specials = "'NaN', '-NaN'"
        infinities = (
            f" WHEN {text} IN ('Infinity', '-Infinity') THEN {text}::numeric"
            if numeric_infinity
            else ""
        )
        return (
            f"(CASE WHEN length({text}) <= {_NUMERIC_LENGTH} AND {text} ~ '{_NUMERIC_TEXT}' "
            f"THEN {text}::numeric "
            f"WHEN {text} IN ({specials}) THEN 'NaN'::numeric{infinities} END)",
            "numeric",
        )
    if kind is Kind.UUID:
        return f"{text}::uuid", "uuid"
    return f"{text}::text", "text"  # str, ObjectId


def _column_names(model: ModelSchema) -> list[tuple[FieldSchema, str]]:
    """Each field with its column name; a (hash-shortened) name taken twice keeps the first."""
    seen: set[str] = set()
    out: list[tuple[FieldSchema, str]] = []
    for f in model.fields:
        name = pg_identifier(f.name)
        if name in seen:
            log.warning("model %s: field %r has no column (its name clashes)", model.name, f.name)
            continue
        seen.add(name)
        out.append((f, name))
    return out


def model_view_ddl(
    storage_schema: str,
    view_schema: str,
    app_id: str,
    model: ModelSchema,
    schemas: dict[str, ModelSchema],
    *,
    numeric_infinity: bool = True,
) -> str:
    """``CREATE OR REPLACE VIEW`` (with comments) of ``model``'s alive objects: one script."""
    view = f"{quote_ident(view_schema)}.{quote_ident(pg_identifier(model.name))}"
    columns = []
    comments = []
    for f, name in _column_names(model):
        expr, sql_type = column_sql(f, schemas, numeric_infinity=numeric_infinity)
        columns.append(f"CAST({expr} AS {sql_type}) AS {quote_ident(name)}")
        note = f"tidesync {f.type_name()}" + (" (primary key)" if f.primary_key else "")
        comments.append(f"COMMENT ON COLUMN {view}.{quote_ident(name)} IS {quote_literal(note)};")
    body = ",\n    ".join(columns) if columns else "NULL::text AS no_fields"
    about = f"tidesync model {model.name} of app {app_id}: alive objects, read-only"
    # the second FROM entry makes the view not automatically updatable (the planner drops it)
    return (
        f"CREATE OR REPLACE VIEW {view} AS SELECT\n    {body}\n"
        f"FROM {quote_ident(storage_schema)}.objects AS o, (SELECT) AS read_only\n"
        f"WHERE o.app = {quote_literal(app_id)} AND o.model = {quote_literal(model.name)} "
        "AND o.alive;\n"
        f"COMMENT ON VIEW {view} IS {quote_literal(about)};\n" + "\n".join(comments)
    )


def log_view_ddl(storage_schema: str, view_schema: str, app_id: str) -> str:
    """``CREATE OR REPLACE VIEW`` of the app's change log (``_log``), one row per version."""
    view = f"{quote_ident(view_schema)}.{quote_ident(LOG_VIEW)}"
    s = quote_ident(storage_schema)
    about = (
        f"tidesync change log of app {app_id}: one row per server version (instructions "
        "packed), read-only"
    )
    return (
        f"CREATE OR REPLACE VIEW {view} AS SELECT l.server_version, l.origin, "
        "l.client_version, c.user_id, l.size, l.instructions\n"
        f"FROM {s}.log AS l LEFT JOIN {s}.clients AS c ON c.app = l.app AND c.origin = l.origin\n"
        f"WHERE l.app = {quote_literal(app_id)};\n"
        f"COMMENT ON VIEW {view} IS {quote_literal(about)};"
    )


async def _numeric_infinity(conn: asyncpg.Connection) -> bool:
    version = await conn.fetchval("SELECT current_setting('server_version_num')::int")
    return int(version) >= 140000


async def _grants(conn: asyncpg.Connection, view: str) -> list[str]:
    """The GRANT statements that give back ``view``'s privileges (other than its owner's)."""
    rows = await conn.fetch(
        "SELECT a.grantee, a.privilege_type, a.is_grantable, "
        "CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END AS role "
        "FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a "
        "WHERE c.oid = to_regclass($1) AND a.grantee <> c.relowner",
        view,
    )
    out = []
    for r in rows:
        role = "PUBLIC" if r["role"] is None else quote_ident(r["role"])
        option = " WITH GRANT OPTION" if r["is_grantable"] else ""
        out.append(f"GRANT {r['privilege_type']} ON {view} TO {role}{option};")
    return out


async def _replace(conn: asyncpg.Connection, view: str, ddl: str) -> None:
    """Run ``ddl`` (CREATE OR REPLACE); if PostgreSQL refuses to replace the view (changed
    columns), drop it and create it again with its grants."""
    try:
        async with conn.transaction():
            await conn.execute(ddl)
        return
    except (asyncpg.InvalidTableDefinitionError, asyncpg.DatatypeMismatchError):
        pass
    grants = await _grants(conn, view)
    async with conn.transaction():
        await conn.execute(f"DROP VIEW IF EXISTS {view}")
        await conn.execute(ddl + "\n" + "\n".join(grants))


async def refresh_views(
    conn: asyncpg.Connection,
    storage_schema: str,
    app_id: str,
    schemas: dict[str, ModelSchema],
    generation: int,
    models: Iterable[str] | None = None,
) -> bool:
    """Make or update ``app_id``'s views in the caller's transaction (its app row locked)
    and record ``generation``: those of ``models`` when the views were current before this
    generation, else every model's and the log's. A failure (among them a reporting query
    holding a view longer than :data:`VIEW_LOCK_TIMEOUT`) is logged and rolled back to a
    savepoint: views never stop sync. Returns whether the views are current."""
    view_schema = views_schema_name(storage_schema, app_id)
    try:
        async with conn.transaction():
            before = await conn.fetchval("SELECT current_setting('lock_timeout')")
            await conn.execute(
                "SELECT set_config('lock_timeout', $1, true)",
                f"{int(VIEW_LOCK_TIMEOUT * 1000)}ms",
            )
            old = await conn.fetchval(
                "SELECT generation FROM sql_views WHERE app = $1 AND format = $2",
                app_id,
                VIEWS_FORMAT,
            )
            await conn.execute(
                "INSERT INTO sql_views (app, view_schema, generation, format) "
                "VALUES ($1, $2, -1, $3) ON CONFLICT (app) DO NOTHING",
                app_id,
                view_schema,
                VIEWS_FORMAT,
            )
            fresh = await conn.fetchval(
                "SELECT to_regnamespace($1) IS NULL", quote_ident(view_schema)
            )
            if fresh:
                await conn.execute(f"CREATE SCHEMA {quote_ident(view_schema)}")
            whole = fresh or models is None or old != generation - 1
            names = set(schemas) if whole else set(models or ()) & set(schemas)
            about = f"tidesync: read-only views of app {app_id} {_schema_note_end(storage_schema)}"
            await conn.execute(
                f"COMMENT ON SCHEMA {quote_ident(view_schema)} IS {quote_literal(about)}"
            )
            if whole:
                await conn.execute(log_view_ddl(storage_schema, view_schema, app_id))
            infinity = await _numeric_infinity(conn)
            taken = {LOG_VIEW}
            for name in sorted(schemas):  # every model, so a clash is found the same way
                view_name = pg_identifier(name)
                if view_name in taken:
                    log.warning("app %s: model %r has no SQL view (name taken)", app_id, name)
                    continue
                taken.add(view_name)
                if name not in names:
                    continue
                ddl = model_view_ddl(
                    storage_schema,
                    view_schema,
                    app_id,
                    schemas[name],
                    schemas,
                    numeric_infinity=infinity,
                )
                view = f"{quote_ident(view_schema)}.{quote_ident(view_name)}"
                await _replace(conn, view, ddl)
            await conn.execute(
                "UPDATE sql_views SET generation = $2, format = $3 WHERE app = $1",
                app_id,
                generation,
                VIEWS_FORMAT,
            )
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", before)
    except (asyncpg.PostgresError, ValueError) as exc:
        if isinstance(exc, asyncpg.PostgresConnectionError):
            raise
        log.warning(
            "app %s: its SQL views in %s are not updated (made again at the next schema "
            "change or start): %s",
            app_id,
            view_schema,
            exc,
        )
        return False
    return True


async def views_current(conn: asyncpg.Connection, app_id: str, generation: int) -> bool:
    """True if ``app_id``'s views were made from ``generation`` in this format."""
    value = await conn.fetchval(
        "SELECT 1 FROM sql_views WHERE app = $1 AND generation = $2 AND format = $3 "
        "AND to_regnamespace(quote_ident(view_schema)) IS NOT NULL",
        app_id,
        generation,
        VIEWS_FORMAT,
    )
    return value is not None


async def stale_apps(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    """``(app, schema generation)`` of every app whose views are missing or out of date
    (or whose view schema is gone: a dump of the storage schema alone restored)."""
    rows = await conn.fetch(
        "SELECT a.app, a.schema_generation FROM apps AS a "
        "LEFT JOIN sql_views AS v ON v.app = a.app "
        "WHERE v.app IS NULL OR v.generation <> a.schema_generation OR v.format <> $1 "
        "OR to_regnamespace(quote_ident(v.view_schema)) IS NULL "  # e.g. a restored dump
        "ORDER BY a.app",
        VIEWS_FORMAT,
    )
    return [(r["app"], int(r["schema_generation"])) for r in rows]


async def drop_app_views(conn: asyncpg.Connection, storage_schema: str, app_id: str) -> None:
    """Drop ``app_id``'s view schema (and views built on it) and forget it."""
    name = await conn.fetchval("SELECT view_schema FROM sql_views WHERE app = $1", app_id)
    if name is None:
        return
    await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE")
    await conn.execute("DELETE FROM sql_views WHERE app = $1", app_id)


async def drop_views_of_storage(conn: asyncpg.Connection, storage_schema: str) -> None:
    """Drop every app's view schema of the storage schema ``storage_schema``: those named
    ``<storage schema>_app_...`` whose comment (set with the schema) ends with this storage
    schema's name, so this works once the storage's tables are gone too, and never drops
    another schema that only happens to start alike."""
    rows = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1) "
        "AND right(obj_description(oid, 'pg_namespace'), length($2)) = $2",
        f"{storage_schema}_app_",
        _schema_note_end(storage_schema),
    )
    for r in rows:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(r['nspname'])} CASCADE")


def _schema_note_end(storage_schema: str) -> str:
    return f"(storage schema {storage_schema})"
