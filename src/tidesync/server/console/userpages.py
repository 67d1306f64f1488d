"""The console's Users page: list and search an app's users (an id or e-mail prefix, a page
at a time: :meth:`UserStore.list_users <tidesync.server.users.UserStore.list_users>`), see
one, disable, enable, delete (with confirmation), and disable, enable or revoke its API
keys.

Disabling and deleting go through :meth:`Authenticator.end_user
<tidesync.server.auth.Authenticator.end_user>`, so the user's refresh tokens are revoked and
its live sync connections closed exactly as the admin API does (docs/console.md).
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
#: Users per page of the list.
USERS_PAGE = 50


def _users_href(app: str, user: str, **more: str) -> str:
    return "/users?" + urlencode({"app": app, "user": user, **more})


def _store(hub: SyncHub) -> UserStore:
    store: UserStore = hub.auth.users
    return store


def _devices(hub: SyncHub, app: str) -> dict[str, int]:
    """Live device sessions per user of ``app``."""
    counts: dict[str, int] = {}
    for row in hub.session_snapshot():
        if row.live and row.app_id == app and row.user_id is not None and row.session:
            counts[row.user_id] = counts.get(row.user_id, 0) + 1
    return counts


@page
async def users(ctx: Ctx) -> Response:
    """The search form, a page of the app's users, and the user asked for."""
    hub = ctx.require_hub()
    params = ctx.request.query_params
    app, user = params.get("app", "").strip(), params.get("user", "").strip()
    search, after = params.get("q", "").strip(), params.get("after", "")
    store = _store(hub)
    devices = _devices(hub, app) if app else {}
    listed = await store.list_users(app, search, after=after, limit=USERS_PAGE) if app else []
    more = listed[-1].user_id if len(listed) == USERS_PAGE else ""
    found: dict[str, Any] | None = None
    if app and user:
        record = await store.get_user(app, user)
        if record is not None:
            found = {
                "status": "disabled" if record.disabled else "active",
                "record": record,
                "data": sorted((await store.user_data(app, user) or {}).items()),
                "keys": await store.list_api_keys(app, user),
                "connections": hub.user_connections(app, user),
            }
    return ctx.render(
        "users.html",
        nav="users",
        app=app,
        user=user,
        q=search,
        apps=live_apps(hub),
        listed=[(u, devices.get(u.user_id, 0)) for u in listed],
        next_href=_list_href(app, search, more) if more else "",
        found=found,
        done=params.get("done", ""),
    )


def _list_href(app: str, search: str, after: str) -> str:
    return "/users?" + urlencode({"app": app, "q": search, "after": after})


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
