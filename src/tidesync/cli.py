"""The ``tidesync`` command line: ``tidesync serve`` runs the sync server.

This is the console-script entry point declared in ``pyproject.toml``. Commands are thin:
they parse options into the library's own configuration objects and call the library, so
everything a command does is also available from Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

if TYPE_CHECKING:
    from .server.users import UserStore

T = TypeVar("T")

app = typer.Typer(
    name="tidesync",
    help="tidesync: an offline-first database for Python with device sync.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """tidesync: an offline-first database for Python with device sync."""


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).", min=0)] = 8765,
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
            min=0.0,
        ),
    ] = None,
) -> None:
    """Run the sync server (development mode) until SIGINT or SIGTERM."""
    from .errors import ConfigurationError, DataFolderInUseError, ServerStartError
    from .eventloop import new_event_loop
    from .server.config import ServerConfig
    from .server.runner import print_url, serve_forever

    options: dict[str, object] = {"log_level": log_level.lower(), "storage_url": storage}
    if log_format not in ("text", "json"):
        raise typer.BadParameter("--log-format must be text or json")
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
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    from .server.logfmt import configure_logging

    configure_logging(log_level, log_format)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve_forever(data, host, port, config, announce=print_url))
    except (ConfigurationError, DataFolderInUseError) as exc:  # user mistakes: status 2
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except ServerStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


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
        typer.echo(f"error: --data {data} is not a server's data folder", err=True)
        raise typer.Exit(2)
    return user_store_for(storage, data)


async def _guarded(work: Awaitable[T]) -> T:
    """Run ``work``; a store that cannot be opened is one line on stderr and exit 2."""
    from .errors import TidesyncError

    try:
        return await work
    except (TidesyncError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


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
        typer.echo(f"error: no server data in {data} (server.sqlite3 is missing)", err=True)
        raise typer.Exit(2)
    try:
        config = ServerConfig(storage_url=storage)
        prefix = "" if schema_file else f"apps.{app_id}.schema."
        text = asyncio.run(export_schema(data, config, app_id, prefix))
    except (TidesyncError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(text, nl=False)


@app.command()
def demo(
    limit: float = typer.Option(60.0, help="Stop after this many seconds at most."),
) -> None:
    """Start a server and two devices (separate processes) that edit the same data, live."""
    from .demo import run_demo

    raise typer.Exit(run_demo(limit))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
