"""Every error tidesync raises, in one tree with one root.

::

    TidesyncError
    ├── SchemaError                 a model class is invalid (raised at class definition)
    ├── SchemaMismatchError         the models do not match the file (nothing is touched)
    ├── DatabaseClosedError         the Database (or its session) was closed
    ├── WriteError
    │   ├── WriteOutsideTransactionError
    │   ├── NestedWriteError
    │   ├── DuplicatePrimaryKeyError
    │   ├── ObjectDeletedError      the object was deleted (invalidated)
    │   ├── FutureTimestampError    a list element stamped far in the future (bad clock)
    │   └── ValueTypeError          a value does not fit the field's type
    ├── QueryError                  a query does not parse or names unknown fields
    ├── SubscriptionError           a subscription update or set refused (name clash, server)
    ├── NotSyncedError              a sync-only API on a local database
    ├── OperationCancelledError     a wait was cancelled (token or timeout)
    ├── SessionInactiveError        a wait on a paused or closed session
    ├── AuthError                   login refused, token missing/expired/forged
    │   └── TooManyAttemptsError    login attempts over the per-minute limit
    ├── ConfigurationError          a server configuration file is invalid
    ├── ProtocolError               a peer broke the wire protocol
    │   ├── FrameTooLargeError
    │   └── MalformedMessageError
    └── SyncError                   an error reported on a sync session (code, action)
        ├── CompensatingWriteError
        └── ClientResetError

``LocalProtocolError`` (we misused the protocol) and ``RemoteProtocolError`` (the peer
misbehaved) are both ``ProtocolError``; the difference is who is to blame.
"""

from __future__ import annotations

from enum import StrEnum


class TidesyncError(Exception):
    """Root of every error raised by tidesync."""


class SchemaError(TidesyncError, TypeError):
    """A model class is invalid; the message names the class and the field."""


class SchemaMismatchError(TidesyncError):
    """The declared models are incompatible with the database file; the file is untouched."""


class DatabaseClosedError(TidesyncError):
    """The database (or something that belongs to it, like its sync session) is closed."""


class WriteError(TidesyncError):
    """A write could not be made."""


class WriteOutsideTransactionError(WriteError):
    """A change was attempted outside ``with db.write():``."""


class NestedWriteError(WriteError):
    """``db.write()`` was entered while a write was already open on this database."""


class DuplicatePrimaryKeyError(WriteError):
    """``db.add`` was given an object whose primary key exists (use ``update=True``)."""


class ObjectDeletedError(WriteError):
    """The object was deleted; it can no longer be read or changed."""


class FutureTimestampError(WriteError):
    """A list element's id is a timestamp far in the future (written by a device with a
    wrong clock before servers bounded timestamps: docs/merge.md, "Clocks"); it cannot be
    changed, removed or inserted after until that time. Nothing was written."""


class ValueTypeError(WriteError, TypeError):
    """A value does not fit the field's declared type."""


class QueryError(TidesyncError, ValueError):
    """A query string is invalid. ``position`` is the offset of the problem in ``query``."""

    def __init__(self, message: str, query: str = "", position: int | None = None) -> None:
        self.query = query
        self.position = position
        self.reason = message
        if position is not None and query:
            pointer = " " * position + "^"
            message = f"{message} at position {position}\n  {query}\n  {pointer}"
        super().__init__(message)


class NotSyncedError(TidesyncError):
    """A sync-only API was used on a local (not synced) database."""


class OperationCancelledError(TidesyncError):
    """A wait was cancelled, by its cancellation token or its timeout."""


class SessionInactiveError(TidesyncError):
    """The session is paused or closed, so the wait cannot complete."""


class AuthError(TidesyncError):
    """Authentication failed: bad credentials, or a missing, expired or forged token."""


class TooManyAttemptsError(AuthError):
    """Too many login attempts for one account or from one address; try again later."""


class SubscriptionError(TidesyncError, ValueError):
    """A subscription could not be added, or the server refused the subscription set
    (the message carries the server's reason)."""


class ConfigurationError(TidesyncError, ValueError):
    """A server configuration (file or options) is invalid; the message names the key."""


class ProtocolError(TidesyncError):
    """The sync protocol was broken, by us (local) or by the peer (remote)."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class FrameTooLargeError(RemoteProtocolError):
    """A frame exceeded the negotiated size limit."""


class MalformedMessageError(RemoteProtocolError):
    """A frame could not be decoded into a valid message."""


class SyncAction(StrEnum):
    """What the client does about a sync error."""

    RETRY = "retry"
    REFRESH_TOKEN = "refresh_token"
    CLIENT_RESET = "client_reset"
    STOP = "stop"


class SyncError(TidesyncError):
    """An error on a sync session: a code, a message and the action taken."""

    def __init__(self, code: int, message: str, action: SyncAction = SyncAction.RETRY) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.action = action


class CompensatingWriteError(SyncError):
    """The server refused some writes and sent back the authoritative state."""

    def __init__(self, message: str, refused: list[tuple[str, object, str]]) -> None:
        super().__init__(231, message, SyncAction.RETRY)
        self.refused = refused


class ClientResetError(SyncError):
    """The local file can no longer sync incrementally and must be reset."""

    def __init__(self, message: str, backup_path: str | None = None) -> None:
        super().__init__(211, message, SyncAction.CLIENT_RESET)
        self.backup_path = backup_path
