"""One synced file opened twice in one process: both ``Database`` objects share one session.

A real ``tidesync serve`` process, real SQLite files and WebSockets: the two databases see
each other's writes (and their notifications), both wait for upload and download, closing
one leaves the other syncing, closing both ends the session; a different configuration
fails with an error naming the file and what differs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.testing import ServerProcess

from .flex_helpers import FAST, T, eventually


class Card(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


class Extra(ts.Model):
    id: str = ts.primary_key()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.kill()


def make_app(root: Path, name: str, url: str) -> ts.App:
    return ts.App(
        ts.AppConfiguration("cards", base_url=url, base_path=root / name, sync_timeouts=FAST)
    )


def config(user: ts.User, path: Path, errors: list[Exception] | None = None, **kw: Any) -> Any:
    handler = None if errors is None else (lambda s, e: errors.append(e))
    return ts.Configuration.flexible_sync(
        user, kw.pop("models", [Card]), path, sync_error_handler=handler, **kw
    )


async def subscribed(cfg: Any) -> ts.Database:
    db = await ts.Database.open(cfg)
    with db.subscriptions.update() as subs:
        subs.add(db.all(Card), name="all", update=True)
    await db.subscriptions.wait_for_synchronization(T(20))
    return db


def texts(db: ts.Database) -> dict[str, str]:
    return {c.id: c.text for c in db.all(Card)}


async def test_two_databases_on_one_file_share_one_session(
    tmp_path: Path, server: ServerProcess
) -> None:
    app, other_app = make_app(tmp_path, "a", server.url), make_app(tmp_path, "b", server.url)
    try:
        user = await app.log_in(ts.Credentials.anonymous())
        path = tmp_path / "shared.tidesync"
        errors: list[Exception] = []
        one = await subscribed(config(user, path, errors))
        two = await ts.Database.open(
            config(user, path, errors)
        )  # failed before: LocalProtocolError
        assert one.sync_session is two.sync_session
        other = await subscribed(
            config(await other_app.log_in(ts.Credentials.anonymous()), tmp_path / "o")
        )

        seen_by_one: list[Any] = []
        seen_by_two: list[Any] = []
        tokens = [
            one.all(Card).add_listener(seen_by_one.append),
            two.all(Card).add_listener(seen_by_two.append),
        ]
        with one.write():
            one.add(Card(id="c1", text="from one"))
        await eventually(lambda: any(0 in ch.inserted for ch in seen_by_two))  # c1
        with two.write():
            two.add(Card(id="c2", text="from two"))
        await eventually(lambda: any(1 in ch.inserted for ch in seen_by_one))  # c2
        assert texts(one) == texts(two) == {"c1": "from one", "c2": "from two"}
        for token in tokens:
            token.cancel()
        await one.sync_session.wait_for_upload(T(20))
        await two.sync_session.wait_for_upload(T(20))
        await other.sync_session.wait_for_download(T(20))
        assert texts(other) == {"c1": "from one", "c2": "from two"}

        with other.write():
            other.find(Card, "c1").text = "from the other device"  # type: ignore[union-attr]
        await other.sync_session.wait_for_upload(T(20))
        await one.sync_session.wait_for_download(T(20))
        await two.sync_session.wait_for_download(T(20))
        assert one.find(Card, "c1").text == two.find(Card, "c1").text == "from the other device"  # type: ignore[union-attr]

        session = one.sync_session
        one.close()  # two keeps the session going
        with pytest.raises(ts.DatabaseClosedError):
            _ = one.sync_session
        assert two.sync_session is session and session.state is ts.SessionState.ACTIVE
        with two.write():
            two.add(Card(id="c3", text="after one closed"))
        await two.sync_session.wait_for_upload(T(20))
        with other.write():
            other.add(Card(id="c4", text="to two alone"))
        await other.sync_session.wait_for_upload(T(20))
        await two.sync_session.wait_for_download(T(20))
        assert texts(two)["c4"] == "to two alone"
        await other.sync_session.wait_for_download(T(20))
        assert texts(other)["c3"] == "after one closed"

        two.close()  # the last one: the session ends
        with pytest.raises(ts.DatabaseClosedError):
            _ = session.state
        three = await ts.Database.open(config(user, path, errors))  # a new session starts
        assert three.sync_session is not session
        with three.write():
            three.add(Card(id="c5", text="new session"))
        await three.sync_session.wait_for_upload(T(20))
        await three.sync_session.wait_for_download(T(20))
        assert set(texts(three)) == {"c1", "c2", "c3", "c4", "c5"}
        three.close()
        other.close()
        assert errors == []
    finally:
        app.close()
        other_app.close()


async def test_a_different_configuration_is_refused_by_name(
    tmp_path: Path, server: ServerProcess
) -> None:
    app, other_app = make_app(tmp_path, "a", server.url), make_app(tmp_path, "b", server.url)
    try:
        user = await app.log_in(ts.Credentials.anonymous())
        second_user = await app.log_in(ts.Credentials.anonymous())
        stranger = await other_app.log_in(ts.Credentials.anonymous())
        path = tmp_path / "shared.tidesync"
        first = await subscribed(config(user, path))
        cases = [
            (config(second_user, path), f"as user {user.id}, not {second_user.id}"),
            (config(user, path, models=[Card, Extra]), "Extra not among the open one's models"),
            (config(stranger, path), "through another App"),
            (
                config(user, path, client_reset=ts.DiscardUnsyncedChanges()),
                "client reset mode is RecoverUnsyncedChanges, not DiscardUnsyncedChanges",
            ),
        ]
        for cfg, what in cases:
            with pytest.raises(ts.MismatchedConfigurationError) as caught:
                ts.Database(cfg)
            assert str(path.resolve()) in str(caught.value) and what in str(caught.value)
        with first.write():  # the first one is untouched by the refused opens
            first.add(Card(id="k", text="still syncing"))
        await first.sync_session.wait_for_upload(T(20))
        assert first.sync_session.state is ts.SessionState.ACTIVE
        first.close()
    finally:
        app.close()
        other_app.close()


async def test_opens_from_two_threads_at_once_share_one_session(
    tmp_path: Path, server: ServerProcess
) -> None:
    app = make_app(tmp_path, "a", server.url)
    try:
        user = await app.log_in(ts.Credentials.anonymous())
        path = tmp_path / "shared.tidesync"
        for run in range(5):
            barrier = threading.Barrier(2)

            def open_one(barrier: threading.Barrier = barrier) -> ts.Database:
                barrier.wait()
                return ts.Database(config(user, path))

            one, two = await asyncio.gather(
                asyncio.to_thread(open_one), asyncio.to_thread(open_one)
            )
            assert one.sync_session is two.sync_session
            with one.write():
                one.add(Card(id=f"t{run}", text="x"))
            await two.sync_session.wait_for_upload(T(20))
            one.close()
            two.close()
    finally:
        app.close()


async def test_a_joining_database_sends_its_initial_subscriptions(
    tmp_path: Path, server: ServerProcess
) -> None:
    app, other_app = make_app(tmp_path, "a", server.url), make_app(tmp_path, "b", server.url)
    try:
        writer = await subscribed(
            config(await other_app.log_in(ts.Credentials.anonymous()), tmp_path / "w.tidesync")
        )
        with writer.write():
            writer.add(Card(id="w1", text="on the server"))
        await writer.sync_session.wait_for_upload(T(20))
        user = await app.log_in(ts.Credentials.anonymous())
        path = tmp_path / "shared.tidesync"
        first = ts.Database(config(user, path))  # no subscription set yet
        await first.sync_session.wait_for_download(T(20))  # bound and caught up

        def subscribe(db: ts.Database) -> None:
            with db.subscriptions.update() as subs:
                subs.add(db.all(Card), name="all")

        second = await ts.Database.open(
            config(user, path, initial_subscriptions=subscribe), cancellation_token=T(20)
        )
        assert second.subscriptions.state is ts.SubscriptionSetState.COMPLETE
        assert texts(first) == texts(second) == {"w1": "on the server"}
        second.close()
        first.close()
        writer.close()
    finally:
        app.close()
        other_app.close()


async def test_every_sharing_database_is_told_of_a_session_error(
    tmp_path: Path, server: ServerProcess
) -> None:
    app = make_app(tmp_path, "a", server.url)
    try:
        user = await app.log_in(ts.Credentials.anonymous())
        known = await subscribed(config(user, tmp_path / "known.tidesync"))  # Card.text: str
        known.close()

        class Card(ts.Model):  # the server refuses this one: text changed type
            id: str = ts.primary_key()
            text: int = 0

        path = tmp_path / "shared.tidesync"
        first: list[Exception] = []
        second: list[Exception] = []
        one = ts.Database(config(user, path, first, models=[Card]))
        two = ts.Database(config(user, path, second, models=[Card]))
        assert one.sync_session is two.sync_session
        await eventually(lambda: bool(first))  # maybe before two joined: told to one alone
        first.clear()
        second.clear()
        one.sync_session.resume()  # bind again (if the error stopped the session): refused
        await eventually(lambda: bool(first) and bool(second))
        for error in (first[0], second[0]):
            assert isinstance(error, ts.SyncError) and "changed type" in str(error)
        one.close()
        two.close()
    finally:
        app.close()
