"""``Configuration``: which models a database holds, where its file is, and how it syncs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..protocol.messages import DEFAULT_MAX_OBJECT_BYTES
from ..store.migration import MigrationCallback
from ..store.model import Model, iter_models
from .reset import ClientResetMode, RecoverUnsyncedChanges, check_mode

if TYPE_CHECKING:
    from .app import User

#: The file a local database uses when no path is given.
DEFAULT_PATH = "default.tidesync"


@dataclass(frozen=True)
class SyncConfiguration:
    """How a synced database syncs: the user, and the optional callbacks."""

    user: User
    error_handler: Callable[[Any, Exception], Any] | None = None
    initial_subscriptions: Callable[[Any], Any] | None = None
    rerun_on_open: bool = False
    #: What a client reset does (``docs/client-reset.md``); recover unsynced changes by default.
    client_reset: ClientResetMode = field(default_factory=RecoverUnsyncedChanges)


@dataclass(frozen=True)
class Configuration:
    """Open a :class:`~tidesync.Database` with one of the constructors:
    :meth:`local` or :meth:`flexible_sync`.

    ``max_object_bytes`` (default 16 MiB) is the most one write transaction may write to
    one object; ``db.write()`` refuses a larger one with :class:`~tidesync.ObjectTooLargeError`
    and writes nothing (docs/sync-session.md, "Limits").

    ``schema_version`` and ``migration_callback`` (local databases only) migrate a file
    that records a lower schema version (docs/migrations.md); ``None``: not checked."""

    models: tuple[type[Model], ...]
    path: str
    sync: SyncConfiguration | None = field(default=None)
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    schema_version: int | None = None
    migration_callback: MigrationCallback | None = None

    def __post_init__(self) -> None:
        most = self.max_object_bytes
        if isinstance(most, bool) or not isinstance(most, int) or most < 1:
            raise ConfigurationError(f"max_object_bytes must be a positive integer, not {most!r}")
        version, callback = self.schema_version, self.migration_callback
        if self.sync is not None and callback is not None:
            raise ConfigurationError(
                "migration_callback is for local databases: a synced database's file "
                "cannot be migrated locally (docs/migrations.md, Synced databases)"
            )
        if self.sync is not None and version is not None:
            raise ConfigurationError(
                "schema_version on a synced database (synced schema versions) is not "
                "supported yet (docs/migrations.md, Synced schema versions)"
            )
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 0
        ):
            raise ConfigurationError(
                f"schema_version must be a non-negative integer, not {version!r}"
            )
        if callback is not None and not callable(callback):
            raise ConfigurationError(f"migration_callback must be callable, not {callback!r}")
        if callback is not None and version is None:
            raise ConfigurationError("a migration_callback needs a schema_version")

    @classmethod
    def local(
        cls,
        models: Sequence[type[Model]],
        path: str | Path | None = None,
        *,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        schema_version: int = 0,
        migration_callback: MigrationCallback | None = None,
    ) -> Configuration:
        """A database that lives on this device only.

        ``schema_version`` (default 0) is the version of ``models``; a file at a lower one
        is migrated when it opens: ``migration_callback(migration, old_schema_version)``
        runs in the migration's transaction (docs/migrations.md). A file at a higher one
        raises :class:`~tidesync.SchemaVersionError`."""
        return cls(
            tuple(iter_models(models)),
            str(Path(path or DEFAULT_PATH)),
            max_object_bytes=max_object_bytes,
            schema_version=schema_version,
            migration_callback=migration_callback,
        )

    @classmethod
    def flexible_sync(
        cls,
        user: User,
        models: Sequence[type[Model]],
        path: str | Path | None = None,
        *,
        sync_error_handler: Callable[[Any, Exception], Any] | None = None,
        initial_subscriptions: Callable[[Any], Any] | None = None,
        rerun_on_open: bool = False,
        client_reset: ClientResetMode | None = None,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        schema_version: int | None = None,
        migration_callback: MigrationCallback | None = None,
    ) -> Configuration:
        """A database synced through ``user``'s app. The default path is per user, under the
        app's ``base_path``. ``client_reset`` is :class:`~tidesync.RecoverUnsyncedChanges`
        (the default), :class:`~tidesync.DiscardUnsyncedChanges` or
        :class:`~tidesync.ManualRecovery` (``docs/client-reset.md``).
        ``schema_version`` and ``migration_callback`` are refused with
        :class:`~tidesync.ConfigurationError`: a synced file is not migrated locally, and
        synced schema versions are not done yet (docs/migrations.md)."""
        if path is None:
            path = user.default_path()
        mode = RecoverUnsyncedChanges() if client_reset is None else check_mode(client_reset)
        sync = SyncConfiguration(
            user, sync_error_handler, initial_subscriptions, rerun_on_open, mode
        )
        return cls(
            tuple(iter_models(models)),
            str(Path(path)),
            sync,
            max_object_bytes,
            schema_version,
            migration_callback,
        )
