"""The Data API's write path: operations become one changeset of the sync protocol, judged
by the user's write rules and committed through the hub, so devices see them as any
other device's write.

Per server process, each caller user (admins: :data:`~.access.ADMIN_USER`) writes under
an origin of its own (``api-<process id>-<n>``), registered with the storage for that user;
its versions are dense, so an origin's writes are serialised (one lock per origin) and
after a failed commit its last version is read back from the storage. The timestamps come
from the server's clock through one :class:`~tidesync.core.hlc.HybridClock` per origin
that first observes every touched object's latest timestamp, so an API write is later than
what it overwrites (within ``MAX_AHEAD_MS`` of the server's clock).

One request is one changeset: all of it is stored, or nothing. A user's write is judged
(:func:`~tidesync.server.writecheck.judge`, no subscriptions) before it is submitted: any
refused object is a 403 listing each, and nothing is submitted. Inside the commit
:class:`WholeRecheck` judges it again on the states the transaction sees; if another write
changed a touched object in between so that the rules now refuse it, the changeset is
integrated as nothing (its version is used, no data stored) and the answer is a 409.

:class:`DataWriter` is not tied to HTTP (the console uses it too).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...core.changeset import Changeset, Instruction
from ...core.hlc import HLC, HybridClock
from ...core.jsonvalues import scalar_to_json
from ...core.merge import ObjectState
from ...core.schema import ModelSchema
from ...core.validate import validate_changeset
from ..flexsync import FlexView, app_write_lock
from ..hub import SyncHub
from ..rules import Permissions
from ..storage.base import (
    CommitCheck,
    ObjectKey,
    RejectReason,
    StorageError,
    UploadBatch,
    UploadResult,
    object_keys,
)
from ..writecheck import judge
from .access import ADMIN_USER, ApiError, Caller
from .building import Builder, WriteOp

log = logging.getLogger("tidesync.server.api")

Refused = list[tuple[str, Any, str]]


class WholeRecheck(CommitCheck):
    """The write rules again inside the commit, all or nothing: when anything is refused
    now, every changeset is integrated as nothing and :attr:`refused` says why."""

    def __init__(
        self, view: FlexView, schemas: dict[str, ModelSchema], stored: Mapping[ObjectKey, bytes]
    ) -> None:
        self._view = view
        self._schemas = schemas
        self._stored = stored
        #: What the last attempt of the commit refused (empty: nothing).
        self.refused: Refused = []

    def recheck(
        self, changesets: list[Changeset], states: Mapping[ObjectKey, bytes]
    ) -> list[Changeset]:
        """``changesets`` when the rules still allow all of them, else empty copies."""
        self.refused = []
        stored = self._stored
        if all(stored.get(key) == data for key, data in states.items()):
            return changesets  # the first check saw exactly this
        now = {**stored, **states}
        keyed = [object_keys(cs.instructions) for cs in changesets]
        verdict = judge(self._view, self._schemas, changesets, keyed, now)
        if not verdict.refused:
            return changesets
        self.refused = verdict.refused
        return [Changeset(cs.origin, cs.version, ()) for cs in changesets]


def refused_error(
    status: int, message: str, refused: Refused, schemas: dict[str, ModelSchema]
) -> ApiError:
    """The 403 (or 409) naming each refused object (its primary key in JSON) and why."""
    listed = []
    for model, pk, reason in refused:
        schema = schemas.get(model)
        pk_json = scalar_to_json(schema.pk_field.kind, pk) if schema is not None else str(pk)
        listed.append({"model": model, "pk": pk_json, "reason": reason})
    code = "forbidden" if status == 403 else "conflict"
    return ApiError(status, message, code, {"refused": listed})


@dataclass
class _Origin:
    """One origin of this process: its lock, clock and last integrated version."""

    name: str
    user_id: str
    clock: HybridClock
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The last version integrated (None: read it from the storage first).
    version: int | None = None
    registered: bool = False


@dataclass(frozen=True)
class WriteResult:
    """What a write stored: the keys of the objects it touched (in order) and the server
    version of its changeset (None when it changed nothing)."""

    keys: list[ObjectKey]
    server_version: int | None
    #: The CREATE of each object this write made from nothing with that CREATE alone, as
    #: the storage confirmed (:attr:`~..storage.base.UploadResult.created`): the object's
    #: state as of :attr:`server_version` is that CREATE's.
    created: dict[ObjectKey, Instruction] = field(default_factory=dict)


_PROCESS = uuid.uuid4().hex[:8]
_counter = itertools.count(1)


class DataWriter:
    """The Data API's writes for one hub (see the module docstring)."""

    def __init__(self, hub: SyncHub) -> None:
        self.hub = hub
        self._origins: dict[tuple[str, str], _Origin] = {}

    def _origin(self, app_id: str, user_id: str) -> _Origin:
        entry = self._origins.get((app_id, user_id))
        if entry is None:
            name = f"api-{os.getpid()}-{_PROCESS}-{next(_counter)}"
            entry = self._origins[(app_id, user_id)] = _Origin(name, user_id, HybridClock(name))
        return entry

    async def _prepare(self, app_id: str, origin: _Origin) -> int:
        storage = self.hub.storage
        if not origin.registered:
            origin.version = await storage.register_client(app_id, origin.name, origin.user_id)
            origin.registered = True
        if origin.version is None:
            origin.version = await storage.client_version(app_id, origin.name)
        return origin.version

    async def write(
        self,
        caller: Caller,
        schemas: dict[str, ModelSchema],
        perms: Permissions | None,
        ops: list[WriteOp],
    ) -> WriteResult:
        """Store ``ops`` as one changeset (see the module docstring); raises
        :class:`~.access.ApiError` (404 for a missing object, 400 for an invalid value,
        403/409 for what the rules refuse, 503 when the storage fails)."""
        app_id = caller.app_id
        keys = list(dict.fromkeys(op.key for op in ops))
        if not keys:
            return WriteResult([], None)
        origin = self._origin(app_id, caller.user_id or ADMIN_USER)
        async with origin.lock:
            try:
                version = await self._prepare(app_id, origin)
            except StorageError as exc:
                raise ApiError(503, f"the storage failed: {exc}", "unavailable") from None
            if perms is None:
                return await self._commit(app_id, origin, version, schemas, None, ops, keys)
            # a rule check and its commit are one step with the devices' (flexsync.py)
            async with app_write_lock(self.hub, app_id):
                return await self._commit(app_id, origin, version, schemas, perms, ops, keys)

    async def _commit(
        self,
        app_id: str,
        origin: _Origin,
        version: int,
        schemas: dict[str, ModelSchema],
        perms: Permissions | None,
        ops: list[WriteOp],
        keys: list[ObjectKey],
    ) -> WriteResult:
        hub = self.hub
        try:
            stored = await hub.storage.get_state_bytes(app_id, keys)
        except StorageError as exc:
            raise ApiError(503, f"the storage failed: {exc}", "unavailable") from None
        states = {key: ObjectState.from_bytes(data) for key, data in stored.items()}
        now = int(hub.clock() * 1000)
        clock = origin.clock
        for state in states.values():
            clock.observe(state.last_hlc, now)

        def tick() -> HLC:
            return clock.tick(now)

        builder = Builder(schemas, states, tick)
        for op in ops:
            builder.add(op)
        if not builder.instructions:
            return WriteResult(keys, None)
        cs = Changeset(origin.name, version + 1, tuple(builder.instructions))
        try:
            validate_changeset(cs, schemas)
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_value") from None
        check: WholeRecheck | None = None
        if perms is not None:
            view = FlexView(perms, schemas, None)
            verdict = judge(view, schemas, [cs], [object_keys(cs.instructions)], stored)
            if verdict.refused:
                raise refused_error(
                    403,
                    "the write rules refuse this write; nothing was stored",
                    verdict.refused,
                    schemas,
                )
            check = WholeRecheck(view, schemas, stored)
        result = await self._submit(app_id, origin, cs, check)
        if check is not None and check.refused:
            raise refused_error(
                409,
                "another write changed these objects meanwhile and the write rules now "
                "refuse this write; nothing was stored",
                check.refused,
                schemas,
            )
        fresh = builder.lone_creates()
        created = {key: fresh[key] for key in result.created if key in fresh}
        committed = result.server_versions[0] if result.server_versions else None
        return WriteResult(keys, committed, created)

    async def _submit(
        self, app_id: str, origin: _Origin, cs: Changeset, check: CommitCheck | None
    ) -> UploadResult:
        batch = UploadBatch(app_id, origin.name, [cs], check)
        try:
            future = self.hub.committer.submit(batch)
            try:
                result = await asyncio.shield(future)
            except asyncio.CancelledError:
                # the request is gone but its commit goes on: hold the origin (its lock)
                # until it is done, so that the origin's next version is the right one
                await asyncio.wait([future])
                failed = future.cancelled() or future.exception() is not None
                done = None if failed else future.result()
                origin.version = done.acked_version if done is not None and done.ok else None
                raise
        except Exception as exc:
            origin.version = None  # read it back: the commit may have been done
            log.warning("app %s: a Data API write of %s failed: %s", app_id, origin.name, exc)
            raise ApiError(503, f"the write was not stored: {exc}", "unavailable") from None
        if result.ok and not result.server_versions:
            # taken for a duplicate: the version was stale (never expected); nothing stored
            origin.version = None
            log.error(
                "app %s: Data API origin %s reused version %d", app_id, origin.name, cs.version
            )
            raise ApiError(503, "the write was not stored; try again", "unavailable")
        if result.ok:
            origin.version = result.acked_version
            return result
        origin.version = None
        if result.reason is RejectReason.UNKNOWN_CLIENT:
            origin.registered = False  # the app was wiped: register again next time
        if result.reason is RejectReason.INVALID:
            raise ApiError(400, result.error or "invalid write", "invalid_value")
        raise ApiError(503, f"the write was not stored: {result.error}", "unavailable")


_WRITERS: weakref.WeakKeyDictionary[SyncHub, DataWriter] = weakref.WeakKeyDictionary()


def writer_of(hub: SyncHub) -> DataWriter:
    """The hub's :class:`DataWriter` (one per hub: its origins and their locks)."""
    writer = _WRITERS.get(hub)
    if writer is None:
        writer = _WRITERS[hub] = DataWriter(hub)
    return writer
