"""``tidesync data query|export|import``: a server's data from the command line, through
the Data API (:mod:`tidesync.admin`), so rules, merge and fan-out are the same as for
every other write.

The server, app and admin key come from ``--server``, ``--app`` and ``--admin-key`` or
from ``TIDESYNC_SERVER``, ``TIDESYNC_APP`` and ``TIDESYNC_ADMIN_KEY``. A refusal of the
server (an unknown model, a bad query, a wrong key) is one ``error:`` line and exit
status 2; a server that cannot be reached is exit status 1.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from .admin import AdminAPIError, AdminClient
from .cliutil import (
    USAGE_ERROR,
    AdminKeyOption,
    AppOption,
    ServerOption,
    check_server_options,
    fail,
)

data_app = typer.Typer(
    help="The server's data through the Data API: query, export, import.",
    no_args_is_help=True,
)

_Server = ServerOption
_App = AppOption
_Key = AdminKeyOption


def _client(server: str, app: str, key: str) -> AdminClient:
    check_server_options(server=server, app=app, admin_key=key)
    return AdminClient(server, app, api_key=key)


def _refused(exc: AdminAPIError) -> NoReturn:
    fail(exc.message if exc.status else str(exc), USAGE_ERROR if exc.status else 1)


@data_app.command("query")
def query(
    model: Annotated[str, typer.Argument(help="The model's name.")],
    text: Annotated[str, typer.Argument(help="A query (docs/query-language.md).")] = "",
    server: _Server = "",
    app: _App = "",
    admin_key: _Key = "",
    sort: Annotated[str, typer.Option(help="Sort by this field.")] = "",
    desc: Annotated[bool, typer.Option(help="Sort descending.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many objects.", min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines instead of a table.")] = False,
) -> None:
    """The objects of MODEL matching the query, as a table (or JSON Lines)."""
    with _client(server, app, admin_key) as admin:
        try:
            rows = list(
                admin.query(
                    model, text or None, sort=sort or None, desc=desc, limit=limit, raw=True
                )
            )
        except AdminAPIError as exc:
            _refused(exc)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    _table(model, rows)


def _table(model: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{model}: {len(rows)} object(s)"))
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(escape(column))
    for row in rows:
        table.add_row(*(escape(_cell(row.get(c))) for c in columns))
    # a pipe gets $COLUMNS (or 160), not rich's 80 for non-terminals
    width = None if sys.stdout.isatty() else shutil.get_terminal_size((160, 24)).columns
    Console(width=width).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


@data_app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="The model's name.")],
    text: Annotated[str, typer.Argument(help="A query; every object when left out.")] = "",
    server: _Server = "",
    app: _App = "",
    admin_key: _Key = "",
) -> None:
    """Every object of MODEL (matching the query) as JSON Lines on stdout."""
    count = 0
    with _client(server, app, admin_key) as admin:
        try:
            for row in admin.query(model, text or None, raw=True, page_size=1000):
                sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        except AdminAPIError as exc:
            _refused(exc)
    sys.stdout.flush()
    typer.echo(f"exported {count} object(s) of {model}", err=True)


def _lines(path: Path, skip: int) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if number <= skip or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                fail(f"{path}:{number}: not a JSON object: {exc}")
            if not isinstance(obj, dict):
                fail(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


@data_app.command("import")
def import_(
    model: Annotated[str, typer.Argument(help="The model's name.")],
    file: Annotated[Path, typer.Argument(help="A JSON Lines file (one object per line).")],
    server: _Server = "",
    app: _App = "",
    admin_key: _Key = "",
    batch: Annotated[
        int, typer.Option(help="Objects per transaction (one commit each).", min=1, max=10_000)
    ] = 500,
    resume: Annotated[
        bool, typer.Option(help="Skip the lines a previous run stored (FILE.progress).")
    ] = False,
) -> None:
    """Create or update the objects of a JSON Lines FILE in MODEL, in transactions.

    Each stored batch is noted in FILE.progress; --resume goes on after the last one (an
    upsert stored twice changes nothing, so a resume is always safe).
    """
    if not file.is_file():
        fail(f"{file}: no such file")
    progress_file = file.with_name(file.name + ".progress")
    done = 0
    if resume and progress_file.exists():
        try:
            done = int(progress_file.read_text().strip() or 0)
        except ValueError:
            fail(f"{progress_file}: not a line number; delete it to start again")
    with file.open(encoding="utf-8") as f:
        total = sum(1 for _ in f)
    stored = 0
    with _client(server, app, admin_key) as admin, _bar(total, done) as advance:
        pending: list[dict[str, Any]] = []
        last = done

        def flush() -> None:
            nonlocal stored
            if not pending:
                return
            try:
                admin.insert(model, list(pending), raw=True)
            except AdminAPIError as exc:
                fail(
                    f"lines {done + 1}-{last}: {exc.message if exc.status else exc}",
                    USAGE_ERROR if exc.status else 1,
                )
            stored += len(pending)
            progress_file.write_text(str(last))
            advance(len(pending))
            pending.clear()

        for number, obj in _lines(file, done):
            pending.append(obj)
            last = number
            if len(pending) >= batch:
                flush()
                done = last
        flush()
    progress_file.unlink(missing_ok=True)
    typer.echo(f"imported {stored} object(s) into {model}", err=True)


class _bar:
    """A rich progress bar on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, total: int, done: int) -> None:
        from rich.progress import Progress

        self._progress = Progress(transient=True, disable=not sys.stderr.isatty())
        self._task = self._progress.add_task("importing", total=total, completed=done)

    def __enter__(self) -> Any:
        self._progress.start()
        return lambda n: self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
