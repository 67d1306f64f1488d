"""Server storage backends behind one interface (:class:`ServerStorage`).

:class:`SQLiteStorage` is the embedded default; a PostgreSQL backend implements the same
interface. Every backend runs the shared suite in :mod:`tidesync.server.storage.conformance`.
"""

from __future__ import annotations

from .base import (
    BatchRejectedError,
    ClientOwnershipError,
    CommitCheck,
    CursorAheadError,
    HistoryTrimmedError,
    LogEntry,
    LogPage,
    RejectReason,
    ServerStorage,
    StorageError,
    StorageFullError,
    UploadBatch,
    UploadResult,
)
from .sqlite import SQLiteStorage

__all__ = [
    "BatchRejectedError",
    "ClientOwnershipError",
    "CommitCheck",
    "CursorAheadError",
    "HistoryTrimmedError",
    "LogEntry",
    "LogPage",
    "RejectReason",
    "SQLiteStorage",
    "ServerStorage",
    "StorageError",
    "StorageFullError",
    "UploadBatch",
    "UploadResult",
]
