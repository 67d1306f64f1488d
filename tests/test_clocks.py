"""Clocks (docs/merge.md, "Clocks"): the HLC clock's bound on remote timestamps, the clock
that goes back, the offset a device measures, and re-stamping unsent changesets."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tidesync as ts
from tests.test_merge import SIM, Sim, apply_all, fingerprint, steps_strategy
from tidesync.core.changeset import Changeset, Instruction
from tidesync.core.clocks import (
    corrected,
    first_ahead,
    hlcs_in,
    measure_offset,
    plan_restamp,
)
from tidesync.core.hlc import HLC, MAX_AHEAD_MS, RESERVED_SHIFT, ZERO, HybridClock
from tidesync.core.merge import Replica
from tidesync.core.packing import unpack, unpack_instructions

YEAR_MS = 365 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000

walls = st.integers(0, 2**50)
counters = st.integers(0, 2**20)
hlcs = st.builds(HLC, walls, counters, st.sampled_from(["a", "b", "c"]))
# a clock's life: ("tick", now) or ("observe", remote, now)
events = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), walls),
        st.tuples(st.just("observe"), hlcs, walls),
    ),
    max_size=60,
)


# ------------------------------------------------------------------ the clock


@given(events)
def test_observe_never_raises_and_the_clock_never_jumps_past_the_bound(
    script: list[tuple[Any, ...]],
) -> None:
    clock = HybridClock("a")
    issued: list[HLC] = []
    for event in script:
        before = clock.last
        if event[0] == "tick":
            now = event[1]
            stamp = clock.tick(now)
            assert stamp > before and stamp.wall == max(now, before.wall)
            issued.append(stamp)
        else:
            remote, now = event[1], event[2]
            adopted = clock.observe(remote, now)  # never raises
            after = clock.last
            assert (after.wall, after.counter) >= (before.wall, before.counter)
            assert adopted == (remote.wall <= now + MAX_AHEAD_MS)
            if adopted:
                assert (after.wall, after.counter) >= (remote.wall, remote.counter)
            else:
                assert after == before  # one far-future timestamp drags nothing
            assert after.wall <= max(before.wall, now + MAX_AHEAD_MS)
    assert issued == sorted(issued) and len(set(issued)) == len(issued)


def test_a_timestamp_years_ahead_is_not_adopted() -> None:
    clock = HybridClock("a")
    clock.tick(1_000)
    assert clock.observe(HLC(1_000 + 3 * YEAR_MS, 0, "b"), 1_000) is False
    assert clock.tick(1_001) == HLC(1_001, 0, "a")
    assert clock.observe(HLC(1_000 + MAX_AHEAD_MS, 5, "b"), 1_001) is True
    assert clock.tick(1_002) == HLC(1_000 + MAX_AHEAD_MS, 6, "a")


@given(
    st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 50)), min_size=1, max_size=40),
    st.integers(0, 2),
    events,
)
def test_a_clock_set_back_never_issues_a_reserved_timestamp(
    old: list[tuple[int, int]], epoch: int, script: list[tuple[Any, ...]]
) -> None:
    """Timestamps a replica issued before its clock went back (walls up to the reserved
    wall, counters below the shift) are never issued again, whatever it ticks or sees."""
    shift = (epoch + 1) * RESERVED_SHIFT
    old_set = {(w, c + epoch * RESERVED_SHIFT) for w, c in old}
    reserved = (max(w for w, _ in old), shift)
    clock = HybridClock("a", HLC(0, 0, "a"), reserved)
    issued: list[HLC] = []
    for event in script:
        if event[0] == "tick":
            issued.append(clock.tick(event[1] % 6_000))
        else:
            remote = event[1]
            clock.observe(HLC(remote.wall % 6_000, remote.counter, remote.origin), event[2])
    assert issued == sorted(issued) and len(set(issued)) == len(issued)
    assert not {(h.wall, h.counter) for h in issued} & old_set


# ------------------------------------------------------------------ the offset


@given(
    st.integers(2**40, 2**45),  # the device's clock when it sends HELLO
    st.integers(-10 * YEAR_MS, 10 * YEAR_MS),  # how wrong the device's clock is
    st.integers(0, 30_000),  # delay to the server
    st.integers(0, 30_000),  # delay back
)
def test_the_measured_offset_is_right_within_half_the_round_trip(
    sent: int, wrong_by: int, there: int, back: int
) -> None:
    true_offset = -wrong_by  # server time - device time
    server_ms = sent + there + true_offset  # what the server's clock reads in WELCOME
    received = sent + there + back
    offset = measure_offset(server_ms, sent, received)
    assert abs(offset - true_offset) <= (there + back) // 2 + 1
    # the corrected clock reads the server's time, to the same precision
    assert abs(corrected(received, offset) - (received + true_offset)) <= (there + back) // 2 + 1


def test_measure_offset_survives_a_clock_stepping_back() -> None:
    assert measure_offset(5_000, 2_000, 1_000) == 4_000  # taken at the reply


# ------------------------------------------------------------------ merge with skewed clocks


class _SkewedSim(Sim):
    """A :class:`Sim` whose replicas refuse, as a device does (FutureTimestampError), a
    list operation on an element whose id their clock did not adopt (far in the future)."""

    def commit(self, r: int, instructions: list[Instruction]) -> None:
        kept = [i for i in instructions if not (type(i.key) is HLC and i.key >= i.hlc)]
        if kept:
            super().commit(r, kept)


@SIM
@given(
    st.integers(2, 4),
    st.lists(
        st.sampled_from([0, 3, 3 * 3600 * 1000, 3 * DAY_MS, 5 * YEAR_MS, -DAY_MS]),
        min_size=4,
        max_size=4,
    ),
    steps_strategy,
    st.randoms(),
)
def test_replicas_with_clocks_years_apart_converge(
    n: int, skews: list[int], steps: list[tuple[int, int, int, int]], rnd: random.Random
) -> None:
    """Replicas whose clocks are hours, days or years off observe each other's
    timestamps (never failing) and end in one state whatever the delivery order."""
    sim = _SkewedSim(n, skews)
    sim.now = 10 * YEAR_MS
    for r, action, a, b in steps:
        sim.step(r % n, action, a, b)
    reference = fingerprint(apply_all(sim.log))
    shuffled = list(sim.log)
    rnd.shuffle(shuffled)
    assert fingerprint(apply_all(shuffled)) == reference
    for r in range(n):
        sim.sync(r)
        assert fingerprint(sim.replicas[r]) == reference
        assert sim.clocks[r].last.wall <= sim.now + max(skews[r], MAX_AHEAD_MS)


# ------------------------------------------------------------------ re-stamping


def _restamp_replica(
    rep: Replica, origin: str, pending: list[Changeset], now: int, first: int
) -> tuple[Replica, list[Changeset]]:
    """What store/restamp.py does to a file, on a core Replica: re-stamp ``pending[first:]``
    above what the objects they touch hold, then reset the objects to the unsent
    changesets alone (the download starts over)."""
    instructions = [cs.instructions for cs in pending]
    old = {(i.hlc.wall, i.hlc.counter) for cs in instructions[first:] for i in cs}
    touched = {(i.model, i.pk) for cs in instructions[first:] for i in cs}
    floor = ZERO
    for key in touched:
        state = rep.objects.get(key)
        if state is None:
            continue
        for h in hlcs_in(unpack(state.to_bytes())):
            mine = h.origin == origin or h.origin.startswith(origin + "#")
            if not (mine and (h.wall, h.counter) in old) and h.wall <= now + MAX_AHEAD_MS:
                floor = max(floor, h)
    plan = plan_restamp(origin, instructions, now, first=first, floor=floor)
    new = list(pending[: plan.first]) + [
        Changeset(origin, cs.version, ins)
        for cs, ins in zip(pending[plan.first :], plan.changesets, strict=True)
    ]
    out = Replica(rep.schemas)
    if plan.changesets:
        for cs in new:
            out.apply_changeset(cs)
    else:
        out = rep
    return out, new


@SIM
@given(
    st.integers(2, 3),
    st.lists(st.integers(0, 3), min_size=3, max_size=3),
    steps_strategy,
    st.integers(0, 4),
    st.integers(-500, 500),
)
def test_restamping_unsent_changesets_is_as_if_they_had_been_stamped_so(
    n: int, skews: list[int], steps: list[tuple[int, int, int, int]], cut: int, back: int
) -> None:
    """Re-stamp the changesets of replica 0 that no other replica has seen: the new
    timestamps keep their order and sort after everything else it holds; its file, reset
    to its unsent changes and downloaded again from the start, is exactly the merge of
    the new log; and every replica converges on the new log."""
    sim = Sim(n, skews)
    for r, action, a, b in steps:
        sim.step(r % n, action, a, b)
    seen_upto = max(sim.cursor[1:])  # log entries another replica has applied
    pending = [cs for cs in sim.log[seen_upto:] if cs.origin == "r0"]
    first = min(cut, len(pending))
    now = sim.now + back  # the corrected time: may be behind the old timestamps
    rep, new_pending = _restamp_replica(sim.replicas[0], "r0", pending, now, first)
    # the new changesets: same instructions, same order, new timestamps above the floor
    old_stamps = [i.hlc for cs in pending[first:] for i in cs.instructions]
    new_stamps = [i.hlc for cs in new_pending[first:] for i in cs.instructions]
    assert new_stamps == sorted(new_stamps) and len(set(new_stamps)) == len(new_stamps)
    assert len(new_stamps) == len(old_stamps)
    assert all(h.wall <= max(now, sim.clocks[0].last.wall) for h in new_stamps)
    replaced = {(cs.origin, cs.version): cs for cs in new_pending}
    new_log = [replaced.get((cs.origin, cs.version), cs) for cs in sim.log]
    reference = fingerprint(apply_all(new_log))
    # every order of the new log converges
    assert fingerprint(apply_all(list(reversed(new_log)))) == reference
    if new_stamps:
        # replica 0's reset file downloads the whole log again (its own changesets too)
        for cs in new_log:
            rep.apply_changeset(cs)
        assert fingerprint(rep) == reference


def test_restamp_keeps_order_and_the_element_ids_that_point_at_restamped_ones() -> None:
    from tidesync.core.changeset import Op

    far = 3 * DAY_MS
    a = HLC(far + 1, 0, "o")
    b = HLC(far + 2, 0, "o")
    pending = [
        (Instruction(Op.LIST_INSERT, "Item", "x", a, "tags", "first", None),),
        (Instruction(Op.LIST_INSERT, "Item", "x", b, "tags", "second", a),),
    ]
    assert first_ahead(pending, 1_000) == 0
    plan = plan_restamp("o", pending, 1_000, floor=HLC(900, 3, "p"))
    (ia,), (ib,) = plan.changesets
    assert ia.hlc == HLC(1_000, 0, "o") and ib.hlc == HLC(1_000, 1, "o")
    assert ib.key == ia.hlc  # the element id moved with the element
    assert plan.last == ib.hlc and plan.reserved is None


def test_restamp_reserves_what_others_have_seen() -> None:
    from tidesync.core.changeset import Op

    acked = HLC(3 * DAY_MS, 7, "o")
    plan = plan_restamp(
        "o",
        [(Instruction(Op.SET, "Item", "x", HLC(3 * DAY_MS + 5, 0, "o"), "title", "t"),)],
        1_000,
        acked_last=acked,
    )
    assert plan.reserved == (3 * DAY_MS, RESERVED_SHIFT)
    assert plan.changesets[0][0].hlc == HLC(1_000, RESERVED_SHIFT, "o")


# ------------------------------------------------------------------ the server's limit, ERROR 236


def test_the_clock_skew_limit_is_bounded_by_what_devices_adopt() -> None:
    from tidesync.errors import ConfigurationError
    from tidesync.server.limits import Limits

    assert Limits().max_clock_skew_ms == 3_600_000 == MAX_AHEAD_MS
    assert Limits(max_clock_skew_ms=60_000).max_clock_skew_ms == 60_000
    for bad in (59_999, MAX_AHEAD_MS + 1):
        with pytest.raises(ConfigurationError, match="max_clock_skew_ms must be between"):
            Limits(max_clock_skew_ms=bad)


def test_the_clock_skew_message_carries_the_version_and_the_servers_time() -> None:
    from tidesync.protocol.messages import clock_skew_message, clock_skew_of

    message = clock_skew_message(7, 5_000_000, 1_000_000, 3_600_000)
    assert "changeset version 7 has a timestamp 4000000 ms ahead" in message
    assert "this device's clock is wrong" in message
    assert clock_skew_of(message) == (7, 1_000_000)
    assert clock_skew_of("no such line") is None
    assert clock_skew_of('clock: {"version": "x", "server_time_ms": 1}') is None
    assert clock_skew_of("clock: {not json") is None


# ------------------------------------------------------------------ a file whose clock was ahead


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


def test_a_file_whose_acknowledged_timestamps_are_ahead_sets_its_clock_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timestamps others have seen (acknowledged before servers bounded them) are 3 days
    ahead: the clock goes back to the right time and never issues one of them again."""
    from tidesync.store import engine as store_engine
    from tidesync.store.restamp import clock_ahead, restamp_unsent

    real = store_engine.now_ms
    with ts.Database(ts.Configuration.local([Note], path=tmp_path / "f.tidesync")) as db:
        monkeypatch.setattr(store_engine, "now_ms", lambda: real() + 3 * DAY_MS)
        with db.write():
            db.add(Note(id="a", text="ahead"))
        monkeypatch.setattr(store_engine, "now_ms", real)
        engine = db._engine
        ahead = json.loads(str(engine.get_meta("hlc")))
        assert clock_ahead(engine, real())
        # version 1 was acknowledged; nothing unsent: the clock alone is set back
        assert restamp_unsent(engine, 1, 2, real()) == 0
        assert not clock_ahead(engine, real())
        assert json.loads(str(engine.get_meta("hlc_reserved"))) == [ahead[0], RESERVED_SHIFT]
        with db.write():
            note = db.find(Note, "a")
            assert note is not None
            note.text = "now"
        (_, data), *_ = engine.read_changelog(1, 1 << 20)
        (ins,) = unpack_instructions(data, engine.origin)
        assert abs(ins.hlc.wall - real()) < 60_000 and ins.hlc.counter >= RESERVED_SHIFT
        # the acknowledged far-ahead write still wins locally, as it does everywhere
        assert db.find(Note, "a") is not None
        assert db.find(Note, "a").text == "ahead"  # type: ignore[union-attr]


def test_restamping_unsent_changes_on_a_file_keeps_them_and_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tidesync.store import engine as store_engine
    from tidesync.store.restamp import restamp_unsent

    real = store_engine.now_ms
    with ts.Database(ts.Configuration.local([Note], path=tmp_path / "f.tidesync")) as db:
        monkeypatch.setattr(store_engine, "now_ms", lambda: real() + 3 * DAY_MS)
        with db.write():
            db.add(Note(id="a", text="one"))
        with db.write():
            db.find(Note, "a").text = "two"  # type: ignore[union-attr]
        monkeypatch.setattr(store_engine, "now_ms", real)
        engine = db._engine
        assert restamp_unsent(engine, 0, 1, real()) == 2
        stamps = [
            i.hlc
            for _, data in engine.read_changelog(0, 1 << 20)
            for i in unpack_instructions(data, engine.origin)
        ]
        assert stamps == sorted(stamps) and all(abs(h.wall - real()) < 60_000 for h in stamps)
        assert db.find(Note, "a").text == "two"  # type: ignore[union-attr]
        with db.write():
            db.find(Note, "a").text = "three"  # type: ignore[union-attr]
        assert db.find(Note, "a").text == "three"  # type: ignore[union-attr]
