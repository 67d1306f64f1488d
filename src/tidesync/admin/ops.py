"""Each admin call once, for both clients: a generator that yields the HTTP requests to
make (:class:`~.common.Call`) and is sent their answers; a query or a feed also yields its
results (``Item``). The blocking and the asyncio client only drive these generators."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..store.model import Model
from . import common as c
from .common import AdminAPIError, ChangeEvent, ModelRef, ObjectIn


@dataclass(frozen=True)
class Item:
    """A result of a query or a feed, as it arrives."""

    value: Any


#: A call: yields requests (or items), is sent each request's answer, returns its result.
Op = Generator["c.Call | Item", Any, Any]


class Schemas:
    """The app's schemas, fetched once per client."""

    def __init__(self) -> None:
        self.codec: c.Codec | None = None

    def get(self) -> Generator[c.Call, Any, c.Codec]:
        """The codec, asking the server the first time."""
        if self.codec is None:
            answer = yield c.models_call()
            self.codec = c.Codec(answer["models"])
        return self.codec


def schemas_of(schemas: Schemas) -> Op:
    """The codec of the app's schemas (asking the server the first time)."""
    return (yield from schemas.get())


def models(schemas: Schemas) -> Op:
    """The app's models as the server answers them."""
    answer = yield c.models_call()
    schemas.codec = c.Codec(answer["models"])
    return list(answer["models"])


def query(
    schemas: Schemas,
    model: ModelRef,
    text: str | None,
    args: Sequence[Any],
    sort: str | None,
    desc: bool,
    limit: int | None,
    page_size: int,
    raw: bool = False,
) -> Op:
    """Every matching object, page after page (at most ``limit``); ``raw``: in JSON form."""
    name = c.model_name(model)
    codec = yield from schemas.get()
    after: Any = None
    left = limit
    while left is None or left > 0:
        size = page_size if left is None else min(page_size, left)
        page = yield c.query_call(name, text, args, sort, desc, size, after)
        for obj in page["objects"]:
            yield Item(obj if raw else codec.decode(name, obj))
        if left is not None:
            left -= len(page["objects"])
        after = page.get("next")
        if after is None or not page["objects"]:
            return None
    return None


def get(schemas: Schemas, model: ModelRef, pk: Any) -> Op:
    """One object, or None."""
    name = c.model_name(model)
    codec = yield from schemas.get()
    try:
        obj = yield c.get_call(name, c.pk_segment(codec.schema(name), pk))
    except AdminAPIError as exc:
        if exc.status == 404 and exc.code == "not_found":
            return None
        raise
    return codec.decode(name, obj)


def insert(
    schemas: Schemas, model: ModelRef, obj: ObjectIn | Iterable[ObjectIn], raw: bool = False
) -> Op:
    """Create or upsert; the stored object(s). ``raw``: the objects are in JSON form
    already (sent as they are) and the answer stays in JSON form."""
    name = c.model_name(model)
    codec = yield from schemas.get()
    items, many = c.as_list(obj)
    if raw:
        body = [dict(o.to_dict() if isinstance(o, Model) else o) for o in items]
    else:
        body = [codec.encode(name, o) for o in items]
    answer = yield c.insert_call(name, body, many)
    stored = [o if raw else codec.decode(name, o) for o in c.objects_of(answer)]
    return stored if many else stored[0]


def update(schemas: Schemas, model: ModelRef, pk: Any, changes: Mapping[str, Any]) -> Op:
    """Set fields; the stored object."""
    name = c.model_name(model)
    codec = yield from schemas.get()
    segment = c.pk_segment(codec.schema(name), pk)
    answer = yield c.update_call(name, segment, codec.encode_fields(name, changes))
    return codec.decode(name, c.objects_of(answer)[0])


def delete(schemas: Schemas, model: ModelRef, pk: Any) -> Op:
    """Erase one object."""
    name = c.model_name(model)
    codec = yield from schemas.get()
    yield c.delete_call(name, c.pk_segment(codec.schema(name), pk))
    return None


def transaction(schemas: Schemas, tx: c.Transaction) -> Op:
    """Send a transaction's operations (nothing when it has none)."""
    if tx.operations:
        yield c.transaction_call(tx.operations)
    return None


def changes(
    since: Any,
    models: Sequence[str] | None,
    text: str | None,
    follow: bool,
    wait: float,
    limit: int | None,
) -> Op:
    """The feed's events from ``since``; ``follow``: keep long-polling for new ones.

    Each event's ``cursor`` resumes without losing anything: the last event of a changeset
    gets the cursor after it, the others the cursor before their changeset (a page holds
    whole changesets), so resuming there brings that changeset again rather than skipping
    the rest of it."""
    cursor = since
    while True:
        page = yield c.changes_call(cursor, models, text, wait if follow else 0.0, limit)
        events = page.get("events", [])
        end = page.get("next", cursor)
        before = cursor  # the cursor before the changeset being read
        for i, event in enumerate(events):
            last = i + 1 == len(events)
            if last or events[i + 1].get("version") != event.get("version"):
                before = end if last else str(event.get("version"))  # it ends a changeset
            yield Item(ChangeEvent.from_json(event, cursor=before))
        cursor = end
        if not events and not follow:
            return None
