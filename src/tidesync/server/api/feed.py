"""Reading the change feed: pages of :class:`~.events.ChangeEvent` filtered by models, a
query and the caller's read rules, from a cursor (docs/backend.md, "Change feed").

The cursor is the server version of the last changeset the page covers (an opaque string
to users). A page holds whole changesets: it ends after the changeset that brought it to
``limit`` events (so it may hold a few more), or after :data:`MAX_SCAN_ENTRIES` log entries
(possibly no event at all when a filter hid them: the cursor still moves on).

Filters are evaluated on the objects' *current* stored values (the log keeps what changed,
not whole objects): an update is shown when the object, as it is now, matches the query and
the user's read rule. An ``erase`` has no values left: it is shown under a query (the
reader may not have seen the object: erasing an unknown key is harmless), and to a user
token only when the user may read every object of the model (the erase of an object the
user never saw would leak its key otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ...core import query as q
from ...errors import QueryError
from ..hub import SyncHub
from ..rules import Permissions
from ..storage.base import (
    CursorAheadError,
    HistoryTrimmedError,
    ObjectKey,
    ServerStorage,
    StoredObject,
)
from .access import ADMIN_USER, ApiError, Caller
from .events import ChangeEvent, EventJson, changeset_events
from .perms import permissions_of

#: Log bytes read per storage round trip.
PAGE_BYTES = 256 * 1024
#: Log entries one page looks at, at most (a filter that hides everything still ends).
MAX_SCAN_ENTRIES = 5000
#: Events per page: the default and the most a request may ask for.
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


def feed_gone(exc: HistoryTrimmedError) -> ApiError:
    """The 410 of a cursor older than the history kept."""
    oldest = str(exc.trimmed_version)
    return ApiError(
        410,
        f"the history before this cursor was trimmed (retention); the oldest cursor "
        f"available is {oldest}: restart from there after reading the current objects",
        "history_trimmed",
        {"oldest": oldest},
    )


def parse_cursor(text: str, where: str = "since") -> int:
    """A cursor from its text (400 naming ``where`` for anything else)."""
    text = text.strip()
    if not text.isdigit() or len(text) > 19:
        raise ApiError(400, f"{where}: {text[:40]!r} is not a change feed cursor", "bad_cursor")
    return int(text)


@dataclass
class FeedFilter:
    """Which events a reader sees: ``models`` (None: all), ``queries`` (per model; a model
    without one: all its objects) and the read rules (``perms`` None: an admin)."""

    models: frozenset[str] | None = None
    query: str | None = None
    queries: dict[str, q.BoundQuery] = field(default_factory=dict)
    perms: Permissions | None = None

    def wants(self, model: str) -> bool:
        """Is ``model`` selected at all?"""
        return self.models is None or model in self.models


async def build_filter(
    hub: SyncHub, caller: Caller, models: Iterable[str] | None, query: str | None
) -> FeedFilter:
    """The filter of a request (400 for an unknown model, a query without ``models`` or a
    query that does not parse or fit a model, with the parser's message)."""
    schemas = await hub.storage.get_schemas(caller.app_id)
    chosen: frozenset[str] | None = None
    if models is not None:
        chosen = frozenset(models)
        unknown = sorted(m for m in chosen if m not in schemas)
        if unknown:
            raise ApiError(
                400,
                f"models: the app has no model(s) {', '.join(repr(m) for m in unknown)}",
                "unknown_model",
            )
    flt = FeedFilter(chosen, query)
    if query is not None:
        if chosen is None:
            raise ApiError(400, "query needs models=... (the models it applies to)", "bad_query")
        try:
            parsed = q.parse(query)
            for model in sorted(chosen):
                flt.queries[model] = q.bind(parsed, schemas[model], schemas, ())
        except QueryError as exc:
            raise ApiError(400, f"query: {exc}", "bad_query") from None
    if not caller.admin:
        flt.perms = await permissions_of(hub, caller, schemas)
    return flt


@dataclass
class FeedPage:
    """One page: its events, the cursor after it, and whether the log holds more after
    that cursor (read again at once) or not (wait for a commit). The events' JSON form is
    :attr:`events` (dicts) or :meth:`texts` (encoded), made when first asked for."""

    changes: list[ChangeEvent]
    cursor: int
    more: bool
    #: The writer's user of each event's origin (None: an admin).
    users: dict[str, str | None] = field(default_factory=dict)
    encoder: EventJson = field(default_factory=lambda: EventJson({}))
    _events: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def versions(self) -> list[int]:
        """The server version of each event (SSE ``id:`` and webhook batches use it)."""
        return [ev.version for ev in self.changes]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events in JSON form."""
        if self._events is None:
            users, to_json = self.users, self.encoder.to_json
            self._events = [to_json(ev, users.get(ev.origin)) for ev in self.changes]
        return self._events

    def texts(self) -> list[str]:
        """Each event's JSON text (compact, as ``json.dumps(event, separators=(",", ":"))``)."""
        users, text = self.users, self.encoder.text
        return [text(ev, users.get(ev.origin)) for ev in self.changes]


class FeedReader:
    """Reads pages of one app's feed under one filter (keeps the origins' users and the
    schemas it looked up, so a long stream asks for each only once)."""

    def __init__(self, storage: ServerStorage, app_id: str, flt: FeedFilter) -> None:
        self.storage = storage
        self.app_id = app_id
        self.filter = flt
        self._users: dict[str, str | None] = {}
        self._schemas: dict[str, Any] | None = None
        self._encoder: EventJson | None = None

    async def start_cursor(self, since: int | None) -> int:
        """``since``, or (None) the oldest cursor the history still has."""
        if since is not None:
            return since
        try:
            await self.storage.read_log(self.app_id, 0, 0)
        except HistoryTrimmedError as exc:
            return exc.trimmed_version
        return 0

    async def page(self, after: int, limit: int, until: int | None = None) -> FeedPage:
        """The events after cursor ``after`` (and up to version ``until`` at most, when
        given); raises :class:`ApiError`: 410 when trimmed, 400 when the cursor is past
        the latest version."""
        events: list[ChangeEvent] = []
        cursor, scanned, latest = after, 0, after
        while (
            len(events) < limit and scanned < MAX_SCAN_ENTRIES and (until is None or cursor < until)
        ):
            try:
                log = await self.storage.read_log(self.app_id, cursor, PAGE_BYTES)
            except HistoryTrimmedError as exc:
                raise feed_gone(exc) from None
            except CursorAheadError:
                raise ApiError(
                    400, f"cursor {cursor} is past the app's latest change", "bad_cursor"
                ) from None
            latest = log.latest_version
            entries = [e for e in log.entries if until is None or e.server_version <= until]
            if not entries:
                if until is None:
                    cursor = max(cursor, log.cursor)
                break
            schemas = await self._get_schemas()
            candidates: list[list[ChangeEvent]] = []
            taken = len(events)
            for entry in entries:  # decoded only as far as the page may need
                found = changeset_events(entry, schemas)
                if any(ev.model not in schemas for ev in found):
                    schemas = await self._reload_schemas()
                if self.filter.models is not None:
                    found = [ev for ev in found if self.filter.wants(ev.model)]
                candidates.append(found)
                taken += len(candidates[-1])
                if taken >= limit:
                    break
            filtered = bool(self.filter.queries) or self.filter.perms is not None
            states = {}
            if filtered:
                states = await self._states(ev for group in candidates for ev in group)
            for entry, group in zip(entries, candidates, strict=False):
                if filtered:
                    events.extend(ev for ev in group if self._visible(ev, states))
                else:
                    events.extend(group)
                cursor = entry.server_version
                scanned += 1
                if len(events) >= limit or scanned >= MAX_SCAN_ENTRIES:
                    break
        await self._load_users({ev.origin for ev in events})
        await self._get_schemas()
        assert self._encoder is not None
        return FeedPage(events, cursor, cursor < latest, self._users, self._encoder)

    async def _get_schemas(self) -> dict[str, Any]:
        if self._schemas is None:
            return await self._reload_schemas()
        return self._schemas

    async def _reload_schemas(self) -> dict[str, Any]:
        self._schemas = await self.storage.get_schemas(self.app_id)
        self._encoder = EventJson(self._schemas)
        perms = self.filter.perms
        if perms is not None:
            self.filter.perms = Permissions(perms.rules, perms.user, self._schemas)
        return self._schemas

    def _needs_values(self, ev: ChangeEvent) -> bool:
        if ev.op == "erase":
            return False
        perms = self.filter.perms
        return ev.model in self.filter.queries or (
            perms is not None and not perms.reads_anything(ev.model)
        )

    async def _states(self, events: Iterable[ChangeEvent]) -> dict[ObjectKey, StoredObject]:
        keys = {ev.key for ev in events if self._needs_values(ev)}
        if not keys:
            return {}
        return await self.storage.get_states(self.app_id, keys)

    def _visible(self, ev: ChangeEvent, states: dict[ObjectKey, StoredObject]) -> bool:
        perms = self.filter.perms
        if ev.op == "erase":
            return perms is None or perms.reads_anything(ev.model)
        if not self._needs_values(ev):
            return True
        stored = states.get(ev.key)
        values = stored.values if stored is not None else None
        if values is None:
            return False  # erased since: its erase event follows
        bound = self.filter.queries.get(ev.model)
        if bound is not None and not q.evaluate(bound, values, _no_lookup):
            return False
        return perms is None or perms.can_read(ev.model, values)

    async def _load_users(self, origins: set[str]) -> None:
        missing = [o for o in origins if o not in self._users]
        if not missing:
            return
        found = await self.storage.client_users(self.app_id, missing)
        for origin in missing:
            user = found.get(origin)
            self._users[origin] = None if user == ADMIN_USER else user


def _no_lookup(model: str, pk: Any) -> dict[str, Any] | None:
    """Filters see one object at a time: a link path reads as a missing object."""
    return None
