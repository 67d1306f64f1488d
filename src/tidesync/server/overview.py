"""What one server process is doing now: the console's overview page and the admin
API's ``GET /api/v1/admin/status`` (``tidesync status``) read the same picture.

Every value is this process's: a PostgreSQL deployment of several processes answers one
overview per process (``process`` names it).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .hub import SyncHub
from .snapshot import SessionSnapshot


@dataclass(frozen=True, slots=True)
class AppCounts:
    """An app's live sync connections on this process."""

    app_id: str
    #: Connections without a bound session (before HELLO/BIND, or between sessions).
    unbound: int
    #: Bound device sessions.
    sessions: int


@dataclass(frozen=True, slots=True)
class ServerOverview:
    """The version, mode, storage, uptime, connections and sessions of one process."""

    version: str
    mode: str
    storage: str
    process: str
    started_at: float
    uptime_seconds: float
    connections: int
    sessions: int
    apps: tuple[AppCounts, ...]

    @property
    def uptime_text(self) -> str:
        """The uptime as ``"1d 2h 3m"``."""
        up = int(self.uptime_seconds)
        return f"{up // 86400}d {up % 86400 // 3600}h {up % 3600 // 60}m"

    def to_json(self) -> dict[str, Any]:
        """The JSON form sent over HTTP."""
        return {
            "version": self.version,
            "mode": self.mode,
            "storage": self.storage,
            "process": self.process,
            "started_at": self.started_at,
            "uptime_seconds": round(self.uptime_seconds, 3),
            "connections": self.connections,
            "sessions": self.sessions,
            "apps": [
                {"app_id": a.app_id, "unbound": a.unbound, "sessions": a.sessions}
                for a in self.apps
            ],
        }


def server_overview(hub: SyncHub) -> ServerOverview:
    """This process's overview: every declared app, and every app with a connection."""
    per_app: dict[str, list[int]] = {app: [0, 0] for app in hub.config.auth.apps}
    for row in hub.session_snapshot():
        if row.live:
            counts = per_app.setdefault(row.app_id, [0, 0])
            counts[1 if row.session is not None else 0] += 1
    return ServerOverview(
        version=__version__,
        mode="development" if hub.config.development_mode else "production",
        storage=type(hub.storage).__name__,
        process=f"{socket.gethostname()}:{os.getpid()}",
        started_at=hub.started_at,
        uptime_seconds=max(0.0, time.time() - hub.started_at),
        connections=hub.connection_count,
        sessions=hub.session_count,
        apps=tuple(AppCounts(a, c[0], c[1]) for a, c in sorted(per_app.items())),
    )


def filter_sessions(rows: list[SessionSnapshot], user: str, app: str) -> list[SessionSnapshot]:
    """The rows of ``app`` (every app for "") whose user id contains ``user`` (any case)."""
    if app:
        rows = [r for r in rows if r.app_id == app]
    if user:
        needle = user.lower()
        rows = [r for r in rows if r.user_id is not None and needle in r.user_id.lower()]
    return rows
