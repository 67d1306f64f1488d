"""The sync client's thread and the server run on uvloop where it is installed."""

from __future__ import annotations

import asyncio

import pytest

from tidesync.eventloop import new_event_loop


def test_uvloop_by_default() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def test_standard_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDESYNC_EVENT_LOOP", "asyncio")
    loop = new_event_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
