"""The Data API on ``tidesync serve`` child processes: a restart loses nothing (SQLite), and
two processes sharing PostgreSQL serve one app's data, API writes on one reaching a device
on the other and device writes on the other readable on the one, rules included. The
PostgreSQL test is skipped unless ``TIDESYNC_TEST_PG_DSN`` names a database."""

from __future__ import annotations

from pathlib import Path

from tidesync.testing import ServerProcess

from .api_helpers import Device, Task, admin, as_user, write_config
from .flex_helpers import eventually

BASE = "/api/v1/apps/todo/data"


def task(pk: str, owner: str, **values: object) -> dict[str, object]:
    """A whole Task."""
    return {"id": pk, "owner_id": owner, "summary": "", "n": 0, "shared": False, **values}


async def test_a_restart_loses_nothing(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "server", extra_args=["--config", str(write_config(tmp_path))])
    proc.start()
    try:
        async with admin(proc.url) as http:
            rows = [task(f"k-{i}", "o", n=i) for i in range(5)]
            assert (await http.post(f"{BASE}/Task", json=rows)).status_code == 200
            await http.patch(f"{BASE}/Task/k-1", json={"summary": "before"})
        proc.stop()
        proc.start()
        async with admin(proc.url) as http:
            page = (await http.get(f"{BASE}/Task", params={"sort": "n"})).json()
            assert [o["id"] for o in page["objects"]] == [f"k-{i}" for i in range(5)]
            assert page["objects"][1]["summary"] == "before"
            # a new process writes under a new origin, and still later than what it overwrites
            after = await http.patch(f"{BASE}/Task/k-1", json={"summary": "after"})
            assert after.status_code == 200 and after.json()["summary"] == "after"
        proc.kill()  # no goodbye: an acknowledged write is durable
        proc.start()
        async with admin(proc.url) as http:
            assert (await http.get(f"{BASE}/Task/k-1")).json()["summary"] == "after"
    finally:
        proc.kill()


async def test_two_processes_on_postgres_share_the_data(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path)
    args = ["--storage", pg_url, "--config", str(config)]
    one, two = (ServerProcess(tmp_path / "server", extra_args=args) for _ in range(2))
    phone = None
    try:
        one.start()  # one at a time: the first creates the secret
        two.start()
        phone = Device(tmp_path, "phone", two.url)
        await phone.open()
        async with admin(one.url) as http:
            made = await http.post(f"{BASE}/Task", json=task("pg-1", phone.user_id))
            assert made.status_code == 200, made.text
            await eventually(lambda: "pg-1" in phone.tasks())
            await http.patch(f"{BASE}/Task/pg-1", json={"n": 7})
            await eventually(lambda: phone.tasks()["pg-1"]["n"] == 7)
            # a query evaluated by PostgreSQL itself, with a JSON argument
            found = await http.get(f"{BASE}/Task", params={"query": "n == $0", "args": "[7]"})
            assert [o["id"] for o in found.json()["objects"]] == ["pg-1"]
            assert phone.db is not None
            with phone.db.write():
                phone.db.add(Task(id="pg-2", owner_id=phone.user_id, summary="typed"))
            await phone.settle()
            answer = await http.get(f"{BASE}/Task/pg-2")
            assert answer.status_code == 200 and answer.json()["summary"] == "typed"
        # the phone's user, through process one: the rules apply
        async with as_user(one.url, phone.token) as user:
            mine = await user.patch(f"{BASE}/Task/pg-2", json={"n": 3})
            assert mine.status_code == 200, mine.text
            forged = await user.post(f"{BASE}/Task", json=task("pg-3", "someone-else"))
            assert forged.status_code == 403 and forged.json()["refused"][0]["pk"] == "pg-3"
        await eventually(lambda: phone.tasks()["pg-2"]["n"] == 3)
        one.stop()
        one.start()
        async with admin(one.url) as http:
            page = (await http.get(f"{BASE}/Task")).json()
            assert sorted(o["id"] for o in page["objects"]) == ["pg-1", "pg-2"]
            await http.delete(f"{BASE}/Task/pg-1")
        await eventually(lambda: "pg-1" not in phone.tasks())
    finally:
        if phone is not None:
            phone.shutdown()
        one.kill()
        two.kill()
