"""Every error tidesync raises, in one tree with one root.

::

    TidesyncError
    ├── SchemaError                 a model class is invalid (raised at class definition)
    ├── SchemaMismatchError         the models do not match the file (nothing is touched)
    │   └── SchemaVersionError      the configured schema_version is lower than the file's
    ├── MigrationError              a migration cannot run or left data invalid (rolled back)
    ├── DatabaseClosedError         the Database (or its session) was closed
    ├── WriteError
    │   ├── WriteOutsideTransactionError
    │   ├── NestedWriteError
    │   ├── DuplicatePrimaryKeyError
    │   ├── ObjectDeletedError      the object was deleted (invalidated)
    │   ├── FutureTimestampError    a list element stamped far in the future (bad clock)
    │   ├── ValueTypeError          a value does not fit the field's type
    │   ├── DiskFullError           the disk holding the file is full (nothing was written)
    │   └── ObjectTooLargeError     an object over ``Configuration.max_object_bytes``
    ├── QueryError                  a query does not parse or names unknown fields
    ├── SubscriptionError           a subscription update or set refused (name clash, server)
    ├── NotSyncedError              a sync-only API on a local database
    ├── OperationCancelledError     a wait was cancelled (token or timeout)
    ├── SessionInactiveError        a wait on a paused or closed session
    ├── BlockingCallError           a blocking form called where an event loop runs
    ├── NoEventLoopError            an async iterator made where no event loop runs
    ├── AuthError                   login refused, token missing/expired/forged
    │   └── TooManyAttemptsError    login attempts over the per-minute limit
    ├── ConfigurationError          a configuration is invalid (server file, client options, URL)
    │   └── SchemaPinError          the declared schema cannot serve the stored data
    ├── MismatchedConfigurationError a file open in this process, opened with another config
    ├── DatabaseFileError           a file to inspect is missing, not tidesync's, or locked
    ├── ServerStartError            the server could not start (port, data folder, ...)
    │   └── DataFolderInUseError    another server runs on the data folder
    ├── ProtocolError               a peer broke the wire protocol
    │   ├── FrameTooLargeError
    │   └── MalformedMessageError
    └── SyncError                   an error reported on a sync session (code, action)
        ├── CompensatingWriteError
        ├── ChangesetRefusedError   whole transactions the server integrated as nothing
        ├── ClientResetError
        └── SyncDiskFullError       the session waits for space (also a DiskFullError)

``LocalProtocolError`` (we misused the protocol) and ``RemoteProtocolError`` (the peer
misbehaved) are both ``ProtocolError``; the difference is who is to blame.

``NotAwaitedWarning`` (a ``RuntimeWarning``, not an error) says a tidesync coroutine was
called and dropped without ``await``.
"""

from __future__ import annotations

from enum import StrEnum


class TidesyncError(Exception):
    """Root of every error raised by tidesync."""


class SchemaError(TidesyncError, TypeError):
    """A model class is invalid; the message names the class and the field."""


class SchemaMismatchError(TidesyncError):
    """The declared models are incompatible with the database file; the file is untouched."""


class SchemaVersionError(SchemaMismatchError):
    """The configuration's ``schema_version`` is lower than the file's (an older release
    opening a newer release's file), or a file migrated locally is opened for sync; the
    message names both versions. The file is untouched."""


class MigrationError(TidesyncError):
    """A local migration cannot run (a synced file, a bad ``rename_field``/``delete_model``)
    or left the data invalid (a required field without a value); the message names the
    model and field. The whole migration was rolled back: the file is as it was."""


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


class DiskFullError(WriteError):
    """The disk (file system) holding a database file is full, so a write failed.

    The transaction was rolled back: nothing of it is in the file, which stays consistent
    and usable (once there is space again, the next write works without reopening).
    ``path`` is the file, ``operation`` what failed (e.g. ``"db.write()"``) and ``reason``
    SQLite's own message."""

    def __init__(self, path: str, operation: str, reason: str) -> None:
        super().__init__(
            f"the disk holding {path} is full: {operation} failed ({reason}); nothing of it "
            "was written. Free some space and try again"
        )
        self.path = path
        self.operation = operation
        self.reason = reason


class ObjectTooLargeError(WriteError, ValueError):
    """A transaction would write an object larger than ``Configuration.max_object_bytes``;
    nothing of the transaction was written. ``model``, ``pk``, ``size`` and ``limit`` name
    the object, its size in bytes and the limit."""

    def __init__(self, model: str, pk: object, size: int, limit: int) -> None:
        super().__init__(
            f"{model} {pk!r} is {size} bytes, more than the limit of {limit} bytes per "
            "object (Configuration.max_object_bytes); nothing was written"
        )
        self.model = model
        self.pk = pk
        self.size = size
        self.limit = limit


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


class BlockingCallError(TidesyncError, RuntimeError):
    """A blocking form (``..._blocking()``) was called in a thread whose event loop is
    running: it would block that loop (or deadlock the sync thread); await the coroutine
    instead, or run the blocking form in another thread."""


class NoEventLoopError(TidesyncError, RuntimeError):
    """An async iterator (``get_progress_stream``, ``results.changes()``, ...) was made in
    a thread with no running event loop; plain code uses its callback form."""


class NotAwaitedWarning(TidesyncError, RuntimeWarning):
    """A tidesync coroutine was called but never awaited, so it did nothing."""


class AuthError(TidesyncError):
    """Authentication failed: bad credentials, or a missing, expired or forged token."""


class TooManyAttemptsError(AuthError):
    """Too many login attempts for one account or from one address; try again later."""


class SubscriptionError(TidesyncError, ValueError):
    """A subscription could not be added, or the server refused the subscription set
    (the message carries the server's reason)."""


class ConfigurationError(TidesyncError, ValueError):
    """A configuration is invalid (a server's file or options, a client's options, an
    app's ``base_url`` or app id); the message names the key and what is wrong."""


class SchemaPinError(ConfigurationError):
    """A declared schema (``[apps.X.schema]``) drops or retypes stored models or fields, or
    adds a required field to them; checked when the server starts, naming each one."""


class MismatchedConfigurationError(TidesyncError):
    """A synced file already open in this process was opened again with a configuration
    that differs (another user or app, other models); the message names the file and what
    differs."""


class DatabaseFileError(TidesyncError):
    """A database file to read (``tidesync inspect``) is missing, is not a tidesync
    database, or is locked by another process; the message names the file."""


class ServerStartError(TidesyncError):
    """The server could not start (port in use, unreadable data folder, ...)."""


class DataFolderInUseError(ServerStartError):
    """Another server process holds the data folder; ``pid`` is its process id (None if it
    could not be read)."""

    def __init__(self, message: str, folder: str, pid: int | None) -> None:
        super().__init__(message)
        self.folder = folder
        self.pid = pid


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


class ChangesetRefusedError(SyncError):
    """The server refused whole local transactions (ERROR 232) and sync went on.

    ``refused`` lists, per refused transaction, its local version, the server's reason
    and the objects it wrote (``(model name, primary key)``). The writes stay in this
    device's file; the server and the other devices never get them."""

    def __init__(
        self, message: str, refused: list[tuple[int, str, list[tuple[str, object]]]]
    ) -> None:
        super().__init__(232, message, SyncAction.RETRY)
        self.refused = refused


class ClientResetError(SyncError):
    """The local file can no longer sync incrementally and must be reset."""

    def __init__(self, message: str, backup_path: str | None = None) -> None:
        super().__init__(211, message, SyncAction.CLIENT_RESET)
        self.backup_path = backup_path


class SyncDiskFullError(SyncError, DiskFullError):
    """The device's disk is full, so the session cannot store what it downloads.

    Given to the sync error handler once per outage (action RETRY): the session stays
    ACTIVE, nothing was applied, and it retries with backoff by itself until there is space.
    It is also a :class:`DiskFullError` (``path``, ``operation``, ``reason``)."""

    def __init__(self, code: int, path: str, operation: str, reason: str) -> None:
        message = (
            f"the disk holding {path} is full: {operation} failed ({reason}); nothing was "
            "applied, the session retries with backoff until there is space"
        )
        Exception.__init__(self, f"[{code}] {message}")  # both parents' attributes, below
        self.code, self.message, self.action = code, message, SyncAction.RETRY
        self.path, self.operation, self.reason = path, operation, reason
