"""A report on a database file, read without changing it: what ``tidesync inspect`` prints.

:func:`inspect_file` opens the file read-only (no schema set-up, no sync, no write: the
file's bytes stay as they were) and reads, in one read transaction, the store's part
(models, objects, pending changes, cursors: :mod:`tidesync.store.fileinfo`) and the flexible
sync part (the subscription set: :func:`tidesync.client.subscriptions.stored_latest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..store import fileinfo
from .subscriptions import stored_latest


@dataclass(frozen=True)
class FieldInfo:
    """One field of a stored model: its name, type (as the schema writes it), flags."""

    name: str
    type: str
    primary_key: bool
    indexed: bool


@dataclass(frozen=True)
class ModelInfo:
    """One stored model: its fields, primary key and live object count."""

    name: str
    primary_key: str
    fields: list[FieldInfo]
    objects: int


@dataclass(frozen=True)
class SubscriptionInfo:
    """One subscription of the newest set."""

    name: str | None
    model: str
    query: str
    args: list[Any]


@dataclass(frozen=True)
class FileReport:
    """What a database file holds (see :func:`inspect_file`)."""

    path: str
    file_bytes: int
    #: size of the write-ahead log beside the file (0 when there is none)
    wal_bytes: int
    origin: str
    models: list[ModelInfo]
    pending_changesets: int
    pending_bytes: int
    #: ``download_cursor``, ``upload_acked``, ``last_version``
    cursors: dict[str, int]
    #: the newest subscription set's version, state and error (None: no set ever made)
    subscription_set: dict[str, Any] | None = None
    subscriptions: list[SubscriptionInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-able dict (the shape ``tidesync inspect --json`` prints)."""
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "wal_bytes": self.wal_bytes,
            "origin": self.origin,
            "models": {
                m.name: {
                    "primary_key": m.primary_key,
                    "objects": m.objects,
                    "fields": [
                        {
                            "name": f.name,
                            "type": f.type,
                            "primary_key": f.primary_key,
                            "indexed": f.indexed,
                        }
                        for f in m.fields
                    ],
                }
                for m in self.models
            },
            "pending": {"changesets": self.pending_changesets, "bytes": self.pending_bytes},
            "cursors": dict(self.cursors),
            "subscription_set": self.subscription_set,
            "subscriptions": [
                {"name": s.name, "model": s.model, "query": s.query, "args": s.args}
                for s in self.subscriptions
            ],
        }


def inspect_file(path: str | Path) -> FileReport:
    """Read a local or synced database file without changing it;
    :class:`~tidesync.DatabaseFileError` if it is missing, not a tidesync database, or
    locked by another process."""
    file = Path(path)
    conn = fileinfo.open_read_only(file)
    try:
        with fileinfo.read_snapshot(conn, file):
            schemas = fileinfo.stored_models(conn)
            counts = fileinfo.object_counts(conn, schemas)
            cursors = fileinfo.cursors(conn)
            pending = fileinfo.pending_changes(conn, cursors["upload_acked"])
            origin = fileinfo.origin(conn)
            latest = stored_latest(conn)
    finally:
        conn.close()
    models = [
        ModelInfo(
            name,
            schema.primary_key,
            [FieldInfo(f.name, f.type_name(), f.primary_key, f.indexed) for f in schema.fields],
            counts[name],
        )
        for name, schema in schemas.items()
    ]
    wal = file.with_name(file.name + "-wal")
    report = FileReport(
        path=str(file),
        file_bytes=file.stat().st_size,
        wal_bytes=wal.stat().st_size if wal.exists() else 0,
        origin=origin,
        models=models,
        pending_changesets=pending[0],
        pending_bytes=pending[1],
        cursors=cursors,
    )
    if latest is None:
        return report
    version, state, error, subs = latest
    return replace(
        report,
        subscription_set={"version": version, "state": state, "error": error},
        subscriptions=[
            SubscriptionInfo(s.name, s.object_type, s.query, list(s.args)) for s in subs
        ],
    )


__all__ = ["FieldInfo", "FileReport", "ModelInfo", "SubscriptionInfo", "inspect_file"]
