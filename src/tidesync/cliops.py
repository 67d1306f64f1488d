"""``tidesync status``, ``tidesync sessions`` and ``tidesync users list|show|disable|
enable|delete``: a running server's state and users, through its admin API
(:mod:`tidesync.server.api.operate` and the user routes of :mod:`tidesync.server.auth`).

The server and admin key come from ``--server`` and ``--admin-key`` or from
``TIDESYNC_SERVER`` and ``TIDESYNC_ADMIN_KEY``; the ``users`` commands also need the app
(``--app`` or ``TIDESYNC_APP``), which only filters ``sessions``. Tables with rich, or
``--json`` (one object; a list as JSON Lines). A refusal of the server (a wrong key, an
unknown user or app) is one ``error:`` line and exit status 2; a server that cannot be
reached is exit status 1. Every answer is the answering process's (its connections).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer

from .cliutil import AdminKeyOption, AppOption, ServerOption, check_server_options, fail

users_app = typer.Typer(
    help="The app's users: list and search, show, disable, enable, delete.",
    no_args_is_help=True,
)

#: The most users one ``users list`` asks for (the server's page bound).
MAX_PAGE = 500
#: Seconds for one HTTP call.
TIMEOUT = 30.0

_Json = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


class _Server:
    """The admin API of one server: every refusal and failure ends the command."""

    def __init__(self, url: str, key: str) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=TIMEOUT,
        )

    def call(self, method: str, path: str, params: dict[str, str] | None = None) -> Any:
        """The JSON answer (None for 204); fails with the server's message."""
        try:
            response = self._http.request(method, path, params=params)
        except httpx.HTTPError as exc:
            fail(f"the server could not be reached: {exc}", 1)
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and body is not None:
            return body
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            fail(body["error"])
        fail(f"the server answered HTTP {response.status_code} (is --server a tidesync server?)")

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()


@contextmanager
def _server(url: str, **given: str) -> Iterator[_Server]:
    """The server at ``url`` with ``given["admin_key"]`` (every one of ``given`` needed)."""
    check_server_options(server=url, **given)
    server = _Server(url, given["admin_key"])
    try:
        yield server
    finally:
        server.close()


def _user_path(app: str, user_id: str = "") -> str:
    path = f"/api/v1/apps/{quote(app, safe='')}/admin/users"
    return path + (f"/{quote(user_id, safe='')}" if user_id else "")


# -- output --------------------------------------------------------------------------------


def _when(at: object) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def _state(row: dict[str, Any]) -> str:
    return "disabled" if row["disabled"] else "active"


def _print(renderable: Any) -> None:
    from rich.console import Console

    # a pipe gets $COLUMNS (or 160), not rich's 80 for non-terminals
    width = None if sys.stdout.isatty() else shutil.get_terminal_size((160, 24)).columns
    Console(width=width).print(renderable)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for column in columns:
        table.add_column(escape(column))
    for row in rows:
        table.add_row(*(escape("-" if v is None else str(v)) for v in row))
    _print(table)


def _facts(title: str, facts: Sequence[tuple[str, object]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in facts:
        table.add_row(escape(name), escape("-" if value is None else str(value)))
    _print(table)


def _lines(rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        typer.echo(json.dumps(row, ensure_ascii=False))


# -- status and sessions -------------------------------------------------------------------


def status(
    server: ServerOption = "", admin_key: AdminKeyOption = "", as_json: _Json = False
) -> None:
    """The server process's version, mode, storage, uptime, connections, sessions, apps."""
    with _server(server, admin_key=admin_key) as api:
        view = api.call("GET", "/api/v1/admin/status")
    if as_json:
        typer.echo(json.dumps(view, ensure_ascii=False))
        return
    up = int(view["uptime_seconds"])
    _facts(
        "tidesync server",
        [
            ("version", view["version"]),
            ("mode", view["mode"]),
            ("storage", view["storage"]),
            ("process", view["process"]),
            ("up since", f"{_when(view['started_at'])} UTC"),
            ("uptime", f"{up // 86400}d {up % 86400 // 3600}h {up % 3600 // 60}m"),
            ("connections", view["connections"]),
            ("sessions", view["sessions"]),
        ],
    )
    apps = [(a["app_id"], a["sessions"], a["unbound"]) for a in view["apps"]]
    _table("apps", ["app", "sessions", "connections without a session"], apps)


def sessions(
    server: ServerOption = "",
    admin_key: AdminKeyOption = "",
    app: AppOption = "",
    user: Annotated[str, typer.Option(help="Only users whose id contains this.")] = "",
    live: Annotated[bool, typer.Option(help="Only live sessions (not lately ended).")] = False,
    as_json: _Json = False,
) -> None:
    """One row per device session (and connection without one), live first."""
    params = {k: v for k, v in (("app", app), ("user", user)) if v}
    with _server(server, admin_key=admin_key) as api:
        rows: list[dict[str, Any]] = api.call("GET", "/api/v1/admin/sessions", params)["sessions"]
    if live:
        rows = [r for r in rows if r["live"]]
    if as_json:
        _lines(rows)
        return
    _table(
        f"{len(rows)} session(s)",
        ["app", "user", "file", "state", "connected", "ended", "download", "upload", "error"],
        [
            (
                r["app_id"],
                r["user_id"],
                r["file_ident"] or None,
                r["state"],
                _when(r["connected_at"]),
                _when(r["ended_at"]),
                f"{r['download_cursor']}/{r['latest_version']}",
                r["upload_acked"],
                r["error"],
            )
            for r in rows
        ],
    )


# -- users ---------------------------------------------------------------------------------


@users_app.command("list")
def users_list(
    search: Annotated[str, typer.Argument(help="An id or e-mail prefix.")] = "",
    server: ServerOption = "",
    app: AppOption = "",
    admin_key: AdminKeyOption = "",
    limit: Annotated[int, typer.Option(help="At most this many users.", min=1, max=MAX_PAGE)] = 100,
    after: Annotated[str, typer.Option(help="Start after this user id (the next page).")] = "",
    as_json: _Json = False,
) -> None:
    """The app's users by id (a search keeps those whose id or e-mail starts with it)."""
    params = {"limit": str(limit), "search": search, "after": after}
    with _server(server, app=app, admin_key=admin_key) as api:
        page = api.call("GET", _user_path(app), params)
    found: list[dict[str, Any]] = page["users"]
    if as_json:
        _lines(found)
    else:
        _table(
            f"{app}: {len(found)} user(s)",
            ["user", "e-mail", "provider", "created (UTC)", "last login (UTC)", "state", "devices"],
            [
                (
                    u["user_id"],
                    u["email"],
                    u["provider"],
                    _when(u["created_at"]),
                    _when(u["last_login"]),
                    _state(u),
                    u["devices"],
                )
                for u in found
            ],
        )
    if page["next"] is not None:
        typer.echo(f"more: --after {page['next']}", err=True)


@users_app.command("show")
def users_show(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    server: ServerOption = "",
    app: AppOption = "",
    admin_key: AdminKeyOption = "",
    as_json: _Json = False,
) -> None:
    """One user: provider, e-mail, created, state, devices, profile, API keys."""
    with _server(server, app=app, admin_key=admin_key) as api:
        user = api.call("GET", _user_path(app, user_id))
    if as_json:
        typer.echo(json.dumps(user, ensure_ascii=False))
        return
    profile: dict[str, Any] = user["profile"]
    _facts(
        f"user {user['user_id']}",
        [
            ("app", app),
            ("provider", user["provider"]),
            ("e-mail", user["email"]),
            ("created", f"{_when(user['created_at'])} UTC"),
            ("last login", _when(user["last_login"]) + (" UTC" if user["last_login"] else "")),
            ("state", _state(user)),
            ("devices", user["devices"]),
            ("connections", user["connections"]),
            *((f"profile.{k}", json.dumps(v, ensure_ascii=False)) for k, v in profile.items()),
        ],
    )
    keys = user["api_keys"]
    if keys:
        _table(
            "API keys",
            ["id", "name", "state", "created (UTC)"],
            [
                (
                    k["id"],
                    k["name"],
                    "disabled" if k["disabled"] else "active",
                    _when(k["created_at"]),
                )
                for k in keys
            ],
        )


def _act(server: str, app: str, key: str, user_id: str, method: str, action: str) -> None:
    with _server(server, app=app, admin_key=key) as api:
        api.call(method, _user_path(app, user_id) + (f"/{action}" if method == "POST" else ""))


def _done(app: str, user_id: str, done: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"app_id": app, "user_id": user_id, "done": done}))
    else:
        typer.echo(f"{done} user {user_id} of {app}")


@users_app.command("disable")
def users_disable(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    server: ServerOption = "",
    app: AppOption = "",
    admin_key: AdminKeyOption = "",
    as_json: _Json = False,
) -> None:
    """Disable a user: its logins are revoked and its sync connections closed."""
    _act(server, app, admin_key, user_id, "POST", "disable")
    _done(app, user_id, "disabled", as_json)


@users_app.command("enable")
def users_enable(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    server: ServerOption = "",
    app: AppOption = "",
    admin_key: AdminKeyOption = "",
    as_json: _Json = False,
) -> None:
    """Enable a disabled user again (it logs in anew)."""
    _act(server, app, admin_key, user_id, "POST", "enable")
    _done(app, user_id, "enabled", as_json)


@users_app.command("delete")
def users_delete(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    server: ServerOption = "",
    app: AppOption = "",
    admin_key: AdminKeyOption = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: _Json = False,
) -> None:
    """Delete a user and its credentials (its connections close; synced data stays)."""
    check_server_options(server=server, app=app, admin_key=admin_key)
    if not yes:
        if not sys.stdin.isatty():
            fail("deleting a user cannot be undone: add --yes to confirm")
        if not typer.confirm(f"Delete user {user_id} of {app}?"):
            fail("not deleted")
    _act(server, app, admin_key, user_id, "DELETE", "")
    _done(app, user_id, "deleted", as_json)
