"""A Python client for backends: the server's Data API and change feed over HTTP.

``AdminClient`` (blocking) and ``AsyncAdminClient`` (asyncio) offer the same calls::

    from tidesync.admin import AdminClient

    with AdminClient("http://127.0.0.1:8080", "my-app", api_key="...") as admin:
        admin.insert("Order", {"id": "o-1", "total": Decimal("9.50")})
        for order in admin.query("Order", "total > $0", 5):
            ...
        for event in admin.changes(since=0, follow=False):
            ...

A model is named by its class (a :class:`tidesync.Model`) or its name; objects go in as
model instances or dicts of Python values, and come back as dicts of Python values (the
JSON mapping of docs/backend.md decoded with the model's schema). Nothing here imports the
server: this package talks HTTP only.
"""

from __future__ import annotations

from .aclient import AsyncAdminClient
from .client import AdminClient
from .common import AdminAPIError, ChangeEvent, Transaction

__all__ = ["AdminAPIError", "AdminClient", "AsyncAdminClient", "ChangeEvent", "Transaction"]
