"""tidesync: an offline-first database for Python with device sync.

Every device keeps a full local database (SQLite) and writes without waiting for the network;
a background sync session exchanges changes with a tidesync server. See README.md.
"""

from __future__ import annotations

from .client.app import App, AppConfiguration, Credentials, SyncTimeoutOptions, User
from .client.cancellation import CancellationToken, TimeoutCancellationToken
from .client.config import Configuration
from .client.database import Database
from .client.reset import DiscardUnsyncedChanges, ManualRecovery, RecoverUnsyncedChanges
from .client.session import ConnectionStateChange, Session, SessionState
from .client.subscriptions import (
    MutableSubscriptionSet,
    Subscription,
    SubscriptionSet,
    SubscriptionSetState,
)
from .client.syncclient import ConnectionState
from .core.progress import ProgressDirection, ProgressMode, SyncProgress
from .errors import (
    AuthError,
    BlockingCallError,
    ChangesetRefusedError,
    ClientResetError,
    CompensatingWriteError,
    ConfigurationError,
    DatabaseClosedError,
    DatabaseFileError,
    DiskFullError,
    DuplicatePrimaryKeyError,
    FutureTimestampError,
    MigrationError,
    MismatchedConfigurationError,
    NestedWriteError,
    NoEventLoopError,
    NotAwaitedWarning,
    NotSyncedError,
    ObjectDeletedError,
    ObjectTooLargeError,
    OperationCancelledError,
    ProtocolError,
    QueryError,
    SchemaError,
    SchemaMismatchError,
    SchemaVersionError,
    SessionInactiveError,
    SubscriptionError,
    SyncAction,
    SyncDiskFullError,
    SyncError,
    TidesyncError,
    ValueTypeError,
    WriteError,
    WriteOutsideTransactionError,
)
from .objectid import ObjectId
from .store.migration import Migration, OldDatabase
from .store.model import Counter, Model, field, primary_key
from .store.notify import NotificationToken, ObjectChange, ResultsChange
from .store.results import Results

__version__ = "0.1.0"

__all__ = [
    "App",
    "AppConfiguration",
    "AuthError",
    "BlockingCallError",
    "CancellationToken",
    "ChangesetRefusedError",
    "ClientResetError",
    "CompensatingWriteError",
    "Configuration",
    "ConfigurationError",
    "ConnectionState",
    "ConnectionStateChange",
    "Counter",
    "Credentials",
    "Database",
    "DatabaseClosedError",
    "DatabaseFileError",
    "DiscardUnsyncedChanges",
    "DiskFullError",
    "DuplicatePrimaryKeyError",
    "FutureTimestampError",
    "ManualRecovery",
    "Migration",
    "MigrationError",
    "MismatchedConfigurationError",
    "Model",
    "MutableSubscriptionSet",
    "NestedWriteError",
    "NoEventLoopError",
    "NotAwaitedWarning",
    "NotSyncedError",
    "NotificationToken",
    "ObjectChange",
    "ObjectDeletedError",
    "ObjectId",
    "ObjectTooLargeError",
    "OldDatabase",
    "OperationCancelledError",
    "ProgressDirection",
    "ProgressMode",
    "ProtocolError",
    "QueryError",
    "RecoverUnsyncedChanges",
    "Results",
    "ResultsChange",
    "SchemaError",
    "SchemaMismatchError",
    "SchemaVersionError",
    "Session",
    "SessionInactiveError",
    "SessionState",
    "Subscription",
    "SubscriptionError",
    "SubscriptionSet",
    "SubscriptionSetState",
    "SyncAction",
    "SyncDiskFullError",
    "SyncError",
    "SyncProgress",
    "SyncTimeoutOptions",
    "TidesyncError",
    "TimeoutCancellationToken",
    "User",
    "ValueTypeError",
    "WriteError",
    "WriteOutsideTransactionError",
    "field",
    "primary_key",
]
