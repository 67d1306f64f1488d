"""Reconciling a flexible-sync upload: objects the device created from nothing are not sent
back to it (it holds them byte for byte), yet every device still converges when another
device writes to such an object before the reconciliation (server/flexsync.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.server import flexsync
from tidesync.testing import TestServer

from .flex_helpers import FlexDevice, eventually

T = ts.TimeoutCancellationToken


class Item(ts.Model):
    id: str = ts.primary_key()
    label: str = ""
    n: int = 0


class Bag(ts.Model):  # collection fields (the general path under narrower subscriptions)
    id: str = ts.primary_key()
    tags: list[str] = ts.field(default_factory=list)


class Device(FlexDevice):
    def __init__(self, root: Path, name: str, url: str) -> None:
        super().__init__(root, name, url, "rec", [Item, Bag])

    async def open(self, query: str = "TRUEPREDICATE") -> ts.Database:  # type: ignore[override]
        return await super().open({"items": (Item, query), "bags": (Bag, "TRUEPREDICATE")})

    def items(self) -> dict[str, tuple[str, int]]:
        return self.read(Item, lambda i: (i.label, i.n))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestServer]:
    with TestServer(tmp_path / "server") as s:
        yield s


@pytest.fixture
async def devices(tmp_path: Path, server: TestServer) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(name: str, query: str = "TRUEPREDICATE") -> Device:
        d = Device(tmp_path, name, server.url)
        await d.open(query)
        made.append(d)
        return d

    yield make
    for d in made:
        d.shutdown()


@pytest.mark.parametrize("confirmed", [True, False], ids=["storage-confirmed", "read-back"])
async def test_created_objects_are_not_sent_back(
    devices: Any, confirmed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not confirmed:  # the fallback: the reconcile reads the states and checks them
        monkeypatch.setattr(flexsync, "note_committed", lambda *args: None)
    a, b = await devices("a"), await devices("b")
    assert a.db is not None and b.db is not None
    with a.db.write():
        for i in range(200):
            a.db.add(Item(id=f"i{i}", label="a", n=i))
        a.db.add(Bag(id="bag", tags=["x"]))
    await a.settle()
    await eventually(lambda: len(b.items()) == 200)
    assert a.objects == []  # nothing was sent back
    # A holds them on the server's books too: B's later change reaches A as an instruction
    b.objects.clear()
    with b.db.write():
        b.db.add(Item(id="i7", label="b", n=7), update=True)
    await b.settle()
    await eventually(lambda: a.items().get("i7") == ("b", 7))
    await a.settle()
    assert a.items() == b.items()
    assert not a.errors and not b.errors


async def test_created_objects_outside_the_subscription_are_refused(devices: Any) -> None:
    a = await devices("a", "n < 10")
    assert a.db is not None
    with a.db.write():
        a.db.add(Item(id="in", n=1))
        a.db.add(Item(id="out", n=50))
    await a.settle()
    await eventually(lambda: bool(a.errors))
    assert isinstance(a.errors[0], ts.CompensatingWriteError)
    await eventually(lambda: set(a.items()) == {"in"})
    assert ("Item", "out", True) in a.objects  # the refused object is dropped from A
    assert ("Item", "in", False) not in a.objects  # the allowed one is not sent back


async def test_a_write_before_the_reconciliation_still_converges(
    devices: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B changes A's new object after A's commit but before A's upload is reconciled: the
    stored state is no longer what A's CREATE alone gives, so A gets it whole."""
    a, b = await devices("a"), await devices("b")
    assert a.db is not None and b.db is not None
    release = threading.Event()
    original = flexsync._reconcile_uploads
    held_back = threading.Event()

    async def slow(conn: Any, view: Any, acked: int) -> Any:
        if any(u.created for u in view.uploads if u.version <= acked) and not release.is_set():
            held_back.set()
            for _ in range(400):  # bounded: at most 20 s
                if release.is_set():
                    break
                await asyncio.sleep(0.05)
        return await original(conn, view, acked)

    monkeypatch.setattr(flexsync, "_reconcile_uploads", slow)
    with a.db.write():
        a.db.add(Item(id="x", label="a", n=1))
    await eventually(held_back.is_set)
    await eventually(lambda: "x" in b.items())
    with b.db.write():
        b.db.add(Item(id="x", label="b", n=2), update=True)
    await b.db.sync_session.wait_for_upload(T(20))
    release.set()
    await eventually(lambda: a.items().get("x") == ("b", 2))
    await a.settle()
    await b.settle()
    assert a.items() == b.items() == {"x": ("b", 2)}
    assert not a.errors and not b.errors


async def test_new_and_updated_objects_reach_other_devices_without_reading_them(
    devices: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects made by one CREATE alone are sent whole from the CREATE itself, and updates
    of held objects of an always-true subscription are forwarded as they are: the
    filter reads no stored state for either (``flexsync._known_states``)."""
    from tidesync.core.packing import pack
    from tidesync.server.storage.sqlite import SQLiteStorage

    read: list[Any] = []
    original = SQLiteStorage.get_states

    async def spy(self: SQLiteStorage, app_id: str, keys: Any) -> Any:
        keys = list(keys)
        read.extend(keys)
        return await original(self, app_id, keys)

    monkeypatch.setattr(SQLiteStorage, "get_states", spy)
    a, b = await devices("a"), await devices("b")
    assert a.db is not None and b.db is not None
    with a.db.write():
        for i in range(30):
            a.db.add(Item(id=f"k{i}", label="new", n=i))
    await a.settle()
    await eventually(lambda: len(b.items()) == 30)
    with a.db.write():
        a.db.add(Item(id="k1", label="changed", n=1), update=True)
    await a.settle()
    await eventually(lambda: b.items().get("k1") == ("changed", 1))
    plain = {("Item", pack(f"k{i}")) for i in range(30)}
    assert not plain & set(read)
    # an erase, and a create with more than itself, take the general path (read)
    with a.db.write():
        a.db.delete(a.db.find(Item, "k2"))
        a.db.add(Item(id="fresh", label="x", n=5))
        a.db.add(Item(id="fresh", label="y", n=6), update=True)
    await a.settle()
    await eventually(lambda: "k2" not in b.items() and b.items().get("fresh") == ("y", 6))
    assert ("Item", pack("k2")) in read
    await b.settle()
    assert a.items() == b.items()
    assert not a.errors and not b.errors


async def test_notifications_of_whole_objects_and_evictions_match_full_reruns(
    devices: Any,
) -> None:
    """A DOWNLOAD that writes whole objects and evictions records every row it writes, so
    a listener may patch its results; what it reports equals a full re-run's report."""
    import random

    from tidesync.store import notify

    a, b = await devices("a"), await devices("b", "n >= 10")
    assert a.db is not None and b.db is not None
    got: dict[bool, list[Any]] = {True: [], False: []}
    tokens = []
    for patch in (True, False):
        res = b.db.all(Item)
        token = res.add_listener(
            lambda c, p=patch: got[p].append((c.inserted, c.deleted, c.modified))
        )
        listener = token._listener
        assert isinstance(listener, notify.ResultsListener)
        if not patch:
            listener._patchable = False
        tokens.append(token)
    rnd = random.Random(5)
    for step in range(25):
        with a.db.write():
            for _ in range(rnd.randint(1, 3)):
                pk = f"r{rnd.randint(0, 11)}"
                obj = a.db.find(Item, pk)
                if obj is not None and rnd.random() < 0.25:
                    a.db.delete(obj)
                else:  # create, or move in or out of B's view (n >= 10)
                    a.db.add(Item(id=pk, label=f"s{step}", n=rnd.randint(0, 20)), update=True)
        await a.settle()
    await b.settle()
    await eventually(lambda: b.items() == {k: v for k, v in a.items().items() if v[1] >= 10})
    await asyncio.sleep(0.3)  # the last notifications
    for token in tokens:
        token.cancel()
    assert got[True] and got[True] == got[False]
