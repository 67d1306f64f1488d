"""The pure progress rule (core/progress.py): an unknown total never completes a tracker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tidesync.core.progress import ALMOST_DONE, ProgressMode, ProgressTracker, SyncProgress

OUTSTANDING = ProgressMode.FOR_CURRENTLY_OUTSTANDING_WORK
FOREVER = ProgressMode.REPORT_INDEFINITELY


def test_registered_while_unknown_waits_at_zero_then_follows_the_work() -> None:
    # registered while paused: the counters say nothing is outstanding, but unknown
    t = ProgressTracker(OUTSTANDING, 100, 100, known=False)
    assert t.update(100, 100, known=False) == SyncProgress(0.0, 0, 0)
    assert not t.done
    # the first DOWNLOAD of the binding: 1,000 bytes applied, 3,000 still to come
    assert t.update(1100, 4100) == SyncProgress(0.25, 1000, 4000)
    assert t.update(3100, 4100) == SyncProgress(0.75, 3000, 4000)
    assert not t.done
    assert t.update(4100, 4100) == SyncProgress(1.0, 4000, 4000)
    assert t.done


def test_an_unknown_total_keeps_the_target() -> None:
    t = ProgressTracker(OUTSTANDING, 0, 1000)
    assert t.update(400, 1000) == SyncProgress(0.4, 400, 1000)
    # disconnected: the session's total is unknown and says nothing is left
    assert t.update(400, 400, known=False) is None  # same estimate, nothing new
    assert not t.done
    assert t.update(700, 1000) == SyncProgress(0.7, 700, 1000)
    assert t.update(1000, 1000) == SyncProgress(1.0, 1000, 1000)
    assert t.done


def test_the_target_still_shrinks_with_a_known_total() -> None:
    t = ProgressTracker(OUTSTANDING, 0, 1000)
    assert t.update(500, 800) == SyncProgress(0.625, 500, 800)
    assert t.update(800, 800) == SyncProgress(1.0, 800, 800)
    assert t.done


def test_complete_ends_even_an_unknown_tracker() -> None:
    t = ProgressTracker(OUTSTANDING, 0, 0, known=False)
    assert t.update(0, 0, known=False) == SyncProgress(0.0, 0, 0)
    assert t.update(50, 50, known=False, complete=True) == SyncProgress(1.0, 50, 50)
    assert t.done


def test_nothing_outstanding_and_known_is_done_at_once() -> None:
    t = ProgressTracker(OUTSTANDING, 70, 70)
    assert t.update(70, 70) == SyncProgress(1.0, 0, 0)
    assert t.done


def test_report_indefinitely_holds_its_value_while_unknown() -> None:
    t = ProgressTracker(FOREVER, 0, 0, known=False)
    assert t.update(0, 0, known=False) == SyncProgress(0.0, 0, 0)
    assert t.update(100, 400) == SyncProgress(0.25, 100, 400)
    assert t.update(100, 100, known=False) is None  # paused: no drop to 0.0, no 1.0
    assert t.update(400, 400) == SyncProgress(1.0, 400, 400)
    assert not t.done


@given(
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), max_size=20),
)
def test_unknown_counters_never_complete_or_move_the_estimate(
    start: int, extra: int, steps: list[tuple[int, int]]
) -> None:
    """Whatever the counters say while the total is unknown, an outstanding-work tracker
    registered then reports 0.0 and is not done; one with a target reports done/target."""
    fresh = ProgressTracker(OUTSTANDING, start, start, known=False)
    known = ProgressTracker(OUTSTANDING, start, start + extra + 1)
    first = known.update(start, start + extra + 1)
    assert first is not None and first.progress_estimate == 0.0
    for done, more in steps:
        t = start + done
        got = fresh.update(t, t + more, known=False)
        assert got is None or got == SyncProgress(0.0, 0, 0)
        assert not fresh.done
        was_done = known.done
        got = known.update(min(t, start + extra), min(t, start + extra) + more, known=False)
        assert known.done is was_done  # an unknown total never finishes it
        if got is not None:
            assert got.transferable_bytes == extra + 1


def test_bytes_that_say_done_wait_for_the_cursor() -> None:
    # a flexible DOWNLOAD counts whole objects' states where the server counted log
    # entries: the bytes can reach the target a page early
    t = ProgressTracker(OUTSTANDING, 0, 0, known=False)
    assert t.update(0, 0, known=False, cursor=10, latest=10) == SyncProgress(0.0, 0, 0)
    # the first DOWNLOAD fixes the target (1,000 bytes) and the goal (version 20)
    assert t.update(100, 1000, cursor=12, latest=20) == SyncProgress(0.1, 100, 1000)
    got = t.update(1010, 1010, cursor=19, latest=25)
    assert got is not None and got.progress_estimate == ALMOST_DONE and not t.done
    assert t.update(1020, 1020, cursor=20, latest=25) == SyncProgress(1.0, 1000, 1000)
    assert t.done


def test_a_later_latest_version_is_not_waited_for() -> None:
    t = ProgressTracker(OUTSTANDING, 0, 500, latest=7)
    assert t.update(500, 900, cursor=7, latest=9) == SyncProgress(1.0, 500, 500)
    assert t.done


def test_complete_needs_no_cursor() -> None:
    t = ProgressTracker(OUTSTANDING, 0, 500, latest=7)
    assert t.update(500, 500, cursor=3, latest=7) == SyncProgress(ALMOST_DONE, 500, 500)
    assert t.update(500, 500, cursor=3, latest=7, complete=True) == SyncProgress(1.0, 500, 500)
    assert t.done
