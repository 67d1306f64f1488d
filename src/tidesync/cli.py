"""The ``tidesync`` command line: ``tidesync serve`` runs the sync server.

This is the console-script entry point declared in ``pyproject.toml``. Commands are thin:
they parse options into the library's own configuration objects and call the library, so
everything a command does is also available from Python.

Every mistake a user can make on the command line (a bad option value, an unknown option,
a configuration file that does not parse) is one line on stderr, ``error: ...``, and exit
status 2, through :func:`fail` (and :func:`main` for the mistakes typer finds itself);
never a traceback, never a multi-line usage panel. A failure to start (port in use) is 1.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from . import cliops
from .clidata import data_app
from .cliops import users_app
from .cliutil import fail, say_error

if TYPE_CHECKING:
    from .server.users import UserStore

T = TypeVar("T")

app = typer.Typer(
    name="tidesync",
    help="tidesync: an offline-first database for Python with device sync.",
    no_args_is_help=True,
    add_completion=False,
)


#: The log levels ``--log-level`` accepts (uvicorn's names, any case).
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: The formats ``--log-format`` accepts.
LOG_FORMATS = ("text", "json")


def version() -> str:
    """The installed tidesync's version (the package's ``__version__`` when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tidesync")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tidesync {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """tidesync: an offline-first database for Python with device sync."""


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port, 0-65535 (0 picks a free one).")] = 8765,
    data: Annotated[Path, typer.Option(help="Data folder (SQLite storage, token secret).")] = Path(
        "./tidesync-data"
    ),
    access_token_ttl: Annotated[
        float | None, typer.Option(help="Access token lifetime in seconds (default 1800).")
    ] = None,
    max_frame_size: Annotated[
        int | None, typer.Option(help="Largest sync frame in bytes (default 17 MiB).")
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="Log level: critical, error, warning, info, debug.")
    ] = "warning",
    storage: Annotated[
        str,
        typer.Option(
            envvar="TIDESYNC_STORAGE",
            help="Sync data storage: empty for SQLite in --data, or "
            "postgresql://user@host:port/db[?schema=name] (several servers may share it).",
        ),
    ] = "",
    log_format: Annotated[
        str, typer.Option(help="Log line format: text, or json (one object per line).")
    ] = "text",
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", help="TOML configuration file (production mode: apps, auth, limits)."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="TLS certificate chain (PEM): serve https/wss.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    history_retention_days: Annotated[
        float | None,
        typer.Option(
            help="Trim sync history older than this many days (fractions allowed; off by "
            "default). Devices further behind get a client reset.",
        ),
    ] = None,
) -> None:
    """Run the sync server (development mode) until SIGINT or SIGTERM."""
    from .errors import ConfigurationError, DataFolderInUseError, ServerStartError
    from .eventloop import new_event_loop
    from .server.config import ServerConfig
    from .server.runner import print_url, serve_forever

    _check_serve_options(port, log_level, log_format, access_token_ttl, max_frame_size)
    if history_retention_days is not None and not history_retention_days >= 0:
        fail(f"--history-retention-days must not be negative (got {history_retention_days})")
    options: dict[str, object] = {"log_level": log_level.lower(), "storage_url": storage}
    if access_token_ttl is not None:
        options["access_token_ttl"] = access_token_ttl
    if max_frame_size is not None:
        options["max_frame_size"] = max_frame_size
    if history_retention_days:
        options["history_retention"] = history_retention_days * 86400.0
    if tls_cert is not None or tls_key is not None:
        options["tls_cert"] = str(tls_cert) if tls_cert is not None else None
        options["tls_key"] = str(tls_key) if tls_key is not None else None
    try:
        if config_file is not None:
            from .server.settings import load_config

            if not storage:
                del options["storage_url"]  # the file may name the storage
            config = load_config(config_file, **options)
        else:
            config = ServerConfig(**options)  # type: ignore[arg-type]
    except ValueError as exc:  # ConfigurationError is one: it names the file and line
        fail(str(exc))
    _check_data_folder(data)
    from .server.logfmt import configure_logging

    configure_logging(log_level, log_format)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve_forever(data, host, port, config, announce=print_url))
    except (ConfigurationError, DataFolderInUseError) as exc:  # user mistakes: status 2
        fail(str(exc))
    except ServerStartError as exc:
        fail(str(exc), 1)


def _check_serve_options(
    port: int,
    log_level: str,
    log_format: str,
    access_token_ttl: float | None,
    max_frame_size: int | None,
) -> None:
    """``tidesync serve``'s option values, checked before anything starts."""
    from .protocol.messages import MIN_MAX_FRAME_SIZE

    if not 0 <= port <= 65535:
        fail(f"--port {port} is outside 0-65535")
    if log_level.lower() not in LOG_LEVELS:
        fail(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if log_format not in LOG_FORMATS:
        fail(f"--log-format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    if access_token_ttl is not None and not access_token_ttl > 0:
        fail(f"--access-token-ttl must be a positive number of seconds (got {access_token_ttl})")
    if max_frame_size is not None and max_frame_size < MIN_MAX_FRAME_SIZE:
        fail(f"--max-frame-size must be at least {MIN_MAX_FRAME_SIZE} bytes (got {max_frame_size})")


def _check_data_folder(data: Path) -> None:
    """``--data`` is a writable directory, or is created now (as the server would)."""
    if data.exists() and not data.is_dir():
        fail(f"--data {data} exists and is not a directory")
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--data {data} cannot be created: {exc.strerror or exc}")
    if not os.access(data, os.W_OK | os.X_OK):
        fail(f"--data {data} is not writable")


app.add_typer(data_app, name="data")
app.add_typer(users_app, name="users")
app.command("status")(cliops.status)
app.command("sessions")(cliops.sessions)

keys_app = typer.Typer(help="Token signing keys: list them, rotate them.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

_DATA_HELP = "The server's data folder (SQLite storage: users.sqlite3, secret.key)."
_STORAGE_HELP = "The server's storage URL, for a PostgreSQL deployment (its users live there)."


@keys_app.command("rotate")
def keys_rotate(
    data: Annotated[Path, typer.Option(help=_DATA_HELP)] = Path("./tidesync-data"),
    storage: Annotated[str, typer.Option(envvar="TIDESYNC_STORAGE", help=_STORAGE_HELP)] = "",
    after: Annotated[
        float,
        typer.Option(
            help="Seconds until the new key starts signing (every server process reloads "
            "the keys every 30 s, so keep this above that).",
            min=0.0,
        ),
    ] = 120.0,
) -> None:
    """Add a new signing key: it signs new tokens after --after seconds; tokens signed by
    the old key keep working until they expire, then the old key is dropped."""
    import time

    from .server.signing import current_key

    async def rotate() -> tuple[str, str, float]:
        store = _user_store(data, storage)
        await store.open()
        try:
            old = current_key(await store.signing_keys(), time.time())
            new = await store.add_signing_key(time.time() + after)
        finally:
            await store.close()
        return old.kid, new.kid, new.signs_from

    old, new, signs_from = asyncio.run(_guarded(rotate()))
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(signs_from))
    typer.echo(
        f"new signing key {new} signs from {when}; key {old} verifies until its tokens expire"
    )


@keys_app.command("list")
def keys_list(
    data: Annotated[Path, typer.Option(help=_DATA_HELP)] = Path("./tidesync-data"),
    storage: Annotated[str, typer.Option(envvar="TIDESYNC_STORAGE", help=_STORAGE_HELP)] = "",
) -> None:
    """List the signing keys (never their secrets) and which one signs now."""
    import time

    from .server.signing import current_key

    async def listing() -> list[tuple[str, float]]:
        store = _user_store(data, storage)
        await store.open()
        try:
            keys = await store.signing_keys()
        finally:
            await store.close()
        now = time.time()
        signing = current_key(keys, now).kid
        return [(k.kid + (" (signs now)" if k.kid == signing else ""), k.signs_from) for k in keys]

    for name, signs_from in sorted(asyncio.run(_guarded(listing())), key=lambda r: r[1]):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(signs_from))
        typer.echo(f"{name}\tsigns from {when}")


def _user_store(data: Path, storage: str) -> UserStore:
    from .server.users import user_store_for

    if not storage and not data.is_dir():
        fail(f"--data {data} is not a server's data folder")
    return user_store_for(storage, data)


async def _guarded(work: Awaitable[T]) -> T:
    """Run ``work``; a store that cannot be opened is one line on stderr and exit 2."""
    from .errors import TidesyncError

    try:
        return await work
    except (TidesyncError, OSError) as exc:
        fail(str(exc))


schema_app = typer.Typer(
    help="The schema the server has stored, as the configuration declares it.",
    no_args_is_help=True,
)
app.add_typer(schema_app, name="schema")


@schema_app.command("export")
def schema_export(
    app_id: Annotated[str, typer.Option("--app", help="The app whose schema to print.")],
    data: Annotated[Path, typer.Option(help="The server's data folder (SQLite storage).")] = Path(
        "./tidesync-data"
    ),
    storage: Annotated[
        str,
        typer.Option(envvar="TIDESYNC_STORAGE", help="A postgresql:// URL instead of --data."),
    ] = "",
    schema_file: Annotated[
        bool,
        typer.Option(
            "--schema-file", help="Print a file for schema_file (no [apps.<app>.schema] prefix)."
        ),
    ] = False,
) -> None:
    """Print the app's stored schema as TOML to paste into the configuration file."""
    from .errors import TidesyncError
    from .server.config import ServerConfig
    from .server.schemapin import export_schema

    if not storage and not (data / "server.sqlite3").is_file():
        fail(f"no server data in {data} (server.sqlite3 is missing)")
    try:
        config = ServerConfig(storage_url=storage)
        prefix = "" if schema_file else f"apps.{app_id}.schema."
        text = asyncio.run(export_schema(data, config, app_id, prefix))
    except (TidesyncError, ValueError) as exc:
        fail(str(exc), 1)
    typer.echo(text, nl=False)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A local or synced database file.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (for scripts).")
    ] = False,
) -> None:
    """Show what a database file holds (schema, objects, pending changes, subscriptions,
    cursors, size), reading it without changing it and without syncing."""
    import json

    from .client.inspection import inspect_file
    from .errors import DatabaseFileError

    try:
        report = inspect_file(file)
    except DatabaseFileError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, default=str))
        return
    _print_report(report.to_json())


def _print_report(report: dict[str, Any]) -> None:
    """``tidesync inspect``'s human output: rich tables of the report's parts (every value
    from the file is escaped, so ``list[str]`` or a query's brackets print as written)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    size = f"{report['file_bytes']:,} bytes"
    if report["wal_bytes"]:
        size += f" (+ {report['wal_bytes']:,} bytes of write-ahead log)"
    console.print(f"[bold]{escape(report['path'])}[/bold]: {size}, origin {report['origin']}")
    models = Table(title="Models")
    for column in ("model", "objects", "primary key", "fields"):
        models.add_column(column, justify="right" if column == "objects" else "left")
    for name, model in report["models"].items():
        fields = ", ".join(f"{f['name']}: {f['type']}" for f in model["fields"])
        models.add_row(
            escape(name), str(model["objects"]), escape(model["primary_key"]), escape(fields)
        )
    console.print(models)
    sync = Table(title="Sync")
    sync.add_column("")
    sync.add_column("value", justify="right")
    pending = report["pending"]
    sync.add_row("pending changesets", str(pending["changesets"]))
    sync.add_row("pending bytes", f"{pending['bytes']:,}")
    for key, value in report["cursors"].items():
        sync.add_row(key.replace("_", " "), str(value))
    console.print(sync)
    subs = report["subscription_set"]
    if subs is None:
        console.print("No subscription set (a local file, or flexible sync never subscribed).")
        return
    note = f" ({subs['error']})" if subs["error"] else ""
    table = Table(title=escape(f"Subscription set {subs['version']}: {subs['state']}{note}"))
    for column in ("name", "model", "query", "args"):
        table.add_column(column)
    for sub in report["subscriptions"]:
        args = ", ".join(repr(a) for a in sub["args"])
        table.add_row(
            escape(sub["name"] or ""), escape(sub["model"]), escape(sub["query"]), escape(args)
        )
    console.print(table)


@app.command()
def demo(
    limit: float = typer.Option(60.0, help="Stop after this many seconds at most."),
) -> None:
    """Start a server and two devices (separate processes) that edit the same data, live."""
    from .demo import run_demo

    raise typer.Exit(run_demo(limit))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the command and exits with its status. A mistake
    typer finds (an unknown option, a value of the wrong type) is one ``error:`` line and
    exit status 2, like the commands' own checks."""
    try:
        status = app(args=argv, prog_name="tidesync", standalone_mode=False)
    except typer.TyperException as exc:  # typer's usage errors (click's, vendored)
        # A group run without a command has printed its help already; typer itself tells
        # this error by its name (typer/rich_utils.py), as it is not exported.
        if type(exc).__name__ != "NoArgsIsHelpError":
            say_error(exc.format_message())
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
