"""``Database``: the public database object; a local database plus, when synced, its session."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.progress import SyncProgress
from ..errors import (
    DatabaseClosedError,
    NotSyncedError,
    OperationCancelledError,
    SchemaVersionError,
)
from ..store.database import LocalDatabase
from .calls import awaitable, run_blocking
from .config import Configuration
from .subscriptions import SubscriptionSet, SubscriptionSetState

if TYPE_CHECKING:
    from .cancellation import CancellationToken
    from .session import Session


class Database(LocalDatabase):
    """A database opened from a :class:`Configuration`.

    ``Database(config)`` opens synchronously; ``await Database.open(config)`` opens without
    blocking the event loop and, for a synced database, waits for the initial download
    (``Database.open_blocking(config)`` does the same from plain code).
    Use ``with Database(config) as db:`` or call :meth:`close`.
    """

    def __init__(self, config: Configuration) -> None:
        if not isinstance(config, Configuration):
            raise TypeError("Database() takes a tidesync.Configuration")
        super().__init__(
            config.path,
            config.models,
            schema_version=config.schema_version,
            migration_callback=config.migration_callback,
        )
        self.config = config
        self.max_object_bytes = config.max_object_bytes
        self._session: Session | None = None
        if config.sync is not None:
            try:
                _refuse_migrated(self)
                ran = _run_initial_subscriptions(self, config)
                self._session = config.sync.user.app._open_session(self, config.sync)
                if ran:  # a session this database joined has not seen the new set
                    self._session._subscriptions_changed()
            except BaseException:
                super().close()
                raise

    @classmethod
    @awaitable
    async def open(
        cls,
        config: Configuration,
        on_progress: Callable[[SyncProgress], Any] | None = None,
        cancellation_token: CancellationToken | None = None,
    ) -> Database:
        """Open without blocking the event loop; a synced database first downloads what the
        server holds. ``on_progress`` is called (on the sync thread) with each
        :class:`SyncProgress` of that download: values never decrease and the last is 1.0.
        Cancelling ``cancellation_token`` raises :class:`OperationCancelledError` and closes
        the database."""
        if cancellation_token is not None and cancellation_token.is_cancelled:
            raise OperationCancelledError("the open was cancelled")
        db = await asyncio.to_thread(cls, config)
        session = db._session
        if session is None:
            return db
        pending = db.subscriptions.state in _OUTSTANDING

        async def bootstrap() -> None:  # the initial subscriptions' data is here too
            await db.subscriptions.wait_for_synchronization(cancellation_token)

        try:
            await session._wait_initial_download(
                on_progress, cancellation_token, bootstrap if pending else None
            )
        except BaseException:
            db.close()
            raise
        return db

    @classmethod
    def open_blocking(
        cls,
        config: Configuration,
        on_progress: Callable[[SyncProgress], Any] | None = None,
        cancellation_token: CancellationToken | None = None,
    ) -> Database:
        """The blocking form of :meth:`open`: the same arguments, result and errors, for
        code that runs no event loop (raises :class:`~tidesync.BlockingCallError` in a
        thread whose event loop is running; docs/sync-session.md, "Blocking code")."""
        return run_blocking(
            "Database.open_blocking", lambda: cls.open(config, on_progress, cancellation_token)
        )

    @property
    def subscriptions(self) -> SubscriptionSet:
        """The flexible sync subscription set of a synced database (persisted in its file)."""
        if self.config.sync is None:
            raise NotSyncedError(f"the database {self.path} is local; it has no subscriptions")
        return SubscriptionSet(self)

    @property
    def sync_session(self) -> Session:
        """The sync session of a synced database (the same object each time, and the same
        for every ``Database`` of this file open in the process)."""
        if self._session is None:
            raise NotSyncedError(f"the database {self.path} is local; it has no sync session")
        if self.is_closed:
            raise DatabaseClosedError(f"the database {self.path} is closed")
        return self._session

    def close(self) -> None:
        """Close the database; its sync session ends with the last ``Database`` of the
        file open in this process. Idempotent."""
        session = self._session
        if session is not None and not self.is_closed:
            from .session import release_shared

            release_shared(session, self)
        super().close()

    def __enter__(self) -> Database:
        return self


#: Subscription set states ``Database.open`` waits out (the set's bootstrap is not over).
_OUTSTANDING = (SubscriptionSetState.PENDING, SubscriptionSetState.BOOTSTRAPPING)


def _run_initial_subscriptions(db: Database, config: Configuration) -> bool:
    """Call ``initial_subscriptions(db)`` when the file has no subscription set yet (or on
    every open with ``rerun_on_open``); it updates ``db.subscriptions`` itself. True if it
    was called."""
    sync = config.sync
    if sync is None or sync.initial_subscriptions is None:
        return False
    if sync.rerun_on_open or db.subscriptions.version == 0:
        sync.initial_subscriptions(db)
        return True
    return False


def _refuse_migrated(db: Database) -> None:
    """A file migrated locally (``schema_version`` > 0) is not synced: its change log holds
    changesets of the old schema (docs/migrations.md, Synced databases)."""
    version = db.schema_version
    if version:
        raise SchemaVersionError(
            f"{db.path} was migrated locally to schema version {version}; a synced "
            "configuration cannot open it (docs/migrations.md, Synced databases)"
        )
