"""The ``tidesync`` command line: ``tidesync serve`` runs the sync server.

This is the console-script entry point declared in ``pyproject.toml``. Commands are thin:
they parse options into the library's own configuration objects and call the library, so
everything a command does is also available from Python.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

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
        int | None, typer.Option(help="Largest sync frame in bytes (default 16 MiB).")
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
    from .errors import DataFolderInUseError, ServerStartError
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
    except DataFolderInUseError as exc:  # another server runs on --data: status 2
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except ServerStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


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
