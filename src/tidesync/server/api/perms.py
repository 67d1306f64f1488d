"""What a Data API caller may read and write: the app's rules for a user, none for an admin.

The same :class:`~tidesync.server.rules.Permissions` a sync session of that user gets
(``server/flexsync.py``'s ``open_view``): the app's ``[apps.X.rules]`` bound to the app's
schemas and the user's fields. An app without rules lets every user read and write
everything, as on sync.
"""

from __future__ import annotations

from ...core.schema import ModelSchema
from ..hub import SyncHub
from ..rules import Permissions, user_fields
from .access import Caller, app_settings


async def permissions_of(
    hub: SyncHub, caller: Caller, schemas: dict[str, ModelSchema]
) -> Permissions | None:
    """The caller's permissions (None for an admin: no rules apply)."""
    if caller.user_id is None:
        return None
    app_settings(hub, caller.app_id)  # 404 for an app the server does not serve
    rules = hub.auth.app_rules(caller.app_id)
    if rules is None:
        return Permissions(None, user_fields(caller.user_id), schemas)
    values = await hub.auth.rule_values(caller.app_id, caller.user_id)
    return Permissions(rules, values, schemas)
