"""A rule check and its commit are one step across server processes (PostgreSQL).

Two ``tidesync serve --config`` processes share one PostgreSQL schema under the rule
``write = "owner_id == $user.id OR owner_id == ''"``: free slots (owner ``''``) may be
claimed once. User A, connected to process 1, and user B, connected to process 2 (raw
protocol clients, :class:`~tests.rules_helpers.Hostile`), claim the same slots at the same
moment, slot after slot. Every slot must end with exactly one accepted claim, owned by its
claimant with its claimant's title, the other claim refused with ERROR 231
(docs/flexible-sync.md, "The check and the commit are one step"). Skipped unless
``TIDESYNC_TEST_PG_DSN`` names a PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tidesync.protocol.messages import refused_of
from tidesync.testing import ServerProcess

from .rules_helpers import Hostile, now_ms, rules_config, stored_log
from .test_flexsync_e2e import Task

asyncpg = pytest.importorskip("asyncpg")

from tidesync.server.storage.postgres import PostgresStorage  # noqa: E402

DSN = os.environ.get("TIDESYNC_TEST_PG_DSN", "")
pytestmark = pytest.mark.skipif(not DSN, reason="TIDESYNC_TEST_PG_DSN is not set")
SLOT_RULES = """
[apps.todo.rules.Task]
read = true
write = "owner_id == $user.id OR owner_id == ''"
"""
#: Slots claimed by both users, in rounds of ``PER_ROUND`` (one upload per claim).
TRIALS, PER_ROUND = 200, 10
SCHEMA = [Task.__schema__.to_dict()]


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A storage URL with a PostgreSQL schema of its own, dropped after the test."""
    schema = "ts_slots_" + uuid.uuid4().hex[:12]
    yield f"{DSN}?schema={schema}"
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def servers(tmp_path: Path, pg_url: str) -> Iterator[list[ServerProcess]]:
    """Two rules server processes on one database (one data folder for secret and users)."""
    config = rules_config(tmp_path, SLOT_RULES)
    args = ["--storage", pg_url, "--config", str(config)]
    made = [ServerProcess(tmp_path / "server", extra_args=args) for _ in range(2)]
    try:
        for proc in made:  # one at a time: the first creates the secret
            proc.start()
        yield made
    finally:
        for proc in made:
            proc.kill()


def _slot(i: int) -> str:
    return f"slot-{i:03d}"


async def test_two_processes_never_both_accept_a_claim_of_one_slot(
    servers: list[ServerProcess], pg_url: str
) -> None:
    one, two = servers
    clients: list[Hostile] = []
    try:
        seeder = await Hostile.connect(one.url, "todo", "seeder", SCHEMA)
        clients.append(seeder)
        wall = now_ms()
        values = {"owner_id": "", "summary": "", "n": 0, "shared": False}
        free = [
            seeder.create("Task", _slot(i), {"id": _slot(i), **values}, wall) for i in range(TRIALS)
        ]
        await seeder.wait_acked(await seeder.send(free), quiet=0)
        await seeder.close()
        a = await Hostile.connect(one.url, "todo", "claimant-a", SCHEMA)
        b = await Hostile.connect(two.url, "todo", "claimant-b", SCHEMA)
        clients += [a, b]
        for d in (a, b):
            await d.caught_up()  # both processes hold every free slot

        async def claim(d: Hostile, slots: range) -> None:
            wall = now_ms()
            last = 0
            for i in slots:  # one upload each: each claim is checked and committed alone
                last = await d.send(
                    [
                        d.set("Task", _slot(i), "owner_id", d.user_id, wall),
                        d.set("Task", _slot(i), "summary", f"claimed by {d.ident}", wall),
                    ]
                )
            await d.wait_acked(last, quiet=0)

        for start in range(0, TRIALS, PER_ROUND):
            slots = range(start, start + PER_ROUND)
            await asyncio.gather(claim(a, slots), claim(b, slots))
        for d in (a, b):
            await d.drain(0.5)  # the last ERROR 231
    finally:
        for d in clients:
            await d.close()

    storage = PostgresStorage.from_url(pg_url)
    async with storage:
        log = await stored_log(storage, "todo")
        objects = await storage.get_objects("todo", "Task")
    claims: dict[str, set[str]] = {_slot(i): set() for i in range(TRIALS)}
    for origin, ins in log:
        if ins.field == "owner_id":
            claims[ins.pk].add(origin)
    doubly = sorted(pk for pk, who in claims.items() if len(who) > 1)
    assert doubly == [], f"{len(doubly)} of {TRIALS} slots accepted both claims"
    owner_of = {a.user_id: a.ident, b.user_id: b.ident}
    for i in range(TRIALS):
        (winner,) = claims[_slot(i)]
        obj = objects[_slot(i)]
        assert owner_of[obj["owner_id"]] == winner
        assert obj["summary"] == f"claimed by {winner}"
    refused = {
        d.ident: {pk for message in d.refusals for _, pk, _ in refused_of(message)} for d in (a, b)
    }
    for i in range(TRIALS):  # the loser of each slot was told
        (winner,) = claims[_slot(i)]
        loser = b.ident if winner == a.ident else a.ident
        assert _slot(i) in refused[loser] and _slot(i) not in refused[winner]
