"""What a Data API caller may read and write: the app's rules for a user, none for an admin.

The same :class:`~tidesync.server.rules.Permissions` a sync session of that user gets
(``server/flexsync.py``'s ``open_view``): the app's ``[apps.X.rules]`` bound to the app's
schemas and the user's fields. An app without rules lets every user read and write
everything, as on sync.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from ...core.schema import ModelSchema
from ..hub import SyncHub
from ..rules import Permissions, parse_rules, user_fields, user_values
from .access import Caller, app_settings


async def _user_values(hub: SyncHub, app_id: str, user_id: str) -> dict[str, Any]:
    users: Any = hub.auth.users
    fetch = users.user_data
    if inspect.iscoroutinefunction(fetch):
        record = await fetch(app_id, user_id)
    else:  # a synchronous store: keep the disk off the event loop
        record = await asyncio.to_thread(fetch, app_id, user_id)
    return user_values(user_id, record)


async def permissions_of(
    hub: SyncHub, caller: Caller, schemas: dict[str, ModelSchema]
) -> Permissions | None:
    """The caller's permissions (None for an admin: no rules apply)."""
    if caller.user_id is None:
        return None
    settings = app_settings(hub, caller.app_id)
    jwt_fields = settings.jwt.fields if settings.jwt is not None else {}
    rules = parse_rules(settings.rules, f"apps.{caller.app_id}.rules", jwt_fields)
    if rules is None:
        return Permissions(None, user_fields(caller.user_id), schemas)
    values = await _user_values(hub, caller.app_id, caller.user_id)
    return Permissions(rules, values, schemas)
