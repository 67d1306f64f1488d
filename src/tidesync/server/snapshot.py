"""Read-only pictures of the sync server's live state, for the web console and tools.

:meth:`SyncHub.session_snapshot <tidesync.server.hub.SyncHub.session_snapshot>` answers a
list of :class:`SessionSnapshot`: one per bound device session, one per connection that has
no session bound (yet), and the sessions that ended lately (``state`` ``"disconnected"`` or
``"unbound"``). They are copies: holding one keeps nothing of the server alive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: How many ended sessions the hub remembers for the console (newest kept).
RECENT_ENDED = 200

#: ``SessionSnapshot.state`` values.
AWAITING_HELLO = "awaiting hello"
CONNECTED = "connected"
ACTIVE = "active"
FAILED = "error"
UNBOUND = "unbound"
DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """One device session (or a connection without one) as the server knows it now."""

    app_id: str
    #: The sync connection's id (the one WELCOME told the client).
    connection_id: str
    #: None until HELLO was accepted.
    user_id: str | None
    #: The device database's file ident ("" for a connection without a bound session).
    file_ident: str
    #: The session number on its connection (None for a connection without one).
    session: int | None
    #: One of the state names above.
    state: str
    #: When the connection was accepted (seconds since the epoch).
    connected_at: float
    #: When the session or its connection ended (None while it lives).
    ended_at: float | None
    #: The negotiated sync protocol version (None before HELLO).
    protocol_version: int | None
    #: The last server version sent to the device (its download cursor at BIND before).
    download_cursor: int
    #: The latest server version the device was last told about.
    latest_version: int
    #: The highest client version the server integrated (the upload progress).
    upload_acked: int
    #: Flexible sync: ``"Model: query"`` per subscription (empty: none, or not flexible).
    subscriptions: tuple[str, ...]
    #: The session's error, if it ended with one.
    error: str | None

    @property
    def versions_behind(self) -> int:
        """Server versions the device has not been sent yet (as last told)."""
        return max(0, self.latest_version - self.download_cursor)

    @property
    def live(self) -> bool:
        """False once the session or its connection ended."""
        return self.ended_at is None

    def to_json(self) -> dict[str, Any]:
        """The JSON form sent over HTTP (with ``live`` and ``versions_behind``)."""
        out = asdict(self)
        out["subscriptions"] = list(self.subscriptions)
        out["live"] = self.live
        out["versions_behind"] = self.versions_behind
        return out
