"""A rule check and its commit are one step across server processes (PostgreSQL).

Two ``tidesync serve --config`` processes share one PostgreSQL schema under the rule
``write = "owner_id == $user.id OR owner_id == ''"``: free slots (owner ``''``) may be
claimed once. User A, connected to process 1, and user B, connected to process 2 (raw
protocol clients, :class:`~tests.rules_helpers.Hostile`), claim the same slots at the same
moment, slot after slot; then both create the same new objects, each as its own. Every
slot and new object must end with exactly one accepted claim, owned by its claimant with
its claimant's title, the other claim refused with ERROR 231 (docs/flexible-sync.md, "The
check and the commit are one step"). Skipped unless
``TIDESYNC_TEST_PG_DSN`` names a PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidesync.core.changeset import Instruction, Op
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
#: Slots claimed by both users, and new objects both create, in rounds of ``PER_ROUND``
#: (one upload per claim).
TRIALS, NEW, PER_ROUND = 200, 50, 10
SCHEMA = [Task.__schema__.to_dict()]
#: What one claim uploads: ``(claimant, primary key, wall time) -> instructions``.
Claim = Callable[[Hostile, str, int], list[Instruction]]


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


async def test_two_processes_never_both_accept_a_claim_of_one_slot(
    servers: list[ServerProcess], pg_url: str
) -> None:
    one, two = servers
    slots = [f"slot-{i:03d}" for i in range(TRIALS)]  # free: owner ''
    fresh = [f"new-{i:03d}" for i in range(NEW)]  # not created yet
    clients: list[Hostile] = []
    try:
        seeder = await Hostile.connect(one.url, "todo", "seeder", SCHEMA)
        clients.append(seeder)
        wall = now_ms()
        values = {"owner_id": "", "summary": "", "n": 0, "shared": False}
        free = [seeder.create("Task", pk, {"id": pk, **values}, wall) for pk in slots]
        await seeder.wait_acked(await seeder.send(free), quiet=0)
        await seeder.close()
        a = await Hostile.connect(one.url, "todo", "claimant-a", SCHEMA)
        b = await Hostile.connect(two.url, "todo", "claimant-b", SCHEMA)
        clients += [a, b]
        for d in (a, b):
            await d.caught_up()  # both processes hold every free slot

        def take(d: Hostile, pk: str, wall: int) -> list[Instruction]:
            return [
                d.set("Task", pk, "owner_id", d.user_id, wall),
                d.set("Task", pk, "summary", f"claimed by {d.ident}", wall),
            ]

        def make(d: Hostile, pk: str, wall: int) -> list[Instruction]:
            mine = {"owner_id": d.user_id, "summary": f"claimed by {d.ident}"}
            return [d.create("Task", pk, {"id": pk, **values, **mine}, wall)]

        async def claim(d: Hostile, pks: list[str], how: Claim) -> None:
            wall = now_ms()
            last = 0
            for pk in pks:  # one upload each: each claim is checked and committed alone
                last = await d.send(how(d, pk, wall))
            await d.wait_acked(last, quiet=0)

        rounds = [(slots[i : i + PER_ROUND], take) for i in range(0, TRIALS, PER_ROUND)]
        rounds += [(fresh[i : i + PER_ROUND], make) for i in range(0, NEW, PER_ROUND)]
        for pks, how in rounds:
            await asyncio.gather(claim(a, pks, how), claim(b, pks, how))
        for d in (a, b):
            await d.drain(0.5)  # the last ERROR 231
    finally:
        for d in clients:
            await d.close()

    storage = PostgresStorage.from_url(pg_url)
    async with storage:
        log = await stored_log(storage, "todo")
        objects = await storage.get_objects("todo", "Task")
    claims: dict[str, set[str]] = {pk: set() for pk in slots + fresh}
    for origin, ins in log:
        if ins.field == "owner_id" or (ins.op is Op.CREATE and origin != "seeder"):
            claims[ins.pk].add(origin)
    doubly = sorted(pk for pk in slots if len(claims[pk]) > 1)
    assert doubly == [], f"{len(doubly)} of {TRIALS} slots accepted both claims"
    doubly = sorted(pk for pk in fresh if len(claims[pk]) > 1)
    assert doubly == [], f"{len(doubly)} of {NEW} new objects accepted both creates"
    owner_of = {a.user_id: a.ident, b.user_id: b.ident}
    refused = {
        d.ident: {pk for message in d.refusals for _, pk, _ in refused_of(message)} for d in (a, b)
    }
    for pk in slots + fresh:
        (winner,) = claims[pk]
        assert owner_of[objects[pk]["owner_id"]] == winner
        assert objects[pk]["summary"] == f"claimed by {winner}"
        loser = b.ident if winner == a.ident else a.ident
        assert pk in refused[loser] and pk not in refused[winner]  # the loser was told
