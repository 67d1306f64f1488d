"""The server storage interface: what every backend (SQLite, PostgreSQL) must provide.

The interface is small and backend-neutral so that one conformance suite
(:mod:`tidesync.server.storage.conformance`) can hold every backend to the same guarantees:

- an upload is acknowledged only after the commit that integrated it is durable;
- every app's server versions are dense (1, 2, 3, ...) and never reused;
- changesets are idempotent by ``(origin, version)``: duplicates are skipped, gaps refused;
- one :meth:`ServerStorage.integrate` call is one transaction for all its batches (group
  commit), yet a bad batch is rejected alone.

Besides the interface this module holds the backend-neutral rules both backends apply inside
their transaction (:func:`select_new_changesets`, :func:`instructions_by_object`,
:func:`apply_changesets`, :func:`merge_schemas`), so the rules exist once.

Errors::

    TidesyncError
    └── StorageError                a storage operation failed
        ├── ClientOwnershipError    the client file ident belongs to another user
        ├── BatchRejectedError      one upload batch was refused (see RejectReason)
        ├── HistoryTrimmedError     the log before the cursor was trimmed (client reset)
        └── CursorAheadError        a cursor names a version the server never had
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

from ...core.changeset import Changeset, Instruction, Op
from ...core.merge import ObjectState, created_rows_many, lone_create, rows_of_creates
from ...core.packing import pack, pack_each, unpack
from ...core.query import BoundQuery, evaluate, is_always_true
from ...core.schema import PK_KINDS, Kind, ModelSchema, check_compatible
from ...core.validate import validate_changeset
from ...errors import SchemaMismatchError, TidesyncError

log = logging.getLogger("tidesync.server.storage")

#: The key of one object inside an app: ``(model name, core.packing.pack(pk))``.
ObjectKey = tuple[str, bytes]


class StorageError(TidesyncError):
    """A storage operation failed (the message says which and why)."""


class StorageFullError(StorageError):
    """The storage's disk is full: the transaction was rolled back and nothing of it was
    stored (uploads are not acknowledged); the same write works once there is space."""


class ClientOwnershipError(StorageError):
    """A client file ident is already registered to another user."""


class RejectReason(StrEnum):
    """Why a batch was refused (see :class:`UploadResult`)."""

    #: A changeset's version is more than one past the last integrated one.
    GAP = "gap"
    #: A changeset does not fit the app's schema or is malformed.
    INVALID = "invalid"
    #: The batch's origin was never registered with :meth:`ServerStorage.register_client`.
    UNKNOWN_CLIENT = "unknown_client"
    #: A changeset (or an instruction's HLC) names another origin than the batch.
    ORIGIN_MISMATCH = "origin_mismatch"


class BatchRejectedError(StorageError):
    """One upload batch was refused; nothing from it was stored."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class HistoryTrimmedError(StorageError):
    """The log entries the reader needs were trimmed; the client must reset."""

    def __init__(self, message: str, trimmed_version: int) -> None:
        super().__init__(message)
        self.trimmed_version = trimmed_version


class CursorAheadError(StorageError):
    """A cursor is past the app's latest server version (wiped or foreign data)."""


class CommitCheck(abc.ABC):
    """A check an upload passed before its commit, to be passed again *inside* the
    transaction that commits it (flexible sync's write rules, ``server/writecheck.py``), so
    that a check and its commit are one step for every process sharing the storage.

    A backend calls :meth:`recheck` for each batch that carries one and has changesets to
    integrate, once per attempt of the transaction, after it has locked the app's versions
    (so no other commit of the app can come between) and before it applies the batch, and
    integrates the changesets it returns instead of the batch's.
    """

    @abc.abstractmethod
    def recheck(
        self, changesets: list[Changeset], states: Mapping[ObjectKey, bytes]
    ) -> list[Changeset]:
        """The changesets to integrate: ``changesets`` itself (the same list) when the
        check still holds, else copies without the instructions it now refuses.

        ``changesets`` are the batch's new ones (duplicates dropped). ``states`` holds the
        merge state bytes (as :meth:`ServerStorage.get_state_bytes` gives them) of the
        objects they touch as this transaction sees them, including what earlier batches
        of the transaction wrote; an object missing from it is never stored, or is one the
        batch only CREATEs and the backend takes for new without looking (should it be
        stored after all, the attempt must fail and be done again). Must not block; it may
        run on the backend's worker thread.
        """


@dataclass(frozen=True)
class UploadBatch:
    """One client's upload: changesets of ``origin`` in increasing version order, and the
    check they must pass again in the commit (None: none)."""

    app_id: str
    origin: str
    changesets: list[Changeset]
    check: CommitCheck | None = None


@dataclass(frozen=True)
class UploadResult:
    """What :meth:`ServerStorage.integrate` did with one batch.

    ``acked_version`` is the origin's last client version now integrated (duplicates count
    as integrated); ``server_versions`` are the versions given to the changesets this call
    integrated. When the batch was refused, ``error`` says why (``reason`` classifies it),
    nothing from the batch was stored and ``acked_version`` is unchanged.
    """

    origin: str
    acked_version: int
    server_versions: list[int]
    error: str | None = None
    reason: RejectReason | None = None
    #: Objects this batch made from nothing with one CREATE and nothing else (never stored
    #: before, in this same commit), each with the server version of the changeset holding
    #: that CREATE: the object's state as of that version is the CREATE's alone
    #: (flexible sync need neither send it back to its writer nor read it to send it).
    created: dict[ObjectKey, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the batch was integrated (possibly as pure duplicates)."""
        return self.error is None

    def raise_for_error(self) -> None:
        """Raise :class:`BatchRejectedError` if the batch was refused."""
        if self.error is not None:
            raise BatchRejectedError(self.reason or RejectReason.INVALID, self.error)


@dataclass(frozen=True)
class LogEntry:
    """One integrated changeset, as stored in an app's history."""

    server_version: int
    origin: str
    client_version: int
    instructions: bytes  # core.packing.pack_instructions output, exactly as stored


@dataclass(frozen=True)
class LogPage:
    """One page of :meth:`ServerStorage.read_log`.

    ``cursor`` is the server version the reader has after this page: it covers the
    entries returned *and* the excluded origin's entries skipped over. ``remaining_bytes``
    counts the instructions of every entry after ``cursor`` (excluded or not); it is 0
    exactly when ``cursor == latest_version``.
    """

    entries: list[LogEntry]
    cursor: int
    latest_version: int
    remaining_bytes: int


@dataclass(frozen=True)
class StoredObject:
    """One object as stored: packed primary key, merge state bytes, rendered values
    (``values`` is None when the object is erased)."""

    pk: bytes
    state: bytes
    values: dict[str, Any] | None

    def lone_parts(self) -> tuple[bytes, dict[str, Any]] | None:
        """``(packed HLC of the create, values)`` when the state is the compact form of an
        object a lone CREATE made (:data:`~tidesync.core.merge.LONE_HEAD`), else None."""
        lone = lone_create(self.state)
        return None if lone is None else (pack(lone[0]), lone[1])


_setattr = object.__setattr__
_getattribute = object.__getattribute__


class PackedStoredObject(StoredObject):
    """A :class:`StoredObject` read with its values still packed (``core.packing``): they
    are unpacked on first read of ``values`` (and kept). Reads, compares and prints like
    the eagerly unpacked object; a backend returns it where the values are likely unused
    (a bootstrap of every object only sends the states)."""

    def __init__(self, pk: bytes, state: bytes, vals: bytes, created: bytes | None = None) -> None:
        """``created``: the packed HLC of the create when ``state`` is the compact
        lone-create form (the backend read it apart from the values)."""
        _setattr(self, "pk", pk)  # the dataclass is frozen
        _setattr(self, "state", state)
        _setattr(self, "_vals", vals)
        _setattr(self, "_created", created)

    def lone_parts(self) -> tuple[bytes, dict[str, Any]] | None:
        """:meth:`StoredObject.lone_parts`, without decoding the state when the backend
        gave the create's HLC apart."""
        created = _getattribute(self, "_created")
        if created is None:
            return super().lone_parts()
        values = self.values
        return None if values is None else (created, values)

    def __getattr__(self, name: str) -> Any:  # only called for an attribute not set yet
        if name != "values":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        values = unpack(_getattribute(self, "_vals"))
        _setattr(self, "values", values)
        return values

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredObject):
            return NotImplemented
        return (self.pk, self.state, self.values) == (other.pk, other.state, other.values)

    __hash__ = StoredObject.__hash__


@dataclass(frozen=True)
class MatchPage:
    """One page of :meth:`ServerStorage.read_matching`.

    ``objects`` are the matching alive objects with a packed pk in ``(after, cursor]``, in
    pk order; ``scanned_bytes`` is the state bytes of *every* alive object of the model in
    that range (for bootstrap progress); ``done`` is True when nothing follows ``cursor``.
    """

    objects: list[StoredObject]
    cursor: bytes | None
    scanned_bytes: int
    done: bool


def object_matches(
    queries: Sequence[BoundQuery] | None, rule: BoundQuery | None, values: dict[str, Any]
) -> bool:
    """Does an object match one of ``queries`` (None: every object; empty: none) and the
    read ``rule`` (None: no rule)? Links are not followed (they read as missing objects)."""
    if rule is not None and not evaluate(rule, values, _no_lookup):
        return False
    return queries is None or any(evaluate(b, values, _no_lookup) for b in queries)


def matches_everything(queries: Sequence[BoundQuery] | None, rule: BoundQuery | None) -> bool:
    """True when :func:`object_matches` holds for every object whatever its values: the read
    ``rule`` is None (or always true) and ``queries`` is None or holds a query that always
    matches (``TRUEPREDICATE``, see :func:`~tidesync.core.query.is_always_true`). A backend
    need not evaluate anything, nor decode the objects' values, then."""
    if rule is not None and not is_always_true(rule):
        return False
    return queries is None or any(is_always_true(b) for b in queries)


def _no_lookup(model: str, pk: Any) -> dict[str, Any] | None:
    return None


class ServerStorage(abc.ABC):
    """Where the server keeps apps' schemas, clients, histories and object states.

    Use as ``async with storage:`` or call :meth:`open` and :meth:`close`. Every method
    is a coroutine; implementations must never block the event loop.
    """

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create the tables if needed; the other methods need this first."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource; returns when no thread or task of the storage runs."""

    @abc.abstractmethod
    async def register_client(self, app_id: str, origin: str, user_id: str) -> int:
        """Register ``origin`` for ``user_id`` (idempotent); return its last integrated version.

        Raises :class:`ClientOwnershipError` if ``origin`` belongs to another user.
        """

    @abc.abstractmethod
    async def get_schemas(self, app_id: str) -> dict[str, ModelSchema]:
        """The app's models by name (empty for an unknown app)."""

    @abc.abstractmethod
    async def put_schemas(self, app_id: str, schemas: list[ModelSchema]) -> dict[str, ModelSchema]:
        """Add new models and new fields (see :func:`merge_schemas`); return the merged set.

        Raises :class:`~tidesync.errors.SchemaMismatchError` (and stores nothing) for an
        incompatible change.
        """

    @abc.abstractmethod
    async def integrate(self, batches: list[UploadBatch]) -> list[UploadResult]:
        """Integrate uploads in one durable transaction; one result per batch, in order.

        Returns only once the commit is durable. Refused batches are reported in their
        result (``error``) and store nothing, while the other batches commit.
        """

    @abc.abstractmethod
    async def read_log(
        self, app_id: str, after: int, max_bytes: int, exclude_origin: str | None = None
    ) -> LogPage:
        """Entries with ``server_version > after``, in order, up to about ``max_bytes``.

        At least one entry is returned when any (not excluded) entry exists. Raises
        :class:`HistoryTrimmedError` when ``after`` is before the trimmed point and
        :class:`CursorAheadError` when ``after`` is past the latest version.
        """

    @abc.abstractmethod
    async def latest_version(self, app_id: str) -> int:
        """The app's latest server version (0 if none)."""

    @abc.abstractmethod
    async def client_version(self, app_id: str, origin: str) -> int:
        """The last client version of ``origin`` integrated (0 if none)."""

    async def client_known(self, app_id: str, origin: str) -> bool:
        """Was ``origin`` ever registered for ``app_id``? (False after ``wipe_app`` or on a
        fresh data folder: such a file must reset.) Backends that cannot tell say True."""
        return True

    @abc.abstractmethod
    async def get_objects(self, app_id: str, model: str) -> dict[Any, dict[str, Any]]:
        """Primary key -> rendered values of every alive object of ``model``."""

    # -- flexible sync (bootstraps, permission checks); see docs/flexible-sync.md ---------

    async def read_objects(
        self, app_id: str, model: str, after: bytes | None, limit: int
    ) -> list[StoredObject]:
        """Up to ``limit`` alive objects of ``model`` whose packed pk sorts after ``after``
        (None: from the start), in ascending packed-pk (bytewise) order."""
        raise StorageError(f"{type(self).__name__} does not support flexible sync yet")

    async def get_states(
        self, app_id: str, keys: Iterable[ObjectKey]
    ) -> dict[ObjectKey, StoredObject]:
        """The stored objects (alive or erased) of ``keys``; keys never stored are absent."""
        raise StorageError(f"{type(self).__name__} does not support flexible sync yet")

    async def get_state_bytes(
        self, app_id: str, keys: Iterable[ObjectKey]
    ) -> dict[ObjectKey, bytes]:
        """Just the merge state bytes of ``keys`` (alive or erased; keys never stored are
        absent). This default reads :meth:`get_states`; a backend may skip the values."""
        return {key: obj.state for key, obj in (await self.get_states(app_id, keys)).items()}

    async def objects_size(self, app_id: str, model: str) -> tuple[int, int]:
        """``(count, total state bytes)`` of the alive objects of ``model``."""
        raise StorageError(f"{type(self).__name__} does not support flexible sync yet")

    async def read_matching(
        self,
        app_id: str,
        model: str,
        queries: Sequence[BoundQuery] | None,
        rule: BoundQuery | None,
        after: bytes | None,
        limit: int,
    ) -> MatchPage:
        """The next alive objects of ``model`` after packed pk ``after`` that match one of
        ``queries`` and the read ``rule`` (see :func:`object_matches`), in pk order.

        This default reads up to ``limit`` objects with :meth:`read_objects` and filters
        them with :func:`~tidesync.core.query.evaluate`; a backend that can evaluate the
        queries itself (PostgreSQL) returns up to ``limit`` *matching* objects instead.
        """
        rows = await self.read_objects(app_id, model, after, limit)
        hits = [r for r in rows if r.values is not None and object_matches(queries, rule, r.values)]
        return MatchPage(
            hits,
            rows[-1].pk if rows else after,
            sum(len(r.state) for r in rows),
            len(rows) < max(1, limit),
        )

    # -- the backend API (change feed, webhooks); see docs/backend.md ----------------------

    async def client_users(self, app_id: str, origins: Iterable[str]) -> dict[str, str]:
        """The user id each registered origin of ``origins`` belongs to (origins never
        registered, or wiped, are absent)."""
        raise StorageError(f"{type(self).__name__} does not support the change feed yet")

    async def get_record(self, app_id: str, key: str) -> str | None:
        """The small durable text value stored under ``key`` for ``app_id`` (None if none):
        a webhook's delivery cursor, for one."""
        raise StorageError(f"{type(self).__name__} does not support records yet")

    async def put_record(self, app_id: str, key: str, value: str) -> None:
        """Store ``value`` under ``key`` for ``app_id`` (replacing any), durably."""
        raise StorageError(f"{type(self).__name__} does not support records yet")

    async def take_lease(self, app_id: str, name: str, holder: str, ttl: float) -> bool:
        """Try to hold the lease ``name`` of ``app_id`` for ``ttl`` seconds as ``holder``.

        True when ``holder`` holds it now: it was free, expired, or already ``holder``'s
        (then it is renewed). False while another holder's lease runs. Several processes
        sharing the storage use it so one of them does a job at a time (a webhook's
        deliveries); when the holder dies its lease expires and another takes over."""
        raise StorageError(f"{type(self).__name__} does not support leases yet")

    async def drop_lease(self, app_id: str, name: str, holder: str) -> None:
        """Give up the lease ``name`` if ``holder`` holds it (else do nothing)."""
        raise StorageError(f"{type(self).__name__} does not support leases yet")

    @abc.abstractmethod
    async def trim_history(self, app_id: str, before_version: int) -> int:
        """Delete log entries ``<= before_version`` (clamped to the latest); return how many."""

    @abc.abstractmethod
    async def wipe_app(self, app_id: str) -> None:
        """Delete every piece of the app's data: schemas, clients, history, objects."""

    def watch(self, app_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when *another process* commits new versions of ``app_id``.

        Returns the function that stops watching. Backends shared by several server
        processes (PostgreSQL) override this; a single-process backend (SQLite) has nothing
        to report, since the hub already wakes its sessions after its own commits.
        """
        return _no_op

    async def check_ready(self) -> None:
        """Raise :class:`StorageError` unless the storage can serve queries now."""
        await self.latest_version("")


def _no_op() -> None:
    """Stops nothing (see :meth:`ServerStorage.watch`)."""


# ---------------------------------------------------------------------------------------
# Backend-neutral rules, applied by every backend inside its transaction.


def select_new_changesets(
    batch: UploadBatch, last_version: int, schemas: dict[str, ModelSchema]
) -> list[Changeset]:
    """The changesets of ``batch`` to integrate, given the origin's ``last_version``.

    Duplicates (``version <= last``) are dropped; the rest must follow on densely, name the
    batch's origin (as must their instructions' HLCs) and pass
    :func:`~tidesync.core.validate.validate_changeset`. Raises :class:`BatchRejectedError`.
    """
    new: list[Changeset] = []
    expected = last_version + 1
    for cs in batch.changesets:
        if cs.origin != batch.origin:
            raise BatchRejectedError(
                RejectReason.ORIGIN_MISMATCH,
                f"changeset {cs.origin}#{cs.version} is not from origin {batch.origin}",
            )
        if cs.version < expected:
            continue
        if cs.version != expected:
            raise BatchRejectedError(
                RejectReason.GAP,
                f"origin {batch.origin}: changeset version {cs.version} leaves a gap "
                f"(expected {expected})",
            )
        for ins in cs.instructions:
            if ins.hlc.origin != cs.origin:
                raise BatchRejectedError(
                    RejectReason.ORIGIN_MISMATCH,
                    f"changeset {cs.origin}#{cs.version}: instruction timestamp {ins.hlc} "
                    "is from another origin",
                )
        try:
            validate_changeset(cs, schemas)
        except ValueError as exc:
            raise BatchRejectedError(
                RejectReason.INVALID, f"changeset {cs.origin}#{cs.version}: {exc}"
            ) from exc
        new.append(cs)
        expected += 1
    return new


def rechecked(
    batch: UploadBatch, new: list[Changeset], states: Mapping[ObjectKey, bytes]
) -> list[Changeset]:
    """``new`` as ``batch``'s :class:`CommitCheck` lets it through (``new`` itself when the
    batch has no check, or the check still holds). A check that fails (a bug) refuses its
    batch alone (:class:`BatchRejectedError`), never the other batches of the commit."""
    if batch.check is None:
        return new
    try:
        return batch.check.recheck(new, states)
    except Exception as exc:
        log.exception("the commit check of an upload of %s failed", batch.origin)
        raise BatchRejectedError(
            RejectReason.INVALID, f"the upload could not be checked again: {exc}"
        ) from exc


def held_in(
    app: str, *tables: Container[tuple[str, str, bytes]]
) -> Callable[[list[ObjectKey]], bool]:
    """For :func:`only_new_creates`: whether any of ``app``'s keys is in one of a
    transaction's ``tables`` (keyed by ``(app, model, packed pk)``)."""

    def held(keys: list[ObjectKey]) -> bool:
        for model, pk in keys:
            full = (app, model, pk)
            for table in tables:
                if full in table:
                    return True
        return False

    return held


def only_new_creates(
    new: list[Changeset],
    schemas: dict[str, ModelSchema],
    held: Callable[[list[ObjectKey]], bool],
) -> tuple[dict[ObjectKey, tuple[bytes, bytes]], list[list[ObjectKey]]] | None:
    """The common upload of new objects, in one pass: when every instruction of ``new`` is
    a CREATE of its own object (no key twice), of a model whose creates are plain rows
    (:func:`~tidesync.core.merge.rows_of_creates`), and ``held(keys)`` is false for each
    model's keys (the transaction holds no state of any of them yet), a storage may take
    them for new objects without looking them up (and must look and merge if one is
    stored after all): ``(key -> (state head, packed values) as created_rows makes them,
    each changeset's keys)``. ``None`` otherwise, and for any value the merge would refuse
    (the general path then names the error)."""
    create = Op.CREATE
    plain: dict[str, bool] = {}
    keyed: list[list[ObjectKey]] = []
    by_model: dict[str, tuple[list[ObjectKey], list[Instruction]]] = {}
    count = 0
    for cs in new:
        instructions = cs.instructions
        keys = object_keys(instructions)
        for key, ins in zip(keys, instructions):
            if ins.op is not create:
                return None
            model = key[0]
            ok = plain.get(model)
            if ok is None:
                schema = schemas.get(model)
                ok = plain[model] = schema is not None and rows_of_creates(schema)
            if not ok:
                return None
            entry = by_model.get(model)
            if entry is None:
                entry = by_model[model] = ([], [])
            entry[0].append(key)
            entry[1].append(ins)
        keyed.append(keys)
        count += len(keys)
    fresh: dict[ObjectKey, tuple[bytes, bytes]] = {}
    for model, (keys, creates) in by_model.items():
        if held(keys):
            return None
        try:
            encoded = created_rows_many(creates, schemas[model])
        except (ValueError, TypeError):
            return None
        if encoded is None:
            return None
        fresh.update(zip(keys, encoded, strict=True))
    if len(fresh) != count:  # a key twice
        return None
    return fresh, keyed


#: Instructions grouped by the object they change, each with its changeset (for messages).
ByObject = dict[ObjectKey, list[tuple[Changeset, Instruction]]]


def lone_creates(
    by_object: ByObject, stored: Container[ObjectKey], new: Sequence[Changeset], versions: list[int]
) -> dict[ObjectKey, int]:
    """:attr:`UploadResult.created`: the keys of ``by_object`` (grouped from the dense
    changesets ``new`` before they were applied) that are not in ``stored`` (the states
    the transaction found) and that only one CREATE touches, each with the server version
    ``versions`` gave its changeset."""
    if not new:
        return {}
    first = new[0].version
    return {
        key: versions[items[0][0].version - first]
        for key, items in by_object.items()
        if len(items) == 1 and items[0][1].op is Op.CREATE and key not in stored
    }


def object_keys(instructions: Sequence[Instruction]) -> list[ObjectKey]:
    """Each instruction's object key ``(model, packed pk)``, in order (one pooled packer)."""
    return list(zip([i.model for i in instructions], pack_each([i.pk for i in instructions])))


def instructions_by_object(changesets: Iterable[Changeset]) -> ByObject:
    """Group the changesets' instructions by object key, keeping their order."""
    grouped: ByObject = {}
    for cs in changesets:
        instructions = cs.instructions
        for ins, key in zip(instructions, object_keys(instructions), strict=True):
            entry = grouped.get(key)
            if entry is None:
                grouped[key] = [(cs, ins)]
            else:
                entry.append((cs, ins))
    return grouped


def apply_changesets(
    by_object: ByObject,
    schemas: dict[str, ModelSchema],
    states: dict[ObjectKey, ObjectState],
) -> None:
    """Apply every instruction to ``states``; a key missing from ``states`` starts empty.

    Callers store the state of every key of ``by_object`` afterwards, whether or not its
    visible values changed (the merge state may still have moved, e.g. a CREATE older than
    an ERASE). Raises :class:`BatchRejectedError` if the merge refuses an instruction;
    ``states`` may then be partly updated, so callers pass copies they can drop.
    """
    for key, items in by_object.items():
        state = states.get(key)
        if state is None:
            state = states[key] = ObjectState.empty()
        schema = schemas[key[0]]
        for cs, ins in items:
            try:
                state.apply(ins, schema)
            except (ValueError, TypeError, KeyError) as exc:
                raise BatchRejectedError(
                    RejectReason.INVALID, f"changeset {cs.origin}#{cs.version}: {exc}"
                ) from exc


def merge_schemas(
    stored: dict[str, ModelSchema], declared: list[ModelSchema]
) -> dict[str, ModelSchema]:
    """The schema set after a development-mode client declares ``declared``.

    New models are added; a known model gains the declared fields it lacks (each must be
    optional, a collection or a counter: :func:`~tidesync.core.schema.check_compatible`'s
    rule) and keeps the fields the declaration leaves out. A changed type or primary key,
    a bad primary key kind, or a link to an unknown model raises
    :class:`~tidesync.errors.SchemaMismatchError`.
    """
    merged = dict(stored)
    for model in declared:
        pk = model.pk_field
        if pk.kind not in PK_KINDS or pk.is_collection or pk.optional:
            raise SchemaMismatchError(
                f"model {model.name}: primary key {pk.name!r} cannot be {pk.type_name()}"
            )
        old = merged.get(model.name)
        if old is None:
            merged[model.name] = model
            continue
        kept = tuple(f for f in old.fields if f.name not in model.by_name)
        superset = ModelSchema(model.name, model.fields + kept, model.primary_key)
        added = check_compatible(old, superset)
        if added:
            merged[model.name] = ModelSchema(old.name, old.fields + tuple(added), old.primary_key)
    for model in merged.values():
        for f in model.fields:
            if f.kind is Kind.LINK and f.target not in merged:
                raise SchemaMismatchError(
                    f"model {model.name}: field {f.name!r} links to unknown model {f.target!r}"
                )
    return merged
