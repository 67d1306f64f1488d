"""Flexible sync on the server: what each session may see, bootstraps, compensating writes.

A session's *view* (:class:`FlexView`) is its subscription set (QUERY, bound with
``core.query`` against the app's schemas) and the user's :class:`~.rules.Permissions`. An
object is *visible* to the session when it is alive, matches some subscription of its model
(a session that never sent QUERY subscribes to everything) and the user's read rule allows
it. The view remembers which objects the device holds (``held``).

- **Bootstrap** (a new set, or the first download of a session under rules): every visible
  object is sent whole (``Download.objects``) in pages of about ``page_bytes``, with
  ``downloadable_bytes`` counting down the bytes still to scan; the last page
  (``BOOTSTRAP_LAST``) moves the cursor to the version the bootstrap started at, and the
  device then drops what the bootstrap did not contain.
- **Incremental**: each page of the log keeps only the instructions on objects the device
  holds and may still see; an object that became visible is sent whole, one that stopped
  being visible is evicted (dropped locally, never deleted anywhere).
- **Uploads** (:func:`check_upload`): each object's instructions are tried on a copy of its
  stored state; when the write rule refuses the object before or after the change, or the
  object is outside the subscriptions, they are dropped (the rest of the changeset is kept).
  The judging is :mod:`.writecheck`'s, done again inside the commit's transaction on the
  states it sees. Once the upload is acknowledged the device gets the authoritative state
  of every object it touched (or an eviction) and, if something was refused, ERROR 231
  listing it.

See docs/flexible-sync.md for the exact message sequence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from ..core import query as q
from ..core.changeset import Changeset, Instruction, Op
from ..core.hlc import HLC
from ..core.merge import created_at, created_state
from ..core.packing import pack, pack_instructions, unpack, unpack_instructions
from ..core.schema import ModelSchema
from ..errors import QueryError
from ..protocol.messages import (
    BOOTSTRAP_LAST,
    BOOTSTRAP_PAGE,
    DownloadChangeset,
    ErrorCode,
    ObjectRows,
    ObjectUpdate,
    compensating_message,
)
from ..support.gcpause import gc_paused
from .rules import AppRules, Permissions, user_fields
from .storage.base import CommitCheck, ObjectKey, StoredObject, UploadResult, object_keys
from .writecheck import CommitRecheck, count_keys, created_or_none, judge

if TYPE_CHECKING:
    from .hub import HubSession, SyncConnection, SyncHub

log = logging.getLogger("tidesync.server.flexsync")

#: Objects read from storage per bootstrap batch.
BOOTSTRAP_BATCH = 2000


@dataclass
class SubscriptionQueries:
    """A bound subscription set: model name -> its queries."""

    version: int
    by_model: dict[str, list[q.BoundQuery]]

    def matches(self, model: str, values: dict[str, Any]) -> bool:
        """Does an object match one of its model's subscriptions?"""
        for bound in self.by_model.get(model, ()):
            if q.evaluate(bound, values, _no_links):
                return True
        return False


def _no_links(model: str, pk: Any) -> dict[str, Any] | None:
    return None


def bind_subscriptions(
    version: int,
    queries: dict[str, list[str]],
    args: dict[str, list[list[Any]]],
    schemas: dict[str, ModelSchema],
) -> SubscriptionQueries:
    """Bind a QUERY's queries; raises :class:`QueryError` with a message for the device."""
    by_model: dict[str, list[q.BoundQuery]] = {}
    for model, texts in queries.items():
        schema = schemas.get(model)
        if schema is None:
            raise QueryError(f"unknown model {model!r} in subscription set {version}")
        model_args = args.get(model, [])
        bound_list: list[q.BoundQuery] = []
        for i, text in enumerate(texts):
            parsed = q.parse(text)
            if parsed.sort or parsed.limit is not None or parsed.distinct:
                raise QueryError(
                    f"{model}: SORT, LIMIT and DISTINCT are not supported in subscriptions: {text}"
                )
            a = model_args[i] if i < len(model_args) else []
            bound_list.append(q.bind(parsed, schema, schemas, a))
        by_model[model] = bound_list
    return SubscriptionQueries(version, by_model)


@dataclass
class CheckedUpload:
    """What :func:`check_upload` remembers of an upload until it is acknowledged."""

    #: The upload's last client version (reconciled once the session's ack reaches it).
    version: int
    #: Every object the upload touched.
    touched: set[ObjectKey]
    #: ``(model, pk, reason)`` of each refused object.
    refused: list[tuple[str, Any, str]]
    #: Objects the upload touched with nothing but one CREATE: key -> ``(that CREATE's
    #: HLC, visible to the device with the values it gives)``. When the stored state is
    #: still that CREATE's alone (:func:`~tidesync.core.merge.created_at`), the device
    #: holds the very same state (it made it), so reconciling sends nothing for it.
    created: dict[ObjectKey, tuple[HLC, bool]] = field(default_factory=dict)
    #: The subscriptions and permissions ``created``'s visibility was judged with.
    judged_with: tuple[Any, Any] = (None, None)
    #: Objects the device held when it wrote them, of models the view shows whole, that
    #: the upload does not ERASE: still visible, nothing to send (unless refused).
    stay_visible: frozenset[ObjectKey] = frozenset()
    #: Once committed: the objects the storage integrated as made by one CREATE alone
    #: (``UploadResult.created``; see :func:`note_committed`).
    committed: AbstractSet[ObjectKey] | None = None
    #: Every object in ``created`` is visible (its flag is True): reconciling may take
    #: them all at once.
    all_visible: bool = False


def note_committed(view: FlexView, version: int, result: UploadResult) -> None:
    """Record an upload's commit on the upload checked for it (``version``: its last)."""
    for upload in reversed(view.uploads):
        if upload.version == version:
            upload.committed = result.created.keys()  # a view: no copy of 10,000s of keys
            return


@dataclass
class FlexView:
    """One session's view: permissions, subscriptions and what the device holds."""

    perms: Permissions
    schemas: dict[str, ModelSchema]
    #: None: every model (a session that sent no QUERY, under rules).
    subs: SubscriptionQueries | None
    held: set[ObjectKey] = field(default_factory=set)
    #: False when ``held`` is not all the device holds (a bootstrap skipped on reconnect,
    #: see :func:`on_query`): an object outside ``held`` may be on the device, so one that
    #: is touched and no longer visible is evicted (a no-op on a device that lacks it).
    held_complete: bool = True
    #: A flexible BIND's view until its first QUERY: nothing is downloaded meanwhile (with
    #: no subscriptions yet, the log would be filtered to nothing and the cursor moved on).
    awaiting_query: bool = False
    #: The QUERY's ``(queries, args)`` as received (None: no QUERY yet).
    queries: tuple[Any, Any] | None = None
    #: A bootstrap is owed for this query version (None: none owed).
    bootstrap: int | None = None
    #: Uploads to reconcile once acknowledged (:class:`CheckedUpload`).
    uploads: list[CheckedUpload] = field(default_factory=list)

    def visible(self, model: str, values: dict[str, Any] | None) -> bool:
        """May the device hold this object now?"""
        if values is None or model not in self.schemas:
            return False
        if self.subs is not None and not self.subs.matches(model, values):
            return False
        return self.perms.can_read(model, values)

    def can_refuse(self, model: str) -> bool:
        """Could a write to ``model`` be refused? Not when there are no rules and one of the
        model's subscriptions matches every object (``db.all(Model)``)."""
        if not self.perms.unrestricted or self.subs is None or model not in self.schemas:
            return True
        return not any(q.is_always_true(b) for b in self.subs.by_model.get(model, ()))

    def in_subscriptions(self, model: str, values: dict[str, Any]) -> bool:
        """Does the object fall inside the session's subscriptions?"""
        return self.subs is None or self.subs.matches(model, values)


async def _load_user(conn: SyncConnection) -> dict[str, Any]:
    """The connected user's field values, from the server's user records."""
    assert conn.user_id is not None
    return await conn.hub.auth.rule_values(conn.app_id, conn.user_id)


async def user_of(conn: SyncConnection) -> dict[str, Any]:
    """The field values rules see for the connection's user (cached per connection)."""
    assert conn.user_id is not None
    cached = conn.rule_user
    if cached is not None and cached[0] == conn.user_id:
        return cached[1]
    values = await _load_user(conn)
    conn.rule_user = (conn.user_id, values)
    return values


async def on_refresh(conn: SyncConnection) -> None:
    """A new access token: look the user's fields up again. When they changed, every view
    of the connection is rebound to them and owes its device a bootstrap (an object the
    user may no longer read must leave the device)."""
    if conn.user_id is None:
        return
    values = await _load_user(conn)
    cached = conn.rule_user
    conn.rule_user = (conn.user_id, values)
    if cached is None or cached[1] == values:
        return  # no view used the user's fields yet, or they did not change
    for session in list(conn.sessions.values()):
        view = session.flex
        if view is None or not session.active:
            continue
        view.perms = Permissions(view.perms.rules, values, view.schemas)
        view.bootstrap = view.subs.version if view.subs is not None else 0
        session.wake.set()


def app_rules(conn: SyncConnection) -> AppRules | None:
    """The connection's app's rules (None: no restrictions)."""
    return conn.hub.auth.app_rules(conn.app_id)


async def open_view(conn: SyncConnection, flexible: bool) -> FlexView | None:
    """The view of a new session, or None when nothing is filtered (no rules, no QUERY)."""
    hub = conn.hub
    rules = app_rules(conn)
    if rules is None and not flexible:
        return None
    schemas = await hub.storage.get_schemas(conn.app_id)
    assert conn.user_id is not None
    user = await user_of(conn) if rules is not None else user_fields(conn.user_id)
    perms = Permissions(rules, user, schemas)
    if flexible:
        return FlexView(perms, schemas, SubscriptionQueries(0, {}), awaiting_query=True)
    return FlexView(perms, schemas, None, bootstrap=0)


async def on_query(
    conn: SyncConnection,
    session: HubSession,
    version: int,
    queries: dict[str, list[str]],
    args: dict[str, list[list[Any]]],
    bootstrapped: bool = False,
) -> None:
    """A new subscription set: bind it (QUERY_ERROR if it cannot be served), then owe the
    device a bootstrap.

    A set re-sent after a reconnect whose bootstrap the device says it applied
    (``bootstrapped``) is not bootstrapped again when this process sent that bootstrap to
    this device file under the same queries, rules and user fields (:func:`_remember`):
    the device is consistent at its download cursor, so the log from there, filtered with
    ``held_complete`` False, brings it up to date."""
    view = session.flex
    schemas = await conn.hub.storage.get_schemas(conn.app_id)
    if view is None:
        assert conn.user_id is not None
        view = FlexView(Permissions(None, user_fields(conn.user_id), schemas), schemas, None)
    try:
        subs = bind_subscriptions(version, queries, args, schemas)
    except (QueryError, ValueError, TypeError) as exc:
        message = str(exc)
        view.awaiting_query = False  # serve the view as it is (the device keeps its old set)
        session.wake.set()
        log.info("connection %s session %d: query refused: %s", conn.id, session.number, message)
        if conn.sendable(session):
            conn.proto.query_error(session.number, version, message)
            await conn.flush()
        return
    view.schemas = schemas
    view.perms.schemas = schemas
    view.subs = subs
    view.awaiting_query = False
    view.queries = (queries, args)
    owed = view.bootstrap is not None  # BIND found the history trimmed: the log cannot do
    view.bootstrap = version
    if bootstrapped and not owed and _recalled(conn, session, view, queries, args):
        view.bootstrap = None
        view.held = set()
        view.held_complete = False
        session.sent_query_version = version
    session.flex = view
    session.query_version = version
    session.wake.set()


#: The most complete bootstraps one process remembers (``SyncHub.bootstraps``).
_RECALL_LIMIT = 20_000


def _fingerprint(view: FlexView, queries: Any, args: Any) -> tuple[Any, ...]:
    """What the bootstrap depended on: set version, queries, arguments, rules, user fields."""
    version = view.subs.version if view.subs is not None else 0
    return (version, queries, args, view.perms.rules, view.perms.user)


def _remember(conn: SyncConnection, file_ident: str, view: FlexView, target: int) -> None:
    """Note that the device file was sent the complete bootstrap of ``view`` (up to log
    version ``target``)."""
    if view.subs is None or view.subs.version == 0 or view.queries is None:
        return
    known = conn.hub.bootstraps
    key = (conn.app_id, file_ident)
    known.pop(key, None)
    known[key] = (target, _fingerprint(view, *view.queries))
    while len(known) > _RECALL_LIMIT:
        known.popitem(last=False)


def _recalled(
    conn: SyncConnection, session: HubSession, view: FlexView, queries: Any, args: Any
) -> bool:
    """Did this process send this device file the complete bootstrap of this very view,
    and is the device's download cursor (from BIND) at or past that bootstrap's target?
    (A device that applied the bootstrap is; one reset since holds nothing at cursor 0,
    which the log from 0 also brings up to date when the target was 0.)"""
    entry = conn.hub.bootstraps.get((conn.app_id, session.file_ident))
    if entry is None:
        return False
    target, fingerprint = entry
    return target <= session.cursor and fingerprint == _fingerprint(view, queries, args)


async def catch_up(conn: SyncConnection, session: HubSession) -> None:
    """The flexible sync downloader: bootstrap when owed, else filtered log pages."""
    view = session.flex
    assert view is not None
    hub, app = conn.hub, conn.app_id
    page_bytes = hub.config.page_bytes
    if view.awaiting_query:
        return
    for _ in range(1_000_000):
        if view.bootstrap is not None:
            await _bootstrap(conn, session, view)
            continue
        start = session.cursor
        acked = session.acked  # as of before the read: see SyncConnection's catch-up
        page = await hub.storage.read_log(app, start, page_bytes, exclude_origin=session.file_ident)
        if not conn.sendable(session) or session.error is not None:
            return
        changesets, objects = await _filter_page(conn, view, page.entries)
        reconciled, refused = await _reconcile_uploads(conn, view, acked)
        objects += reconciled
        latest = max(page.latest_version, session.latest)
        moved = page.cursor > start or latest > session.latest or acked > session.sent_acked
        if moved or objects or not session.first_sent:
            conn.proto.download(
                session.number,
                changesets,
                page.cursor,
                latest,
                page.remaining_bytes,
                acked,
                session.sent_query_version,
                objects,
            )
            if refused:  # after the DOWNLOAD that carries the authoritative states
                conn.proto.error(
                    ErrorCode.COMPENSATING_WRITE,
                    compensating_message(refused),
                    session=session.number,
                )
            session.cursor, session.latest, session.sent_acked = page.cursor, latest, acked
            session.first_sent = True
            await conn.flush()
        if page.cursor >= page.latest_version or page.cursor <= start:
            return


async def _bootstrap(conn: SyncConnection, session: HubSession, view: FlexView) -> None:
    hub, app = conn.hub, conn.app_id
    version = view.bootstrap
    assert version is not None
    view.bootstrap = None
    page_bytes = hub.config.page_bytes
    # The acknowledgement the last page carries is taken *before* the scan starts: every
    # upload it covers is then committed before the scan reads anything, so the scan holds
    # the objects it wrote (when visible). An upload acknowledged during the scan may have
    # been integrated after the scan passed its objects; the device must not see that
    # acknowledgement yet, or it would evict its own new object as one the bootstrap did
    # not send (its changes still count as unacknowledged there, so it keeps them). The
    # next DOWNLOAD acknowledges it, with the reconciled state of what it touched.
    acked = session.acked
    target = await hub.storage.latest_version(app)
    schemas = view.schemas = await hub.storage.get_schemas(app)
    view.perms.schemas = schemas
    models = sorted(schemas) if view.subs is None else sorted(view.subs.by_model)
    total = 0
    for model in models:
        total += (await hub.storage.objects_size(app, model))[1]
    scanned = 0
    held: set[ObjectKey] = set()
    batch = _Page()
    for model in models:
        queries = None if view.subs is None else view.subs.by_model.get(model, [])
        readable, rule = _read_rule(view.perms, model)
        batch.model(model, schemas.get(model))
        after: bytes | None = None
        # the storage filters (PostgreSQL in SQL); progress counts every object scanned
        while readable:
            page = await hub.storage.read_matching(
                app, model, queries, rule, after, BOOTSTRAP_BATCH
            )
            sent = 0
            queued = False
            # Nothing here awaits, and the collector is paused: the thousands of objects
            # made per page are encoded (and dropped) before any collection traverses
            # them, instead of being promoted into the old generation and re-scanned.
            with gc_paused:
                for row in page.objects:
                    sent += batch.add(row)
                    held.add((model, row.pk))
                    if batch.bytes >= page_bytes:
                        remaining = total - scanned - sent
                        if not _send_bootstrap_page(conn, session, view, batch, remaining):
                            return
                        queued = True
            if queued:
                await conn.flush()
            scanned += page.scanned_bytes
            if page.done or page.cursor is None or page.cursor == after:
                break
            after = page.cursor
    if not conn.sendable(session) or view.bootstrap is not None:
        return
    rest = await hub.storage.read_log(app, target, 1, exclude_origin=session.file_ident)
    view.held = held
    view.held_complete = True
    latest = max(rest.latest_version, session.latest, target)
    objects, blocks = batch.take()
    conn.proto.download(
        session.number,
        [],
        max(target, session.cursor),
        latest,
        rest.remaining_bytes,
        acked,
        version,
        objects,
        BOOTSTRAP_LAST,
        blocks,
    )
    session.cursor = max(target, session.cursor)
    session.latest, session.sent_acked = latest, acked
    session.sent_query_version = version
    session.first_sent = True
    await conn.flush()
    _remember(conn, session.file_ident, view, target)


def _read_rule(perms: Permissions, model: str) -> tuple[bool, q.BoundQuery | None]:
    """``(readable at all, read filter or None for no filter)`` of ``model`` for the user."""
    if perms.unrestricted:
        return True, None
    return perms.read_filter(model)


class _Page:
    """A bootstrap page being filled: the objects a lone CREATE made go as rows
    (:class:`~tidesync.protocol.messages.ObjectRows`, one block per model), the others
    as whole objects; ``bytes`` counts the states of both."""

    __slots__ = (
        "_fields",
        "_model",
        "_names",
        "_pk",
        "_rows",
        "_size",
        "blocks",
        "bytes",
        "objects",
    )

    def __init__(self) -> None:
        self.objects: list[ObjectUpdate] = []
        self.blocks: list[ObjectRows] = []
        self.bytes = 0
        self._model = ""
        self._fields: list[str] = []
        self._names: tuple[str, ...] | None = None
        self._pk = 0
        self._rows: list[list[Any]] = []
        self._size = 0

    def model(self, model: str, schema: ModelSchema | None) -> None:
        """The objects added next are of ``model``."""
        self._close_block()
        self._model = model
        self._names = None
        if schema is not None:
            self._fields = [f.name for f in schema.fields]
            self._names = tuple(self._fields)
            self._pk = self._fields.index(schema.primary_key)

    def add(self, row: StoredObject) -> int:
        """Add one stored object; returns its state's bytes."""
        state = row.state
        parts = row.lone_parts() if self._names is not None else None
        if parts is not None and tuple(parts[1]) == self._names:
            self._rows.append([parts[0], *parts[1].values()])
            self._size += len(state)
        else:
            self.objects.append(ObjectUpdate(self._model, unpack(row.pk), state))
        self.bytes += len(state)
        return len(state)

    def take(self) -> tuple[list[ObjectUpdate], list[ObjectRows]]:
        """The page's objects and row blocks; the page starts empty again."""
        self._close_block()
        out = (self.objects, self.blocks)
        self.objects, self.blocks, self.bytes = [], [], 0
        return out

    def _close_block(self) -> None:
        if self._rows:
            self.blocks.append(
                ObjectRows(self._model, self._fields, self._pk, self._size, self._rows)
            )
            self._rows, self._size = [], 0


def _send_bootstrap_page(
    conn: SyncConnection,
    session: HubSession,
    view: FlexView,
    batch: _Page,
    remaining: int,
) -> bool:
    """Queue one BOOTSTRAP_PAGE of ``batch`` (the caller flushes; the page starts empty
    again); False when the bootstrap must stop (session gone or a newer set)."""
    if not conn.sendable(session) or view.bootstrap is not None:
        return False
    version = session.query_version if view.subs is not None else 0
    objects, blocks = batch.take()
    conn.proto.download(
        session.number,
        [],
        session.cursor,
        session.latest,
        max(remaining, 1),
        session.sent_acked,
        version,
        objects,
        BOOTSTRAP_PAGE,
        blocks,
    )
    session.sent_query_version = version
    return True


#: A log entry of a page, its instructions and their object keys.
_Decoded = tuple[Any, tuple[Instruction, ...], list[ObjectKey]]


async def _filter_page(
    conn: SyncConnection, view: FlexView, entries: list[Any]
) -> tuple[list[DownloadChangeset], list[ObjectUpdate]]:
    """Keep the instructions on objects the device holds and may still see; send objects
    that became visible whole and evict those that stopped being visible."""
    decoded: list[_Decoded] = []
    touched: set[ObjectKey] = set()
    keys_of: dict[ObjectKey, Any] = {}
    for e in entries:
        instructions = unpack_instructions(e.instructions, e.origin)
        keys = object_keys(instructions)
        decoded.append((e, instructions, keys))
        for key, ins in zip(keys, instructions):
            touched.add(key)
            keys_of[key] = ins.pk
    if not touched:
        return [], []
    if any(key[0] not in view.schemas for key in touched):
        view.schemas = await conn.hub.storage.get_schemas(conn.app_id)
        view.perms.schemas = view.schemas
    keep: set[ObjectKey] = set()
    known = _known_states(conn, view, decoded)
    for key, (known_bytes, _) in known.items():
        if known_bytes is None:
            keep.add(key)  # held, still visible: its instructions go as they are
    to_read = [key for key in touched if key not in known]
    stored = await conn.hub.storage.get_states(conn.app_id, to_read) if to_read else {}
    objects: list[ObjectUpdate] = []
    for key in touched:
        if key in keep:
            continue
        known_state = known.get(key)
        if known_state is not None:
            state, values = known_state
        else:
            row = stored.get(key)
            state, values = (row.state, row.values) if row is not None else (None, None)
        now = state is not None and view.visible(key[0], values)
        if now and key in view.held:
            keep.add(key)
        elif now and state is not None:
            objects.append(ObjectUpdate(key[0], keys_of[key], state))
            view.held.add(key)
        elif key in view.held or not view.held_complete:
            objects.append(ObjectUpdate(key[0], keys_of[key], None))
            view.held.discard(key)
    out: list[DownloadChangeset] = []
    for e, instructions, keys in decoded:
        kept = [i for i, key in zip(instructions, keys) if key in keep]
        if len(kept) == len(instructions):
            data = e.instructions
        else:
            data = pack_instructions(kept)
        out.append(DownloadChangeset(e.server_version, e.origin, e.client_version, data))
    return out, objects


def _known_states(
    conn: SyncConnection, view: FlexView, decoded: list[_Decoded]
) -> dict[ObjectKey, tuple[bytes | None, dict[str, Any] | None]]:
    """The objects of a log page whose state the filter need not read:

    - held objects of models the view shows whole (no rules, an always-true subscription)
      that the page does not ERASE stay visible: ``(None, None)``, keep the instructions;
    - objects the page touches only with the CREATE that made them alone (the hub's
      ``recent_creates`` has that CREATE's server version): their state as of that
      version is the CREATE's (``created_state``), ``(state bytes, values)``; anything
      written to them later is in later log entries, which they are sent as instructions
      once held.
    """
    recent = conn.hub.recent_creates.get(conn.app_id)
    counts: dict[ObjectKey, int] = {}
    erased: set[ObjectKey] = set()
    single: dict[ObjectKey, tuple[int, Instruction]] = {}
    for e, instructions, keys in decoded:
        for key, ins in zip(keys, instructions):
            counts[key] = counts.get(key, 0) + 1
            if ins.op is Op.ERASE:
                erased.add(key)
            single[key] = (e.server_version, ins)
    out: dict[ObjectKey, tuple[bytes | None, dict[str, Any] | None]] = {}
    shows_all: dict[str, bool] = {}
    for key, count in counts.items():
        model = key[0]
        if key in view.held:
            whole = shows_all.get(model)
            if whole is None:
                whole = shows_all[model] = not view.can_refuse(model)
            if whole and key not in erased:
                out[key] = (None, None)
            continue
        if count != 1 or recent is None:
            continue
        version, ins = single[key]
        schema = view.schemas.get(model)
        if ins.op is not Op.CREATE or schema is None or recent.get(key) != version:
            continue
        if len(ins.value) > len(schema.fields):
            continue  # fields the view's schemas predate (a newer release): the stored state
        made = created_or_none(created_state, schema, ins)
        if made is not None:
            out[key] = made
    return out


async def _reconcile_uploads(
    conn: SyncConnection, view: FlexView, acked: int
) -> tuple[list[ObjectUpdate], list[tuple[str, Any, str]]]:
    """After an upload is acknowledged: the authoritative state of what it touched (or an
    eviction), and ERROR 231 for what was refused.

    An object the upload only CREATEd is on the device already, byte for byte, when the
    storage integrated it as made by that CREATE alone (``UploadResult.created``) or,
    failing that, when its stored state is still that CREATE's alone
    (:func:`~tidesync.core.merge.created_at`): it only joins ``held``. Whatever another
    device writes to it after this commit is in the log at a later version, which the
    device is sent as instructions (the object is held) or, when the page is filtered
    before this, whole (visible and not held yet)."""
    due = [u for u in view.uploads if u.version <= acked]
    if not due:
        return [], []
    view.uploads = [u for u in view.uploads if u.version > acked]
    keys: set[ObjectKey] = set()
    refused: list[tuple[str, Any, str]] = []
    refused_keys: set[ObjectKey] = set()
    created: dict[ObjectKey, tuple[HLC, bool]] = {}
    current = (view.subs, view.perms)
    for upload in due:
        refused += upload.refused
        refused_keys |= {(m, pack(pk)) for m, pk, _ in upload.refused}
        judged = upload.judged_with[0] is current[0] and upload.judged_with[1] is current[1]
        confirmed = upload.committed or frozenset()
        if (
            judged
            and upload.all_visible
            and not refused_keys
            and len(confirmed) == len(upload.touched)
        ):
            # the storage made every object it touched from its CREATE alone (its keys
            # are among those touched): all are on the device as they are, and held
            view.held.update(confirmed)
            if keys:
                keys.difference_update(confirmed)
            continue
        keys |= upload.touched
        if not judged:
            continue
        for key in upload.stay_visible:
            if key in view.held and key not in refused_keys:
                keys.discard(key)
        if upload.all_visible:  # the same as below, with set operations
            mine = upload.created.keys()
            done = mine & confirmed
            if refused_keys:
                done -= refused_keys
            view.held |= done
            keys -= done
            for key in mine - confirmed:
                created[key] = upload.created[key]
            continue
        for key, (hlc, visible) in upload.created.items():
            if key not in confirmed:
                created[key] = (hlc, visible)
            elif visible and key not in refused_keys:
                view.held.add(key)
                keys.discard(key)
    if created:
        candidates = [k for k in created if k not in refused_keys]
        states = await conn.hub.storage.get_state_bytes(conn.app_id, candidates)
        for key in candidates:
            hlc, visible = created[key]
            if visible and created_at(states.get(key)) == hlc:
                view.held.add(key)
                keys.discard(key)
    stored = await conn.hub.storage.get_states(conn.app_id, keys) if keys else {}
    objects: list[ObjectUpdate] = []
    for key in keys:
        row = stored.get(key)
        pk = unpack(key[1])
        if row is not None and view.visible(key[0], row.values):
            if key not in view.held or key in refused_keys:
                objects.append(ObjectUpdate(key[0], pk, row.state))
            view.held.add(key)
        else:
            objects.append(ObjectUpdate(key[0], pk, None))
            view.held.discard(key)
    return objects, refused


class WriteGuard:
    """``async with flexsync.write_guard(conn, session) as guard:`` around checking and
    submitting an upload; ``guard.until(future)`` keeps the app's lock until that commit is
    done. So no other checked upload of the app is checked between this one's check and its
    commit: a check never sees state another device's write is about to change. Sessions
    without a view (nothing checked) pass through."""

    def __init__(self, lock: asyncio.Lock | None) -> None:
        self._lock = lock
        self._future: asyncio.Future[Any] | None = None

    def until(self, future: asyncio.Future[Any]) -> None:
        """Hold the lock until ``future`` (the commit) is done."""
        self._future = future

    async def __aenter__(self) -> WriteGuard:
        if self._lock is not None:
            await self._lock.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._lock is None:
            return
        try:
            if self._future is not None:
                # the outcome is the done-callback's business; only the timing matters here
                await asyncio.wait([self._future])
        finally:
            self._lock.release()


def write_guard(
    conn: SyncConnection, session: HubSession, changesets: list[Changeset] | None = None
) -> WriteGuard:
    """The guard of an upload of ``session``: a no-op when the session has no view, or
    when nothing in ``changesets`` can be refused (no rules, and an always-true
    subscription of every model they write: the check reads no stored state, and without
    rules no other check's outcome guards anything but the soft subscription bounds)."""
    view = session.flex
    if view is None:
        return WriteGuard(None)
    if changesets is not None:
        models = {ins.model for cs in changesets for ins in cs.instructions}
        if not any(view.can_refuse(model) for model in models):
            return WriteGuard(None)
    return WriteGuard(app_write_lock(conn.hub, conn.app_id))


def app_write_lock(hub: SyncHub, app_id: str) -> asyncio.Lock:
    """The lock that makes a rule check and its commit one step for ``app_id`` on ``hub``
    (checked uploads of devices, and the Data API's checked writes)."""
    return hub.write_locks.setdefault(app_id, asyncio.Lock())


async def check_upload(
    conn: SyncConnection, session: HubSession, changesets: list[Changeset]
) -> tuple[list[Changeset], CommitCheck | None]:
    """Drop the instructions the rules or the subscriptions refuse; remember what to send
    back once the upload is acknowledged. Returns the changesets to commit and the check
    the commit must do again in its transaction (:class:`~.writecheck.CommitRecheck`;
    None when nothing can be refused)."""
    view = session.flex
    assert view is not None
    schemas = view.schemas
    keyed: list[list[ObjectKey]] = []  # each changeset's instructions' keys
    models: set[str] = set()
    for cs in changesets:
        instructions = cs.instructions
        models.update(map(_model_of, instructions))
        keyed.append(object_keys(instructions))
    if not models <= schemas.keys():
        schemas = view.schemas = await conn.hub.storage.get_schemas(conn.app_id)
        view.perms.schemas = schemas
    judged_with = (view.subs, view.perms)
    if not any(view.can_refuse(model) for model in models):
        # no rules and only always-true subscriptions of these models: nothing is refused;
        # remember each lone CREATE so that reconciling need not send the object back
        view.uploads.append(_unrefused(view, changesets, keyed, judged_with))
        return changesets, None
    counted = count_keys(changesets, keyed)
    stored = await conn.hub.storage.get_state_bytes(conn.app_id, counted[0])
    judged = FlexView(view.perms, schemas, view.subs)  # as of now, for the recheck too
    verdict = judge(judged, schemas, changesets, keyed, stored, counted)
    upload = CheckedUpload(
        changesets[-1].version, set(counted[0]), verdict.refused, verdict.created, judged_with
    )
    view.uploads.append(upload)
    return verdict.changesets, CommitRecheck(judged, schemas, stored, verdict, upload)


_model_of = attrgetter("model")


def _unrefused(
    view: FlexView,
    changesets: list[Changeset],
    keyed: list[list[ObjectKey]],
    judged_with: tuple[Any, Any],
) -> CheckedUpload:
    """What :func:`check_upload` remembers of an upload nothing of which can be refused:
    every object it touched, its lone CREATEs (a key CREATEd once and touched by nothing
    else), and the held objects it does not ERASE."""
    touched: set[ObjectKey] = set()
    twice: set[ObjectKey] = set()
    erased: set[ObjectKey] = set()
    created: dict[ObjectKey, tuple[HLC, bool]] = {}
    create, erase = Op.CREATE, Op.ERASE
    for cs, cs_keys in zip(changesets, keyed):
        for key, ins in zip(cs_keys, cs.instructions):
            if key in touched:
                twice.add(key)
            else:
                touched.add(key)
            if ins.op is create:
                created[key] = (ins.hlc, True)
            elif ins.op is erase:
                erased.add(key)
    for key in twice:
        created.pop(key, None)
    stay = frozenset((touched & view.held) - erased)
    return CheckedUpload(
        changesets[-1].version, touched, [], created, judged_with, stay, None, True
    )
