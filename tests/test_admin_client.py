"""tidesync.admin against a real server (SQLite, real HTTP): both clients, every call,
Python values both ways, model classes or names, transactions, errors, and the feed."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest

import tidesync as ts
from tidesync.admin import AdminAPIError, AdminClient, AsyncAdminClient
from tidesync.server.settings import load_config
from tidesync.testing import TestServer

from .api_helpers import ADMIN_KEY, write_config
from .rules_helpers import log_in


class Task(ts.Model):
    """The configuration's Task, as a backend declares it."""

    id: str = ts.primary_key()
    owner_id: str = ""
    summary: str = ""
    n: int = 0
    shared: bool = False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    root = tmp_path_factory.mktemp("admin-client")
    with TestServer(root / "server", config=load_config(write_config(root))) as srv:
        yield srv


@pytest.fixture
def admin(server: TestServer) -> Iterator[AdminClient]:
    with AdminClient(server.url, "todo", api_key=ADMIN_KEY, timeout=20) as client:
        yield client


THING = {
    "id": 1,
    "flag": True,
    "big": 2**60 + 1,
    "ratio": 0.5,
    "name": None,
    "blob": b"\x00\x01\xff",
    "at": dt.datetime(2026, 12, 8, 3, 53, 15, 123456, tzinfo=dt.UTC),
    "price": Decimal("12.50"),
    "uid": uuid.UUID("5f0c9a2e-8d4b-4c1e-9a7f-1b2c3d4e5f60"),
    "oid": ts.ObjectId("65a1f0c2e4b0a1b2c3d4e5f6"),
    "hits": 3,
    "tags": ["b", "a"],
    "labels": {"x", "y"},
    "scores": {"k": 1.5},
    "task": None,
}


def test_python_values_go_in_and_come_back(admin: AdminClient) -> None:
    stored = admin.insert("Thing", THING)
    assert stored == THING
    assert admin.get("Thing", 1) == THING
    assert admin.get("Thing", 999) is None
    found = list(admin.query("Thing", "at == $0 AND price == $1", THING["at"], Decimal("12.5")))
    assert [t["id"] for t in found] == [1]


def test_model_classes_instances_and_operators(admin: AdminClient) -> None:
    admin.insert(Task, [Task(id=f"m-{i}", summary=f"task {i}", n=i) for i in range(5)])
    assert admin.update(Task, "m-1", {"n": 10, "summary": "changed"})["n"] == 10
    assert admin.update("Thing", 1, {"hits": {"$inc": 4}})["hits"] == 7
    tasks = list(admin.query(Task, "id BEGINSWITH 'm-'", sort="n", desc=True, page_size=2))
    assert [t["id"] for t in tasks] == ["m-1", "m-4", "m-3", "m-2", "m-0"]
    assert len(list(admin.query(Task, "id BEGINSWITH 'm-'", limit=3, page_size=2))) == 3
    admin.delete(Task, "m-0")
    assert admin.get(Task, "m-0") is None
    with pytest.raises(AdminAPIError) as caught:
        admin.delete(Task, "m-0")
    assert caught.value.status == 404 and caught.value.code == "not_found"


def test_a_transaction_is_one_commit_or_nothing(admin: AdminClient) -> None:
    with admin.transaction() as tx:
        tx.insert(Task, Task(id="tx-1", summary="one"))
        tx.insert("Task", {"id": "tx-2", "owner_id": "", "summary": "two", "n": 0, "shared": False})
        tx.update(Task, "tx-1", {"n": 5})
    assert admin.get(Task, "tx-1")["n"] == 5  # type: ignore[index]
    with pytest.raises(AdminAPIError) as caught, admin.transaction() as tx:
        tx.insert(Task, Task(id="tx-3"))
        tx.update(Task, "tx-2", {"n": "not a number"})
    assert caught.value.status == 400 and "Task.n" in caught.value.message
    assert admin.get(Task, "tx-3") is None  # nothing of the failed transaction
    with pytest.raises(RuntimeError), admin.transaction() as tx:
        tx.insert(Task, Task(id="tx-4"))
        raise RuntimeError("the block failed")
    assert admin.get(Task, "tx-4") is None  # an exception in the block sends nothing


def test_errors_name_the_problem(server: TestServer, admin: AdminClient) -> None:
    with pytest.raises(AdminAPIError) as caught:
        admin.insert("Task", {"id": "half"})  # a dict has no model defaults
    assert caught.value.status == 400 and "Task.owner_id" in caught.value.message
    with pytest.raises(AdminAPIError) as caught:
        admin.insert("Nope", {"id": 1})
    assert caught.value.status == 404 and "Nope" in str(caught.value)
    with pytest.raises(AdminAPIError) as caught:
        list(admin.query(Task, "summary ==="))
    assert caught.value.status == 400 and caught.value.code
    with AdminClient(server.url, "todo", api_key="wrong-key-0123456789") as wrong:
        with pytest.raises(AdminAPIError) as caught:
            wrong.models()
        assert caught.value.status == 401
    with AdminClient("http://127.0.0.1:9", "todo", api_key=ADMIN_KEY, timeout=2) as gone:
        with pytest.raises(AdminAPIError) as caught:
            gone.models()
        assert caught.value.code == "unreachable"
    with pytest.raises(ValueError, match="exactly one"):
        AdminClient(server.url, "todo")
    with pytest.raises(TypeError, match=r"tidesync\.Model"):
        admin.get(42, 1)  # type: ignore[arg-type]


def test_a_user_token_is_held_to_the_rules(server: TestServer, admin: AdminClient) -> None:
    user_id, token = asyncio.run(log_in(server.url, "todo"))
    admin.insert(Task, Task(id="theirs", owner_id="someone-else"))
    with AdminClient(server.url, "todo", access_token=token) as mine:
        mine.insert(Task, Task(id="mine", owner_id=user_id))
        assert mine.get(Task, "theirs") is None  # the read rule hides it
        with pytest.raises(AdminAPIError) as caught:
            mine.insert(Task, Task(id="forged", owner_id="someone-else"))
    assert caught.value.status == 403 and caught.value.refused
    assert admin.get(Task, "forged") is None


async def test_the_async_client_does_the_same(server: TestServer) -> None:
    async with AsyncAdminClient(server.url, "todo", api_key=ADMIN_KEY, timeout=20) as admin:
        await admin.insert(Task, [Task(id=f"a-{i}", n=i) for i in range(3)])
        assert (await admin.update(Task, "a-1", {"n": 9}))["n"] == 9
        got = [t["id"] async for t in admin.query(Task, "id BEGINSWITH 'a-'", sort="n")]
        assert got == ["a-0", "a-2", "a-1"]
        async with admin.transaction() as tx:
            tx.delete(Task, "a-0")
        assert await admin.get(Task, "a-0") is None
        models = {m["name"] for m in await admin.models()}
        assert {"Task", "Thing"} <= models


def test_the_feed_resumes_from_any_event_without_skipping_the_rest(admin: AdminClient) -> None:
    with admin.transaction() as tx:  # one changeset, three events of one version
        for i in (1, 2, 3):
            tx.insert(Task, Task(id=f"feed-{i}"))
    admin.insert(Task, Task(id="feed-4"))

    def mine(since: object) -> list[object]:
        events = admin.changes(since=since, follow=False)
        return [e.pk for e in events if str(e.pk).startswith("feed-")]

    events = [e for e in admin.changes(follow=False) if str(e.pk).startswith("feed-")]
    assert [e.pk for e in events] == ["feed-1", "feed-2", "feed-3", "feed-4"]
    assert len({e.version for e in events[:3]}) == 1 and events[3].version > events[0].version
    # From an event inside a changeset, the whole changeset comes again (at least once)...
    assert mine(events[0].cursor) == ["feed-1", "feed-2", "feed-3", "feed-4"]
    assert mine(events[1].cursor) == ["feed-1", "feed-2", "feed-3", "feed-4"]
    # ... from its last event, only what follows.
    assert mine(events[2].cursor) == ["feed-4"]
    assert mine(events[3].cursor) == []
