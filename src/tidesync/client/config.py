"""``Configuration``: which models a database holds, where its file is, and how it syncs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..protocol.messages import DEFAULT_MAX_OBJECT_BYTES
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
    and writes nothing (docs/sync-session.md, "Limits")."""

    models: tuple[type[Model], ...]
    path: str
    sync: SyncConfiguration | None = field(default=None)
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES

    def __post_init__(self) -> None:
        most = self.max_object_bytes
        if isinstance(most, bool) or not isinstance(most, int) or most < 1:
            raise ConfigurationError(f"max_object_bytes must be a positive integer, not {most!r}")

    @classmethod
    def local(
        cls,
        models: Sequence[type[Model]],
        path: str | Path | None = None,
        *,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    ) -> Configuration:
        """A database that lives on this device only."""
        return cls(
            tuple(iter_models(models)),
            str(Path(path or DEFAULT_PATH)),
            max_object_bytes=max_object_bytes,
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
    ) -> Configuration:
        """A database synced through ``user``'s app. The default path is per user, under the
        app's ``base_path``. ``client_reset`` is :class:`~tidesync.RecoverUnsyncedChanges`
        (the default), :class:`~tidesync.DiscardUnsyncedChanges` or
        :class:`~tidesync.ManualRecovery` (``docs/client-reset.md``)."""
        if path is None:
            path = user.default_path()
        mode = RecoverUnsyncedChanges() if client_reset is None else check_mode(client_reset)
        sync = SyncConfiguration(
            user, sync_error_handler, initial_subscriptions, rerun_on_open, mode
        )
        return cls(tuple(iter_models(models)), str(Path(path)), sync, max_object_bytes)
