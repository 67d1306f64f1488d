"""The console's Users page: find a user by app and id, see it, disable, enable, delete
(with confirmation), and disable, enable or revoke its API keys.

Disabling and deleting go through :meth:`Authenticator.end_user
<tidesync.server.auth.Authenticator.end_user>`, so the user's refresh tokens are revoked and
its live sync connections closed exactly as the admin API does. The user store has no
listing or search by e-mail yet: the page lists the users with a live connection and looks
others up by id (docs/console.md).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from ..hub import SyncHub
from ..users import UserStore
from .pages import live_apps
from .web import Ctx, page, redirect

#: ``action`` values of the API key form.
KEY_ACTIONS = ("disable", "enable", "revoke")


def _users_href(app: str, user: str, **more: str) -> str:
    return "/users?" + urlencode({"app": app, "user": user, **more})


def _store(hub: SyncHub) -> UserStore:
    store: UserStore = hub.auth.users
    return store


def _connected(hub: SyncHub) -> list[tuple[str, str, int]]:
    """(app, user, live sessions) of the users with a live connection."""
    counts: dict[tuple[str, str], int] = {}
    for row in hub.session_snapshot():
        if row.live and row.user_id is not None:
            key = (row.app_id, row.user_id)
            counts[key] = counts.get(key, 0) + (1 if row.session is not None else 0)
    return sorted((a, u, n) for (a, u), n in counts.items())


@page
async def users(ctx: Ctx) -> Response:
    """The lookup form, the connected users, and the user asked for."""
    hub = ctx.require_hub()
    params = ctx.request.query_params
    app, user = params.get("app", "").strip(), params.get("user", "").strip()
    connected = _connected(hub)
    needle = user.lower()
    shown = [c for c in connected if (not app or c[0] == app) and needle in c[1].lower()]
    found: dict[str, Any] | None = None
    if app and user:
        store = _store(hub)
        status = await store.user_status(app, user)
        if status is not None:
            found = {
                "status": status,
                "data": sorted((await store.user_data(app, user) or {}).items()),
                "keys": await store.list_api_keys(app, user),
                "connections": hub.user_connections(app, user),
            }
    return ctx.render(
        "users.html",
        nav="users",
        app=app,
        user=user,
        apps=live_apps(hub),
        connected=shown,
        found=found,
        done=params.get("done", ""),
    )


def _target(ctx: Ctx) -> tuple[str, str]:
    assert ctx.form is not None
    return ctx.form.get("app", ""), ctx.form.get("user", "")


@page
async def user_disable(ctx: Ctx) -> Response:
    """POST ``app``, ``user``: disable (its connections end)."""
    hub = ctx.require_hub()
    app, user = _target(ctx)
    if not await hub.auth.end_user(app, user, delete=False):
        return ctx.render("error.html", 404, message=f"app {app!r} has no user {user!r}")
    return redirect(_users_href(app, user, done="disabled"))


@page
async def user_enable(ctx: Ctx) -> Response:
    """POST ``app``, ``user``: enable again."""
    hub = ctx.require_hub()
    app, user = _target(ctx)
    if not await _store(hub).set_disabled(app, user, False):
        return ctx.render("error.html", 404, message=f"app {app!r} has no user {user!r}")
    return redirect(_users_href(app, user, done="enabled"))


@page
async def user_delete_form(ctx: Ctx) -> Response:
    """Ask before deleting a user."""
    params = ctx.request.query_params
    return ctx.render(
        "user_delete.html", nav="users", app=params.get("app", ""), user=params.get("user", "")
    )


@page
async def user_delete(ctx: Ctx) -> Response:
    """POST ``app``, ``user``: delete the user (its connections end)."""
    hub = ctx.require_hub()
    app, user = _target(ctx)
    if not await hub.auth.end_user(app, user, delete=True):
        return ctx.render("error.html", 404, message=f"app {app!r} has no user {user!r}")
    return redirect("/users?" + urlencode({"app": app, "done": "deleted"}))


@page
async def user_api_key(ctx: Ctx) -> Response:
    """POST ``app``, ``user``, ``key``, ``action`` (disable, enable, revoke)."""
    hub = ctx.require_hub()
    app, user = _target(ctx)
    assert ctx.form is not None
    key, action = ctx.form.get("key", ""), ctx.form.get("action", "")
    if action not in KEY_ACTIONS:
        return ctx.render("error.html", 400, message=f"action must be one of {KEY_ACTIONS}")
    store = _store(hub)
    if action == "revoke":
        ok = await store.delete_api_key(app, user, key)
    else:
        ok = await store.set_api_key_disabled(app, user, key, action == "disable")
    if not ok:
        return ctx.render("error.html", 404, message=f"user {user!r} has no API key {key!r}")
    return redirect(_users_href(app, user, done=f"key {action}d"))
