"""The backend's way in (DESIGN.md §8): the Data API, the change feed and webhooks.

Every route lives under ``/api/v1/apps/{app_id}/`` (the operators' server-wide ones
under ``/api/v1/admin/``, :mod:`.operate`) and answers JSON; every refusal is a
4xx ``{"error", "code"}`` (:class:`~.access.ApiError`). Writes take the sync path: the
hub's commit queue, the same merge and rules, fan-out to every device.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from .changes import change_routes
from .data import data_routes
from .hooks import webhook_routes
from .operate import operate_routes


def api_routes() -> list[BaseRoute]:
    """Every route of the backend API (they find the hub in ``app.state.hub``)."""
    routes: list[BaseRoute] = [
        *data_routes(),
        *change_routes(),
        *webhook_routes(),
        *operate_routes(),
    ]
    return routes
