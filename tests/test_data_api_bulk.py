"""A bulk ``POST`` answers each object as a read of it does: objects made from nothing are
answered from their CREATE (``data._read_back``'s fast path), the rest (upserts, models
with counters or collections) from the storage (the general path); both must agree."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tidesync.server.settings import load_config
from tidesync.testing import TestServer

from .api_helpers import CONFIG, admin

BASE = "/api/v1/apps/todo/data"
#: A model of every scalar kind and no counter or collection: its creates are plain rows.
PLAIN = """
[apps.todo.schema.Plain]
primary_key = "id"
[apps.todo.schema.Plain.fields]
id = "str"
flag = "bool"
big = "int"
ratio = "float"
name = "str | None"
blob = "bytes | None"
at = "datetime"
price = "decimal"
uid = "uuid"
oid = "objectid"
task = "Task | None"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    root: Path = tmp_path_factory.mktemp("data-api-bulk")
    path = root / "tidesync.toml"
    path.write_text(CONFIG + PLAIN)
    with TestServer(root / "server", config=load_config(path)) as srv:
        yield srv


@pytest.fixture
async def http(server: TestServer) -> AsyncIterator[httpx.AsyncClient]:
    async with admin(server.url) as client:
        yield client


def plain(i: int) -> dict[str, object]:
    obj: dict[str, object] = {
        "id": f"p{i}",
        "flag": i % 2 == 0,
        "big": 2**60 + i if i % 3 == 0 else i,  # past 2**53: a string in JSON
        "ratio": i + 0.5 if i % 4 else 3,  # an integer given for a float
        "at": f"2026-12-08T04:{i % 60:02d}:00.5Z",
        "price": f"{i}.25",
        "uid": f"12345678-1234-5678-1234-{i:012d}",
        "oid": f"65a1f0c2e4b0a1b2{i:08x}",
    }
    if i % 2:
        obj |= {"name": f"n{i}", "blob": "AAEC", "task": f"t{i}"}
    if i % 5 == 0:
        obj["ratio"] = "NaN"
    return obj


async def _same_as_reads(http: httpx.AsyncClient, model: str, answered: list[object]) -> None:
    for obj in answered:
        assert isinstance(obj, dict)
        read = await http.get(f"{BASE}/{model}/{obj['id']}")
        assert read.status_code == 200, read.text
        assert read.json() == obj


async def test_new_objects_answer_as_they_read(http: httpx.AsyncClient) -> None:
    posted = await http.post(f"{BASE}/Plain", json=[plain(i) for i in range(40)])
    assert posted.status_code == 200, posted.text
    answered = posted.json()["objects"]
    assert [o["id"] for o in answered] == [f"p{i}" for i in range(40)]
    assert answered[0]["ratio"] == "NaN" and answered[3]["big"] == str(2**60 + 3)
    assert answered[2]["name"] is None  # an optional field left out is stored as null
    await _same_as_reads(http, "Plain", answered)


async def test_upserts_and_repeated_keys_answer_as_they_read(http: httpx.AsyncClient) -> None:
    first = await http.post(f"{BASE}/Plain", json=[plain(i) for i in range(100, 110)])
    assert first.status_code == 200, first.text
    again = [{**plain(i), "name": "again"} for i in range(105, 115)]  # half exist already
    again.append({**plain(112), "name": "twice"})  # the same key twice in one request
    posted = await http.post(f"{BASE}/Plain", json=again)
    assert posted.status_code == 200, posted.text
    answered = posted.json()["objects"]
    assert [o["name"] for o in answered[:-1]] == ["again"] * 7 + ["twice"] + ["again"] * 2
    await _same_as_reads(http, "Plain", answered)


async def test_models_with_counters_and_collections_answer_as_they_read(
    http: httpx.AsyncClient,
) -> None:
    thing = {
        "flag": True,
        "big": 7,
        "ratio": 0.25,
        "blob": "AAE=",
        "at": "2026-12-08T03:53:15.123456Z",
        "price": "1.5",
        "uid": "12345678-1234-5678-1234-567812345678",
        "oid": "65a1f0c2e4b0a1b2c3d4e5f6",
        "hits": 2,
        "tags": ["b", "a"],
        "labels": ["y", "x"],
        "scores": {"k": 1.5},
    }
    posted = await http.post(f"{BASE}/Thing", json=[{**thing, "id": 500 + i} for i in range(5)])
    assert posted.status_code == 200, posted.text
    answered = posted.json()["objects"]
    assert answered[0]["labels"] == ["x", "y"] and answered[0]["hits"] == 2
    await _same_as_reads(http, "Thing", answered)
