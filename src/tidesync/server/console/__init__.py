"""The web console at ``/admin`` (docs/console.md): sign-in, overview, sessions, users,
data.

:func:`console_mount` answers the mounted routes, or None when nobody could sign in
(production mode without ``[server] admin_keys``): then there is no console at all.
"""

from __future__ import annotations

from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import ServerConfig
from .datapages import (
    data_apps,
    data_delete,
    data_delete_form,
    data_edit,
    data_export,
    data_models,
    data_object,
    data_table,
)
from .pages import overview, session_events, sessions, signin, signin_form, signout
from .signin import ConsoleAuth
from .userpages import (
    user_api_key,
    user_delete,
    user_delete_form,
    user_disable,
    user_enable,
    users,
)
from .web import PREFIX, Console

__all__ = ["PREFIX", "Console", "console_for", "console_mount"]


def console_for(config: ServerConfig) -> Console | None:
    """The console of a server with ``config`` (None: no admin key, production mode)."""
    auth = ConsoleAuth(config.auth.admin_keys, one_time_link=config.development_mode)
    return Console(auth) if auth.enabled else None


def console_mount() -> Mount:
    """The console's routes under :data:`PREFIX` (``app.state.console`` must be set)."""
    static = StaticFiles(packages=[("tidesync.server.console", "static")])
    data = "/data/{app}/{model}"
    return Mount(
        PREFIX,
        routes=[
            Route("/", overview, methods=["GET"]),
            Route("/signin", signin_form, methods=["GET"]),
            Route("/signin", signin, methods=["POST"]),
            Route("/signout", signout, methods=["POST"]),
            Route("/sessions", sessions, methods=["GET"]),
            Route("/sessions/events", session_events, methods=["GET"]),
            Route("/users", users, methods=["GET"]),
            Route("/users/disable", user_disable, methods=["POST"]),
            Route("/users/enable", user_enable, methods=["POST"]),
            Route("/users/delete", user_delete_form, methods=["GET"]),
            Route("/users/delete", user_delete, methods=["POST"]),
            Route("/users/apikey", user_api_key, methods=["POST"]),
            Route("/data", data_apps, methods=["GET"]),
            Route("/data/{app}", data_models, methods=["GET"]),
            Route(data, data_table, methods=["GET"]),
            Route(data + "/export", data_export, methods=["GET"]),
            Route(data + "/object", data_object, methods=["GET"]),
            Route(data + "/object/edit", data_edit, methods=["POST"]),
            Route(data + "/object/delete", data_delete_form, methods=["GET"]),
            Route(data + "/object/delete", data_delete, methods=["POST"]),
            Mount("/static", app=static, name="static"),
        ],
    )
