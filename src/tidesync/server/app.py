"""The sync server's ASGI application: HTTP auth API, health check and sync WebSocket.

:func:`create_app` wires the pieces into one Starlette app whose lifespan opens the storage
(SQLite in the data folder by default), loads the token secret and starts the
:class:`~tidesync.server.hub.SyncHub`; on shutdown it says goodbye to every connection,
finishes the queued commits and closes the storage. Any ASGI server can run it; the
:mod:`~tidesync.server.runner` runs it on uvicorn. The web console (``server/console/``) is
mounted at ``/admin`` unless production mode has no admin key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from .api import api_routes
from .api.webhooks import WebhookManager
from .auth import Authenticator, auth_routes
from .config import ServerConfig
from .console import console_for, console_mount
from .hub import SyncHub
from .limits import BodySizeLimit
from .metrics import CONTENT_TYPE
from .schemapin import pin_declared_schemas
from .storage.base import ServerStorage, StorageError
from .storage.sqlite import SQLiteStorage

log = logging.getLogger("tidesync.server")

#: Builds the storage for a data folder.
StorageFactory = Callable[[Path], ServerStorage]

SYNC_PATH = "/api/v1/apps/{app_id}/sync"


def default_storage(data_dir: Path) -> ServerStorage:
    """SQLite storage in ``data_dir/server.sqlite3``."""
    return SQLiteStorage.in_folder(data_dir)


def storage_for(config: ServerConfig) -> StorageFactory:
    """The storage ``config.storage_url`` names: PostgreSQL for a URL, else SQLite."""
    url = config.storage_url
    if not url:
        return default_storage

    def postgres(data_dir: Path) -> ServerStorage:
        from .storage.postgres import PostgresStorage  # needs the ``postgres`` extra

        return PostgresStorage.from_url(url)

    return postgres


async def _ready(request: Request) -> Response:
    """200 when the storage answers and the server accepts sync connections, else 503."""
    hub = getattr(request.app.state, "hub", None)
    if not isinstance(hub, SyncHub):
        return JSONResponse({"status": "starting"}, status_code=503)
    if not hub.accepting:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        await asyncio.wait_for(hub.storage.check_ready(), timeout=5)
    except (StorageError, TimeoutError) as exc:
        return JSONResponse({"status": "storage unavailable", "error": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready"})


async def _metrics(request: Request) -> Response:
    """The server's counters in the Prometheus text format."""
    hub = getattr(request.app.state, "hub", None)
    if not isinstance(hub, SyncHub):
        return Response("", status_code=503)
    text = hub.metrics.render(
        connections=hub.connection_count, sessions=hub.session_count, ready=hub.accepting
    )
    return Response(text, media_type=CONTENT_TYPE)


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _sync(websocket: WebSocket) -> None:
    hub = getattr(websocket.app.state, "hub", None)
    if not isinstance(hub, SyncHub):
        await websocket.close(1011)
        return
    await hub.handle(websocket, websocket.path_params["app_id"])


def create_app(
    data_dir: str | Path,
    config: ServerConfig | None = None,
    *,
    storage_factory: StorageFactory | None = None,
) -> Starlette:
    """The server app for ``data_dir``; ``app.state`` holds auth, storage and hub once started."""
    folder = Path(data_dir)
    settings = config or ServerConfig()
    factory = storage_factory or storage_for(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        auth = Authenticator(folder, settings)  # users: SQLite in the folder, or PostgreSQL
        await auth.open()
        storage = factory(folder)
        try:
            await storage.open()
        except BaseException:
            await auth.aclose()
            raise
        try:
            await pin_declared_schemas(storage, settings)  # a mismatch stops the start
        except BaseException:
            await storage.close()
            await auth.aclose()
            raise
        hub = SyncHub(storage, auth, settings)
        hub.start()
        webhooks = WebhookManager(hub)  # each hook its own task; stopped before the hub
        webhooks.start()
        app.state.webhooks = webhooks
        auth.on_user_gone = hub.disconnect_user
        auth.on_login_ended = hub.disconnect_login
        app.state.auth = auth
        app.state.storage = storage
        app.state.hub = hub
        log.info("sync server started with data in %s", folder)
        try:
            yield
        finally:
            try:
                await webhooks.aclose()
                await hub.close()
            finally:
                await storage.close()
                await auth.aclose()
                log.info("sync server stopped")

    routes: list[BaseRoute] = [
        Route("/health", _health, methods=["GET"]),
        Route("/ready", _ready, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        *auth_routes(),
        *api_routes(),
        WebSocketRoute(SYNC_PATH, _sync),
    ]
    console = console_for(settings)  # None: production mode without an admin key
    if console is not None:
        routes.append(console_mount())
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.limits.max_request_body_bytes,
        api_max_bytes=settings.limits.max_api_body_bytes,
    )
    return app
