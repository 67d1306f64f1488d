"""The admin API of operators (``tidesync status|sessions|users``), admin keys only:

- ``GET /api/v1/admin/status``: this process's overview (:mod:`..overview`);
- ``GET /api/v1/admin/sessions?app=&user=``: the device sessions the console shows;
- ``GET /api/v1/apps/{app_id}/admin/users?search=&after=&limit=``: the app's users by id,
  a page at a time (``next`` is the ``after`` of the next page, null after the last);
- ``GET /api/v1/apps/{app_id}/admin/users/{user_id}``: one user with its API keys (ids,
  names, state; never a key).

Disable, enable and delete are the routes of :func:`~tidesync.server.auth.auth_routes`.
Every value is the answering process's: its live sessions and connections.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..hub import SyncHub
from ..overview import filter_sessions, server_overview
from ..users import MAX_USER_PAGE, UserRecord
from .access import ApiError, Caller, admin_endpoint, endpoint, require_admin

#: The page size of a user list without ``limit``.
DEFAULT_USER_PAGE = 100


async def status(request: Request, hub: SyncHub) -> Response:
    """This process's version, mode, storage, uptime, connections, sessions and apps."""
    return JSONResponse(server_overview(hub).to_json())


async def sessions(request: Request, hub: SyncHub) -> Response:
    """The device sessions (live, then lately ended), filtered by ``app`` and ``user``."""
    params = request.query_params
    rows = filter_sessions(
        hub.session_snapshot(), params.get("user", "").strip(), params.get("app", "").strip()
    )
    return JSONResponse({"sessions": [row.to_json() for row in rows]})


def _devices(hub: SyncHub, app_id: str) -> dict[str, int]:
    """Live bound device sessions per user of the app."""
    counts: dict[str, int] = {}
    for row in hub.session_snapshot():
        if row.live and row.app_id == app_id and row.user_id is not None and row.session:
            counts[row.user_id] = counts.get(row.user_id, 0) + 1
    return counts


def _user_json(user: UserRecord, devices: dict[str, int]) -> dict[str, object]:
    return {**user.to_json(), "devices": devices.get(user.user_id, 0)}


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_USER_PAGE
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_USER_PAGE:
        raise ApiError(
            400,
            f"limit must be a whole number from 1 to {MAX_USER_PAGE}, not {raw!r}",
            "bad_request",
        )
    return limit


async def users(request: Request, hub: SyncHub, caller: Caller) -> Response:
    """A page of the app's users (``search``: an id or e-mail prefix)."""
    require_admin(caller)
    params = request.query_params
    limit = _limit(params.get("limit"))
    found = await hub.auth.users.list_users(
        caller.app_id, params.get("search", "").strip(), after=params.get("after", ""), limit=limit
    )
    devices = _devices(hub, caller.app_id)
    more = len(found) == limit
    return JSONResponse(
        {
            "users": [_user_json(u, devices) for u in found],
            "next": found[-1].user_id if more else None,
        }
    )


async def user(request: Request, hub: SyncHub, caller: Caller) -> Response:
    """One user: its record, live devices and connections, profile and API keys."""
    require_admin(caller)
    app_id, user_id = caller.app_id, request.path_params["user_id"]
    store = hub.auth.users
    record = await store.get_user(app_id, user_id)
    if record is None:
        raise ApiError(404, f"app {app_id!r} has no user {user_id!r}", "not_found")
    profile = await store.user_data(app_id, user_id) or {}
    profile.pop("provider", None)
    keys = await store.list_api_keys(app_id, user_id)
    return JSONResponse(
        {
            **_user_json(record, _devices(hub, app_id)),
            "connections": hub.user_connections(app_id, user_id),
            "profile": profile,
            "api_keys": [k.to_json() for k in keys],
        }
    )


def operate_routes() -> list[BaseRoute]:
    """The routes of this module."""
    users_path = "/api/v1/apps/{app_id}/admin/users"
    return [
        Route("/api/v1/admin/status", admin_endpoint(status), methods=["GET"]),
        Route("/api/v1/admin/sessions", admin_endpoint(sessions), methods=["GET"]),
        Route(users_path, endpoint(users), methods=["GET"]),
        Route(users_path + "/{user_id}", endpoint(user), methods=["GET"]),
    ]
