"""Paging of the Data API's listings (server/api/reads.py) on real SQLite storage: whatever
the values (nulls, NaN, ties, -0.0), the order and the page size, following ``next``
yields every matching object exactly once, in order."""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tidesync.core import query as q
from tidesync.core.changeset import Changeset, Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import pack
from tidesync.core.schema import FieldSchema, Kind, ModelSchema
from tidesync.server.api.reads import list_objects
from tidesync.server.storage.base import UploadBatch
from tidesync.server.storage.sqlite import SQLiteStorage

ROW = ModelSchema(
    "Row",
    (
        FieldSchema("id", Kind.INT, primary_key=True),
        FieldSchema("x", Kind.FLOAT, optional=True),
        FieldSchema("keep", Kind.BOOL),
    ),
    "id",
)
VALUES = st.none() | st.sampled_from([0.0, -0.0, 1.5, -2.0, math.nan, math.inf]) | st.floats()


def key_of(values: dict[str, Any], sort: str) -> tuple[Any, ...]:
    v = values[sort]
    pk = pack(values["id"])
    if v is None:
        return (0, 0, pk)
    if v != v:
        return (2, 0, pk)
    return (1, v, pk)


async def pages(storage: SQLiteStorage, **kw: Any) -> list[int]:
    bound = q.bind(q.parse("keep == true"), ROW, {"Row": ROW}, [])
    out: list[int] = []
    after = None
    for _ in range(1000):
        page = await list_objects(storage, "app", ROW, bound, None, after=after, **kw)
        assert len(page.objects) <= kw["limit"]
        out += [o["id"] for o in page.objects]
        after = page.next
        if after is None:
            return out
    raise AssertionError("the pages did not end")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(VALUES, st.booleans()), max_size=40),
    st.integers(1, 7),
    st.sampled_from([None, "x", "id"]),
    st.booleans(),
)
def test_pages_hold_every_match_once_in_order(
    rows: list[tuple[float | None, bool]], limit: int, sort: str | None, desc: bool
) -> None:
    async def run(folder: Path) -> None:
        storage = SQLiteStorage.in_folder(folder)
        async with storage:
            await storage.put_schemas("app", [ROW])
            await storage.register_client("app", "w", "u")
            creates = tuple(
                Instruction(
                    Op.CREATE,
                    "Row",
                    (i * 37) % 101 - 50,
                    HLC(1, i, "w"),
                    value={"id": (i * 37) % 101 - 50, "x": x, "keep": keep},
                )
                for i, (x, keep) in enumerate(rows)
            )
            if creates:
                batch = UploadBatch("app", "w", [Changeset("w", 1, creates)])
                assert (await storage.integrate([batch]))[0].ok
            kept = [dict(ins.value) for ins in creates if ins.value["keep"]]
            got = await pages(storage, sort=sort, desc=desc, limit=limit)
            assert sorted(got) == sorted(v["id"] for v in kept)  # each once
            if sort is not None or desc:
                by = sort or "id"
                want = sorted(kept, key=lambda v: key_of(v, by), reverse=desc)
                assert got == [v["id"] for v in want]
            else:
                assert got == sorted(got, key=pack)  # the storage's key order

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(run(Path(folder)))
