"""Writes while a subscription set is in flight (issue 18, item 4), against a real server.

Each test is a loop of many runs: every run opens a fresh device file, changes its
subscription set and, at once, writes an object the new set matches, so the write's
upload is checked, committed and acknowledged while the server scans its bootstrap. The
device must never evict an object its current subscriptions match; once the set is
synchronized and the download caught up it holds exactly what the server would bootstrap
for it, also after reopening. ``TIDESYNC_INFLIGHT_RUNS`` sets the runs of the default
tests (40 each); the ``soak`` variants run ten times as many.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.protocol.messages import BOOTSTRAP_LAST, BOOTSTRAP_PAGE
from tidesync.server.config import ServerConfig
from tidesync.testing import TestServer

from .flex_helpers import FAST

T = ts.TimeoutCancellationToken
S = ts.SubscriptionSetState

RUNS = int(os.environ.get("TIDESYNC_INFLIGHT_RUNS", "24"))
#: Runs of each of the replace and remove loops (they share the fix with the add loop).
CHANGE_RUNS = max(1, RUNS // 2)
#: Objects no test subscription matches (only ``db.all``): they make each bootstrap's scan
#: long enough for the upload to be integrated while it runs.
SEED = 3000


class Note(ts.Model):
    id: str = ts.primary_key()
    tag: str = ""
    body: str = ""


@dataclass
class World:
    """The server, one user's app, and a reference device subscribed to every Note."""

    root: Path
    app: ts.App
    user: ts.User
    reference: ts.Database
    errors: list[Exception] = field(default_factory=list)

    def open(self, name: str) -> ts.Database:
        config = ts.Configuration.flexible_sync(
            self.user,
            [Note],
            self.root / f"{name}.tidesync",
            sync_error_handler=lambda s, e: self.errors.append(e),
        )
        return ts.Database(config)

    async def server_notes(self) -> dict[str, str]:
        """``{id: tag}`` of every Note on the server (the reference device, caught up)."""
        await self.reference.sync_session.wait_for_download(T(20))
        return {n.id: n.tag for n in self.reference.all(Note)}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestServer]:
    with TestServer(tmp_path / "server") as srv:
        yield srv


@pytest.fixture
async def world(tmp_path: Path, server: TestServer) -> AsyncIterator[World]:
    app = ts.App(
        ts.AppConfiguration(
            "notes", base_url=server.url, base_path=tmp_path / "app", sync_timeouts=FAST
        )
    )
    user = await app.log_in(ts.Credentials.anonymous())
    reference = ts.Database(ts.Configuration.flexible_sync(user, [Note], tmp_path / "ref.ts"))
    w = World(tmp_path, app, user, reference)
    try:
        with reference.subscriptions.update() as subs:
            subs.add(reference.all(Note))
        with reference.write():
            for i in range(SEED):
                reference.add(Note(id=f"z{i:05d}", tag="z", body="x" * 50))
        await reference.sync_session.wait_for_upload(T(60))
        await reference.subscriptions.wait_for_synchronization(T(60))
        yield w
    finally:
        reference.close()
        app.close()


DELAY_MS = [int(x) for x in os.environ.get("DELAYS", "0,2,5,10").split(",")]

#: What went wrong, by run.
Problems = dict[int, list[str]]


def _verdict(problems: Problems, runs: int) -> None:
    assert not problems, f"{len(problems)} of {runs} runs failed: {problems}"


def _delay(run: int) -> float:
    """The pause between committing the set and the write: none, or a few milliseconds, so
    that the runs land the write's commit at different points of the bootstrap's scan."""
    return DELAY_MS[run % len(DELAY_MS)] / 1000


def _deletions(results: ts.Results[Note]) -> tuple[list[int], ts.NotificationToken]:
    """A listener on ``results`` noting how many objects each commit deleted from them."""
    deletes: list[int] = []
    token = results.add_listener(lambda change: deletes.append(len(change.deleted)))
    return deletes, token


def _ids(db: ts.Database) -> dict[str, str]:
    return {n.id: n.tag for n in db.all(Note)}


async def _settle(db: ts.Database) -> None:
    await db.sync_session.wait_for_upload(T(20))
    await db.subscriptions.wait_for_synchronization(T(20))
    await db.sync_session.wait_for_download(T(20))


async def _check(
    w: World, db: ts.Database, name: str, want: dict[str, str], run: int, problems: Problems
) -> None:
    """The device holds ``want``, also after reopening."""
    got = _ids(db)
    if got != want:
        problems.setdefault(run, []).append(_diff("", got, want))
    db.close()
    again = w.open(name)
    try:
        await again.sync_session.wait_for_download(T(20))
        got = _ids(again)
        if got != want:
            problems.setdefault(run, []).append(_diff("after reopening: ", got, want))
    finally:
        again.close()


def _diff(label: str, got: dict[str, str], want: dict[str, str]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    return f"{label}missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"


async def _added(w: World, runs: int) -> Problems:
    """A connected device adds ``db.all(Note)`` to its set, then at once writes a Note."""
    problems: Problems = {}
    for run in range(runs):
        name = f"add{run}"
        db = w.open(name)
        mine = f"a{run:04d}"
        deletes, token = _deletions(db.query(Note, "id == $0", mine))
        if run % 2:  # a flexible session with a narrower set
            with db.subscriptions.update() as subs:
                subs.add(db.query(Note, "tag == $0", "a"), name="a")
            await _settle(db)
        else:  # a session that never had a set (it receives everything), now flexible
            await db.sync_session.wait_for_download(T(20))
        with db.subscriptions.update() as subs:
            subs.add(db.all(Note))
        await asyncio.sleep(_delay(run))
        with db.write():
            db.add(Note(id=mine, tag="a"))
        await _settle(db)
        token.cancel()
        if any(deletes):
            problems.setdefault(run, []).append("its own listener saw the Note deleted")
        await _check(w, db, name, await w.server_notes(), run, problems)
    return problems


async def _changed(w: World, runs: int, how: str) -> Problems:
    """A device subscribed to tags ``p`` and ``q`` replaces (or removes) the ``p``
    subscription by one of tag ``n`` and at once writes a Note of each tag: the ``n`` and
    ``q`` Notes must stay; the ``p`` one, which the new set does not match, may go (the
    server refuses it when it checks the write against the new set)."""
    problems: Problems = {}
    for run in range(runs):
        name = f"{how}{run}"
        db = w.open(name)
        with db.subscriptions.update() as subs:
            subs.add(db.query(Note, "tag == $0", "p"), name="p")
            subs.add(db.query(Note, "tag == $0", "q"), name="q")
        await _settle(db)
        # of objects the new set matches as well as the old
        deletes, token = _deletions(db.query(Note, "tag != $0", "p"))
        with db.subscriptions.update() as subs:
            if how == "replace":
                subs.add(db.query(Note, "tag == $0", "n"), name="p", update=True)
            else:
                subs.remove_by_name("p")
                subs.add(db.query(Note, "tag == $0", "n"), name="n")
        await asyncio.sleep(_delay(run))
        with db.write():
            for tag in "npq":
                db.add(Note(id=f"{tag}{run:04d}", tag=tag))
        await _settle(db)
        token.cancel()
        if any(deletes):
            problems.setdefault(run, []).append("a Note the new set matches was deleted")
        server = await w.server_notes()
        for tag in "nq":
            if f"{tag}{run:04d}" not in server:
                problems.setdefault(run, []).append(f"the {tag} Note did not reach the server")
        want = {pk: tag for pk, tag in server.items() if tag in "nq"}
        await _check(w, db, name, want, run, problems)
    return problems


async def test_a_write_while_a_subscription_is_added_stays(world: World) -> None:
    _verdict(await _added(world, RUNS), RUNS)
    assert not world.errors


async def test_a_write_while_a_subscription_is_replaced_stays(world: World) -> None:
    _verdict(await _changed(world, CHANGE_RUNS, "replace"), CHANGE_RUNS)
    assert all(isinstance(e, ts.CompensatingWriteError) for e in world.errors), world.errors


async def test_a_write_while_a_subscription_is_removed_stays(world: World) -> None:
    _verdict(await _changed(world, CHANGE_RUNS, "remove"), CHANGE_RUNS)
    assert all(isinstance(e, ts.CompensatingWriteError) for e in world.errors), world.errors


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("how", ["add", "replace", "remove"])
async def test_soak_writes_while_subscriptions_change(world: World, how: str) -> None:
    runs = RUNS * 10
    problems = await (_added(world, runs) if how == "add" else _changed(world, runs, how))
    _verdict(problems, runs)


# -- a bootstrap cut short by a newer set -----------------------------------------------------


async def test_a_bootstrap_replaced_midway_leaves_only_the_new_sets_objects(
    tmp_path: Path,
) -> None:
    """``db.all(Note)`` is committed and, once its first bootstrap pages arrived (small
    pages, a scan of many batches), replaced by a narrow set: the server gives the first
    bootstrap up between two batches and bootstraps the new set. The device must end with
    the narrow set's objects only, not also those the abandoned bootstrap had sent."""
    config = ServerConfig(download_page_bytes=16 * 1024)
    with TestServer(tmp_path / "server", config=config) as server:
        app = ts.App(
            ts.AppConfiguration(
                "notes", base_url=server.url, base_path=tmp_path / "app", sync_timeouts=FAST
            )
        )
        try:
            user = await app.log_in(ts.Credentials.anonymous())
            config_w = ts.Configuration.flexible_sync(user, [Note], tmp_path / "writer.ts")
            with ts.Database(config_w) as writer:
                with writer.write():
                    for i in range(30_000):  # 15 scan batches
                        writer.add(Note(id=f"z{i:05d}", tag="z"))
                    for i in range(20):
                        writer.add(Note(id=f"a{i:05d}", tag="a"))
                await writer.sync_session.wait_for_upload(T(60))
            config_d = ts.Configuration.flexible_sync(user, [Note], tmp_path / "device.ts")
            with ts.Database(config_d) as db:
                with db.subscriptions.update() as subs:
                    subs.add(db.query(Note, "tag == $0", "a"), name="a")
                await _settle(db)
                pages: list[tuple[int, int]] = []
                worker = db.sync_session._worker
                original = worker.on_download

                def record(ev: Any) -> None:
                    if ev.bootstrap:
                        pages.append((ev.query_version, ev.bootstrap))
                    original(ev)

                worker.on_download = record  # type: ignore[method-assign]
                with db.subscriptions.update() as subs:
                    subs.add(db.all(Note), name="all")
                first = db.subscriptions.version
                deadline = asyncio.get_running_loop().time() + 20
                while db.subscriptions.state is not S.BOOTSTRAPPING:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.001)
                with db.subscriptions.update() as subs:
                    subs.remove_by_name("all")
                await _settle(db)
                assert db.subscriptions.state is S.COMPLETE
                # the first set's bootstrap was cut short: it never sent its last page
                assert (first, BOOTSTRAP_PAGE) in pages, pages
                assert (first, BOOTSTRAP_LAST) not in pages, pages
                assert {n.id for n in db.all(Note)} == {f"a{i:05d}" for i in range(20)}
        finally:
            app.close()
