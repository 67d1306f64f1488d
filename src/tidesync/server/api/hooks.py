"""``GET /api/v1/apps/{app}/webhooks`` (each hook's status) and
``POST /api/v1/apps/{app}/webhooks/{n}/resume`` (unpause hook ``n``); admin keys only."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..hub import SyncHub
from .access import ApiError, Caller, endpoint
from .webhooks import HookWorker, WebhookManager


def _workers(request: Request, caller: Caller) -> list[HookWorker]:
    if not caller.admin:
        raise ApiError(403, "webhooks are managed with an admin key", "forbidden")
    manager = getattr(request.app.state, "webhooks", None)
    if not isinstance(manager, WebhookManager):
        raise ApiError(503, "the server is not started", "unavailable")
    return manager.of(caller.app_id)


async def webhook_status(request: Request, hub: SyncHub, caller: Caller) -> Response:
    """Every hook of the app: state (new, active, paused), cursor, failures, last error."""
    workers = _workers(request, caller)
    return JSONResponse({"webhooks": [await w.status() for w in workers]})


async def webhook_resume(request: Request, hub: SyncHub, caller: Caller) -> Response:
    """Unpause one hook (404 for a hook the app does not have)."""
    workers = _workers(request, caller)
    text = request.path_params["index"]
    if not text.isdigit() or int(text) >= len(workers):
        raise ApiError(404, f"app {caller.app_id!r} has no webhook {text[:20]!r}", "unknown_hook")
    worker = workers[int(text)]
    await worker.resume()
    return JSONResponse(await worker.status())


def webhook_routes() -> list[BaseRoute]:
    """The webhooks' routes."""
    base = "/api/v1/apps/{app_id}/webhooks"
    return [
        Route(base, endpoint(webhook_status), methods=["GET"]),
        Route(base + "/{index}/resume", endpoint(webhook_resume), methods=["POST"]),
    ]
