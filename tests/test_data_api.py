"""The Data API against one real server (SQLite, real HTTP, real devices): every route,
the JSON values of every field type, paging, rules for user tokens, and bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.server.settings import load_config
from tidesync.testing import TestServer

from .api_helpers import Device, admin, as_user, write_config
from .flex_helpers import eventually
from .rules_helpers import log_in

BASE = "/api/v1/apps/todo/data"


def task(pk: str, **values: Any) -> dict[str, Any]:
    """A whole Task (every field of a new object must be given)."""
    return {"id": pk, "owner_id": "", "summary": "", "n": 0, "shared": False, **values}


THING = {
    "id": 1,
    "flag": True,
    "big": "9007199254740993",
    "ratio": "NaN",
    "name": None,
    "blob": "AAEC/w==",
    "at": "2026-12-08T03:53:15.123456Z",
    "price": "12.50",
    "uid": "5f0c9a2e-8d4b-4c1e-9a7f-1b2c3d4e5f60",
    "oid": "65a1f0c2e4b0a1b2c3d4e5f6",
    "hits": 3,
    "tags": ["b", "a", "b"],
    "labels": ["y", "x"],
    "scores": {"k": 1.5},
    "task": "t-1",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    root = tmp_path_factory.mktemp("data-api")
    config = load_config(write_config(root))
    with TestServer(root / "server", config=config) as srv:
        yield srv


@pytest.fixture
async def http(server: TestServer) -> AsyncIterator[httpx.AsyncClient]:
    async with admin(server.url) as client:
        yield client


async def test_models_list_every_field_with_its_type(http: httpx.AsyncClient) -> None:
    answer = await http.get(BASE)
    assert answer.status_code == 200, answer.text
    models = {m["name"]: m for m in answer.json()["models"]}
    assert set(models) == {"Task", "Thing"}
    types = {f["name"]: f["type"] for f in models["Thing"]["fields"]}
    assert types["labels"] == "set[str]" and types["task"] == "Task | None"
    assert types["hits"] == "counter" and models["Thing"]["primary_key"] == "id"


async def test_every_field_type_round_trips_through_json(http: httpx.AsyncClient) -> None:
    created = await http.post(f"{BASE}/Thing", json=THING)
    assert created.status_code == 200, created.text
    expected = {**THING, "labels": ["x", "y"]}  # a set answers sorted
    assert created.json() == expected
    fetched = await http.get(f"{BASE}/Thing/1")
    assert fetched.status_code == 200 and fetched.json() == expected
    # JSON arguments of a query are converted as the field's values are
    found = await http.get(
        f"{BASE}/Thing",
        params={
            "query": "at == $0 AND price == $1 AND oid == $2 AND big == $3",
            "args": json.dumps([THING["at"], "12.5", THING["oid"], THING["big"]]),
        },
    )
    assert found.status_code == 200, found.text
    assert [o["id"] for o in found.json()["objects"]] == [1]


async def test_patch_operators_and_whole_values(http: httpx.AsyncClient) -> None:
    thing = {**THING, "id": 2}
    assert (await http.post(f"{BASE}/Thing", json=thing)).status_code == 200
    patch = {
        "hits": {"$inc": 4},
        "tags": {"$push": ["c", "d"]},
        "labels": {"$pull": ["x"]},
        "scores": {"$set": {"z": 2.0}},
        "ratio": 0.25,
    }
    answer = await http.patch(f"{BASE}/Thing/2", json=patch)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["hits"] == 7 and body["tags"] == ["b", "a", "b", "c", "d"]
    assert body["labels"] == ["y"] and body["scores"] == {"k": 1.5, "z": 2.0}
    assert body["ratio"] == 0.25
    answer = await http.patch(
        f"{BASE}/Thing/2",
        json={"tags": {"$pull": ["b"]}, "labels": {"$push": ["w"]}, "scores": {"$unset": ["k"]}},
    )
    body = answer.json()
    assert body["tags"] == ["a", "c", "d"] and body["labels"] == ["w", "y"]
    assert body["scores"] == {"z": 2.0}
    answer = await http.patch(f"{BASE}/Thing/2", json={"tags": ["q"], "scores": {}})
    assert answer.json()["tags"] == ["q"] and answer.json()["scores"] == {}


async def test_post_upserts_and_delete_erases(http: httpx.AsyncClient) -> None:
    one = task("u-1", owner_id="nobody", summary="first", n=1)
    assert (await http.post(f"{BASE}/Task", json=one)).json()["summary"] == "first"
    again = await http.post(f"{BASE}/Task", json=[{"id": "u-1", "summary": "second"}])
    assert again.status_code == 200, again.text
    (stored,) = again.json()["objects"]
    assert stored == {
        "id": "u-1",
        "owner_id": "nobody",
        "summary": "second",
        "n": 1,
        "shared": False,
    }  # fields left out keep their values
    gone = await http.delete(f"{BASE}/Task/u-1")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert (await http.get(f"{BASE}/Task/u-1")).status_code == 404
    again = await http.delete(f"{BASE}/Task/u-1")
    assert again.status_code == 404 and again.json()["code"] == "not_found"


async def test_transaction_is_all_or_nothing(http: httpx.AsyncClient) -> None:
    ops: list[dict[str, Any]] = [
        {"op": "create", "model": "Task", "object": task("x-1", owner_id="o")},
        {"op": "update", "model": "Task", "pk": "x-1", "fields": {"n": 5}},
        {"op": "create", "model": "Task", "object": task("x-2", owner_id="o")},
        {"op": "delete", "model": "Task", "pk": "x-2"},
    ]
    done = await http.post(f"{BASE}/_transaction", json=ops)
    assert done.status_code == 200, done.text
    results = done.json()["results"]
    assert results[0]["n"] == 5 and results[1]["n"] == 5 and results[3] is None
    bad = [
        {"op": "create", "model": "Task", "object": task("x-3", owner_id="o")},
        {"op": "update", "model": "Task", "pk": "x-1", "fields": {"n": "five"}},
    ]
    answer = await http.post(f"{BASE}/_transaction", json={"operations": bad})
    assert answer.status_code == 400 and "[1] Task.n" in answer.json()["error"]
    missing = [
        {"op": "create", "model": "Task", "object": task("x-3", owner_id="o")},
        {"op": "delete", "model": "Task", "pk": "never"},
    ]
    answer = await http.post(f"{BASE}/_transaction", json=missing)
    assert answer.status_code == 404
    assert (await http.get(f"{BASE}/Task/x-3")).status_code == 404  # nothing stored
    assert (await http.get(f"{BASE}/Task/x-1")).json()["n"] == 5


async def _all_pages(http: httpx.AsyncClient, params: dict[str, Any]) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    after = None
    for _ in range(100):
        answer = await http.get(
            f"{BASE}/Task", params={**params, **({"after": after} if after else {})}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["objects"]) <= int(params["limit"])
        seen += body["objects"]
        after = body["next"]
        if after is None:
            return seen
    raise AssertionError("the pages did not end")


async def test_pages_cover_every_object_once_in_order(http: httpx.AsyncClient) -> None:
    rows = [task(f"p-{i:02d}", owner_id="pager", n=(i * 7) % 10) for i in range(23)]
    assert (await http.post(f"{BASE}/Task", json=rows)).status_code == 200
    query = {"query": "owner_id == $0", "args": json.dumps(["pager"]), "limit": 5}
    plain = await _all_pages(http, query)
    assert sorted(o["id"] for o in plain) == [r["id"] for r in rows]
    assert len({o["id"] for o in plain}) == len(rows)
    by_n = await _all_pages(http, {**query, "sort": "n", "desc": "true"})
    keys = [(o["n"], o["id"]) for o in by_n]
    assert len(keys) == len(rows) and [k[0] for k in keys] == sorted(
        (k[0] for k in keys), reverse=True
    )
    ascending = await _all_pages(http, {**query, "sort": "n"})
    assert [o["n"] for o in ascending] == sorted(r["n"] for r in rows)
    wrong = await http.get(f"{BASE}/Task", params={"sort": "id", "after": "garbage!"})
    assert wrong.status_code == 400 and wrong.json()["code"] == "bad_cursor"


async def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(
    server: TestServer, http: httpx.AsyncClient
) -> None:
    async def refused(answer: httpx.Response, status: int, *words: str) -> dict[str, Any]:
        assert answer.status_code == status, answer.text
        body: dict[str, Any] = answer.json()
        assert set(body) >= {"error", "code"}
        for word in words:
            assert word in body["error"], body
        return body

    headers = {"Content-Type": "application/json"}
    await refused(await http.post(f"{BASE}/Task", content=b"{oops", headers=headers), 400, "JSON")
    big = json.dumps([task(f"b{i}", owner_id="x" * 100) for i in range(2000)])
    await refused(await http.post(f"{BASE}/Task", content=big, headers=headers), 413)
    await refused(
        await http.post(f"{BASE}/Task", content=b"{}", headers={"Content-Type": "text/plain"}), 415
    )
    await refused(await http.get("/api/v1/apps/nope/data"), 404, "nope")
    await refused(await http.get(f"{BASE}/Nope"), 404, "Nope")
    body = await refused(
        await http.post(f"{BASE}/Task", json=task("e", owner_id="o", colour=1)),
        400,
        "colour",
    )
    assert body["field"] == "Task.colour"
    body = await refused(
        await http.post(f"{BASE}/Task", json=task("e", owner_id=5)), 400, "Task.owner_id"
    )
    body = await refused(
        await http.patch(f"{BASE}/Thing/1", json={"at": "yesterday"}), 400, "Thing.at"
    )
    body = await refused(await http.get(f"{BASE}/Task", params={"query": "n >> 3"}), 400)
    assert body["code"] == "bad_query" and body["position"] is not None
    body = await refused(
        await http.get(f"{BASE}/Task", params={"query": "colour == 1"}), 400, "colour"
    )
    assert body["position"] == 0
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as anon:
        await refused(await anon.get(BASE), 401)
        await refused(await anon.get(BASE, headers={"Authorization": "Bearer wrong"}), 401)
        _, other_token = await log_in(server.url, "other")
        await refused(await anon.get(BASE, headers={"Authorization": f"Bearer {other_token}"}), 401)
    body = await refused(
        await http.patch(f"{BASE}/Task/p-00", json={"id": "p-99"}), 400, "primary key"
    )
    body = await refused(
        await http.patch(f"{BASE}/Task/p-00", json={"n": {"$inc": 1}}), 400, "$inc"
    )
    assert body["field"] == "Task.n"
    await refused(await http.get(f"{BASE}/Task", params={"limit": 5000}), 400, "limit")
    await refused(
        await http.get(f"{BASE}/Task", params={"query": "n > $0", "args": "{}"}), 400, "array"
    )
    await refused(
        await http.get(f"{BASE}/Task", params={"query": "n > 1 SORT(n ASC)"}), 400, "sort"
    )
    body = await refused(
        await http.get(f"{BASE}/Thing", params={"query": "at < $0", "args": '["soon"]'}), 400, "$0"
    )
    assert body["code"] == "bad_query"
    await refused(await http.post(f"{BASE}/_transaction", json=[{"op": "upsert"}]), 400, "[0]")
    assert (await http.get(f"{BASE}/Task/p-00")).status_code == 200  # still serving
    assert (await http.get(f"{BASE}/Task/e")).status_code == 404  # nothing stored


async def test_api_writes_reach_a_device_and_device_writes_are_readable(
    server: TestServer, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    d = Device(tmp_path, "phone", server.url)
    try:
        await d.open()
        made = await http.post(f"{BASE}/Task", json=task("to-phone", owner_id=d.user_id))
        assert made.status_code == 200, made.text
        await eventually(lambda: "to-phone" in d.tasks())
        await http.patch(f"{BASE}/Task/to-phone", json={"summary": "from the backend"})
        await eventually(lambda: d.tasks()["to-phone"]["summary"] == "from the backend")
        from .api_helpers import Task

        assert d.db is not None
        with d.db.write():
            d.db.add(Task(id="from-phone", owner_id=d.user_id, n=42))
        await d.settle()
        answer = await http.get(f"{BASE}/Task/from-phone")
        assert answer.status_code == 200 and answer.json()["n"] == 42
        await http.delete(f"{BASE}/Task/to-phone")
        await eventually(lambda: "to-phone" not in d.tasks())
    finally:
        d.shutdown()


async def test_user_tokens_follow_the_rules(server: TestServer, http: httpx.AsyncClient) -> None:
    alice, alice_token = await log_in(server.url, "todo")
    bob, _ = await log_in(server.url, "todo")
    seed = [
        task("r-alice", owner_id=alice),
        task("r-bob", owner_id=bob),
        task("r-shared", owner_id=bob, shared=True),
    ]
    assert (await http.post(f"{BASE}/Task", json=seed)).status_code == 200
    async with as_user(server.url, alice_token) as user:
        page = await user.get(f"{BASE}/Task", params={"query": "id BEGINSWITH 'r-'"})
        assert sorted(o["id"] for o in page.json()["objects"]) == ["r-alice", "r-shared"]
        params = {"query": "id BEGINSWITH 'r-'", "sort": "id", "desc": "true"}
        page = await user.get(f"{BASE}/Task", params=params)  # the sorted scan: filtered too
        assert [o["id"] for o in page.json()["objects"]] == ["r-shared", "r-alice"]
        assert (await user.get(f"{BASE}/Task/r-bob")).status_code == 404
        assert (await user.get(f"{BASE}/Thing")).json()["objects"] == []  # no rule: nothing
        mine = await user.patch(f"{BASE}/Task/r-alice", json={"summary": "mine"})
        assert mine.status_code == 200 and mine.json()["summary"] == "mine"
        answer = await user.patch(f"{BASE}/Task/r-shared", json={"summary": "taken"})
        assert answer.status_code == 403, answer.text
        assert answer.json()["refused"][0]["pk"] == "r-shared"
        mixed = [
            {"op": "update", "model": "Task", "pk": "r-alice", "fields": {"n": 9}},
            {"op": "create", "model": "Task", "object": task("r-forged", owner_id=bob)},
        ]
        answer = await user.post(f"{BASE}/_transaction", json=mixed)
        assert answer.status_code == 403, answer.text
        body = answer.json()
        assert body["code"] == "forbidden"
        assert [r["pk"] for r in body["refused"]] == ["r-forged"]
        assert (await user.get(f"{BASE}/Task/r-alice")).json()["n"] == 0  # nothing stored
    assert (await http.get(f"{BASE}/Task/r-forged")).status_code == 404
    assert (await http.get(f"{BASE}/Task/r-shared")).json()["summary"] == ""


async def test_concurrent_writes_are_serialised_and_all_stored(http: httpx.AsyncClient) -> None:
    thing = {**THING, "id": 3, "hits": 0}
    assert (await http.post(f"{BASE}/Thing", json=thing)).status_code == 200

    async def bump(i: int) -> int:
        answer = await http.patch(f"{BASE}/Thing/3", json={"hits": {"$inc": i}})
        assert answer.status_code == 200, answer.text
        hits: int = answer.json()["hits"]
        return hits

    seen = await asyncio.gather(*(bump(i) for i in range(1, 21)))
    assert max(seen) == sum(range(1, 21))  # dense versions of one origin: none lost
    assert (await http.get(f"{BASE}/Thing/3")).json()["hits"] == sum(range(1, 21))


def test_the_data_api_has_its_own_body_limit() -> None:
    from tidesync.server.limits import BodySizeLimit, Limits

    limits = Limits()
    gate = BodySizeLimit(None, limits.max_request_body_bytes, limits.max_api_body_bytes)  # type: ignore[arg-type]
    assert gate.limit_for("/api/v1/apps/todo/data/Task") == limits.max_api_body_bytes
    assert gate.limit_for("/api/v1/apps/todo/data") == limits.max_api_body_bytes
    assert gate.limit_for("/api/v1/apps/todo/auth/email/register") == 64 * 1024
    assert gate.limit_for("/api/v1/apps/data/auth/anonymous") == 64 * 1024
    assert limits.max_api_body_bytes >= 16 * 2**20  # a bulk POST of 10,000s of objects
