"""The client session core (protocol/session.py) without sockets: reconnects, held uploads,
rebinding, client reset decisions and progress, against a ServerProtocol in memory and a
fake clock (tests/session_core_helpers.py)."""

from __future__ import annotations

import pytest

from tidesync.errors import ClientResetError, LocalProtocolError, SessionInactiveError
from tidesync.protocol import session as ps
from tidesync.protocol.messages import ErrorCode
from tidesync.protocol.session import (
    IGNORED,
    TRANSITIONS,
    Command,
    ConnectionState,
    SessionPhase,
    SessionProtocol,
)

from .session_core_helpers import Device


def bound_device(**kw: object) -> Device:
    d = Device(**kw)  # type: ignore[arg-type]
    d.activate()
    d.connect()
    d.serve()
    assert d.core.phase is SessionPhase.BOUND
    return d


def test_every_phase_takes_or_ignores_every_command_and_never_both() -> None:
    for phase in SessionPhase:
        takes, ignores = set(TRANSITIONS[phase]), IGNORED[phase]
        assert not takes & ignores, phase
        assert takes | ignores == set(Command), (phase, set(Command) - takes - ignores)


def test_a_command_outside_the_table_is_the_executors_mistake() -> None:
    core = SessionProtocol()
    core.phase = SessionPhase.CLOSED
    assert core.activate() == []  # ignored: closed for good
    IGNORED_BACKUP = IGNORED[SessionPhase.CLOSED]
    IGNORED[SessionPhase.CLOSED] = frozenset()
    try:
        with pytest.raises(LocalProtocolError, match="activate is not allowed in closed"):
            core.activate()
    finally:
        IGNORED[SessionPhase.CLOSED] = IGNORED_BACKUP


def test_activate_connect_bind_upload_acknowledge() -> None:
    d = Device()
    d.commit(b"one")  # before the session starts: nothing is sent
    assert d.uploaded == []
    d.activate()
    assert d.core.phase is SessionPhase.CONNECTING
    d.connect()
    assert d.core.phase is SessionPhase.BINDING
    d.serve()
    assert d.core.phase is SessionPhase.BOUND and d.uploaded == [1]
    waiter = d.wait_upload(1)
    d.serve()
    assert d.outcomes[waiter] == [None]
    assert d.core.upload_acked == 1 and d.core.in_flight == []
    assert d.states == [ConnectionState.CONNECTING, ConnectionState.CONNECTED]


def test_a_dropped_connection_sends_the_unacknowledged_uploads_again() -> None:
    d = bound_device()
    d.commit()
    d.commit()
    assert d.uploaded == [1, 2] and d.core.upload_sent == 2
    d.drop()
    assert d.core.phase is SessionPhase.DISCONNECTED
    assert d.core.in_flight == [] and d.core.upload_sent == 0
    assert d.states[-1] is ConnectionState.DISCONNECTED
    d.commit()  # offline: kept for later
    assert d.uploaded == [1, 2]
    d.run(d.core.connecting())
    d.connect()
    assert d.core.phase is SessionPhase.BINDING
    d.serve()
    # the server had integrated 1 and 2 (BOUND says so): only 3 goes again
    assert d.uploaded == [1, 2, 3] and d.core.upload_acked == 3


def test_a_slow_reconnect_holds_uploads_until_the_download_caught_up() -> None:
    d = bound_device()
    d.drop()
    d.commit()
    d.connect(slow=True)
    assert d.core.holding_uploads and d.core.held_count == 1
    link = d.link
    assert link is not None
    d.flush()
    for bind in link.binds:
        link.server.bound(bind.session, 0, 0)
    link.binds.clear()
    d.deliver()
    assert d.core.phase is SessionPhase.BOUND
    assert d.uploaded == [] and d.core.upload_room() is None  # held
    assert len(link.marks) == 1  # the hold asked the server where the download is
    d.serve()  # the MARK reply: the download caught up
    assert not d.core.holding_uploads and d.uploaded == [1]
    # a fast reconnect does not hold
    d.drop()
    d.connect()
    assert not d.core.holding_uploads and d.core.held_count == 1


def test_a_pause_ends_the_hold_and_fails_every_wait_once() -> None:
    d = bound_device()
    d.drop()
    d.commit()
    up, down = d.wait_upload(1), d.wait_download()
    d.connect(slow=True)
    d.pause()
    assert d.core.phase is SessionPhase.INACTIVE and not d.core.holding_uploads
    assert [type(e) for e in d.outcomes[up] + d.outcomes[down]] == [SessionInactiveError] * 2
    late = d.wait_download()
    assert isinstance(d.outcomes[late][0], SessionInactiveError)
    d.pause()  # again: nothing more
    assert len(d.outcomes[up]) == len(d.outcomes[down]) == 1


def test_pause_and_resume_before_unbound_waits_for_it() -> None:
    d = bound_device()
    first = d.session_no
    d.pause()
    link = d.link
    assert link is not None
    d.flush()
    assert link.unbinds == [first] and d.core.unbound_awaited == first
    d.activate()  # attached again under a new number before the UNBOUND came
    assert d.session_no != first
    assert d.core.phase is SessionPhase.WAITING_UNBOUND
    assert link.binds == []
    d.serve()  # UNBOUND, then the file binds under its new number
    assert d.core.phase is SessionPhase.BINDING and d.core.unbound_awaited is None
    assert [b.session for b in link.binds] == [d.session_no]
    d.serve()
    assert d.core.phase is SessionPhase.BOUND


def test_resume_after_the_connection_changed_does_not_wait_for_an_old_unbound() -> None:
    d = bound_device()
    d.pause()
    d.drop()
    d.connect()
    d.activate()
    assert d.core.phase is SessionPhase.BINDING


def test_a_session_error_suspends_then_rebinds_after_the_servers_delay() -> None:
    d = bound_device()
    first = d.session_no
    d.server_error(ErrorCode.OTHER_SESSION_ERROR, delay_ms=2000)
    assert d.core.phase is SessionPhase.SUSPENDED
    assert d.errors[-1].code == ErrorCode.OTHER_SESSION_ERROR
    d.commit()
    assert d.uploaded == []  # no upload while suspended
    d.advance(1.9)
    assert d.core.phase is SessionPhase.SUSPENDED
    d.advance(0.2)  # due: UNBIND the suspended number, join under a new one
    assert d.session_no != first
    assert d.core.phase is SessionPhase.WAITING_UNBOUND
    d.serve()
    assert d.core.phase is SessionPhase.BINDING
    d.serve()
    assert d.core.phase is SessionPhase.BOUND and d.uploaded == [1]


def test_a_stopping_error_pauses_the_session() -> None:
    d = bound_device()
    waiter = d.wait_download()
    d.server_error(ErrorCode.PERMISSION_DENIED)
    assert d.core.phase is SessionPhase.INACTIVE
    assert "the server stopped this session" in d.core.inactive_reason
    assert isinstance(d.outcomes[waiter][0], SessionInactiveError)


def test_a_suspended_session_waits_out_reconnects_and_reconnect_now_cuts_it_short() -> None:
    d = bound_device()
    d.run(d.core.disk_full(30.0, d.clock.now))
    assert d.core.phase is SessionPhase.SUSPENDED
    d.flush()
    assert d.link is not None and d.link.unbinds  # left the binding at once
    d.drop()
    d.connect()
    assert d.core.phase is SessionPhase.SUSPENDED  # the delay holds over a new connection
    d.advance(1.0)
    assert d.core.phase is SessionPhase.SUSPENDED
    d.reconnect_now()
    assert d.core.phase is SessionPhase.BINDING  # the new connection has no old session


def test_manual_reset_mode_stops_with_a_backup_report() -> None:
    d = bound_device(mode=ps.ResetMode.MANUAL)
    d.server_error(ErrorCode.CLIENT_RESET_NEEDED)
    assert d.manual_resets == ["refused"] and d.resets == []
    assert d.core.phase is SessionPhase.INACTIVE


@pytest.mark.parametrize("mode", [ps.ResetMode.RECOVER, ps.ResetMode.DISCARD])
def test_automatic_reset_starts_over_and_rebinds(mode: ps.ResetMode) -> None:
    d = bound_device(mode=mode)
    d.download_from_other()
    d.deliver()
    assert d.core.download_cursor == 1
    d.drop()
    d.commit()
    waiter = d.wait_upload(1)
    d.connect()
    link = d.link
    assert link is not None
    for bind in link.binds:  # BOUND without acknowledging the upload
        link.server.bound(bind.session, d.server_version, 0)
    link.binds.clear()
    d.deliver()
    assert d.uploaded == [1]
    d.server_acked = d.server_version = 0  # the server's data was wiped
    d.server_error(ErrorCode.CLIENT_RESET_NEEDED)
    assert d.resets == [mode is ps.ResetMode.RECOVER]
    assert (d.core.download_cursor, d.core.upload_acked, d.core.resets) == (0, 0, 1)
    assert d.core.renumber_pending
    if mode is ps.ResetMode.DISCARD:
        assert isinstance(d.outcomes[waiter][0], ClientResetError)
    else:
        assert waiter not in d.outcomes  # still waiting: the change is uploaded anew
    d.advance(0.0)  # the rebind comes at once
    d.serve()
    d.serve()
    assert d.core.phase is SessionPhase.BOUND and not d.core.renumber_pending
    d.serve()
    if mode is ps.ResetMode.RECOVER:  # uploaded anew and acknowledged
        assert d.uploaded == [1, 1] and d.outcomes[waiter] == [None]
    else:
        assert d.uploaded == [1] and d.core.upload_acked == 0


def test_too_many_resets_within_the_window_stop_then_the_window_passes() -> None:
    core = SessionProtocol()
    core.activate()
    for i in range(3):
        out = core.reset_needed("again", ps.ResetMode.RECOVER, 3, 300.0, float(i))
        assert any(isinstance(x, ps.ResetFile) for x in out)
        core.reset_done(True, float(i))
    out = core.reset_needed("again", ps.ResetMode.RECOVER, 3, 300.0, 10.0)
    [report] = [x for x in out if isinstance(x, ps.ReportError)]
    assert isinstance(report.error, ClientResetError) and "more than 3" in str(report.error)
    assert core.phase is SessionPhase.INACTIVE
    core.activate()
    out = core.reset_needed("later", ps.ResetMode.RECOVER, 3, 300.0, 400.0)
    assert any(isinstance(x, ps.ResetFile) for x in out)


def test_progress_counts_downloads_and_a_mark_reply_completes() -> None:
    d = bound_device()
    d.download_from_other(size=100)
    d.deliver()
    assert (d.core.down_transferred, d.core.down_remaining, d.core.down_known) == (100, 0, True)
    d.progress.clear()
    d.wait_download()
    d.serve()
    assert True in d.progress  # the MARK reply says the download is complete
    d.drop()
    assert not d.core.down_known  # the next binding's first DOWNLOAD says again


def test_the_upload_window_bounds_what_is_in_flight() -> None:
    d = bound_device()
    big = b"z" * (ps.UPLOAD_WINDOW_BYTES // 2)
    for _ in range(4):
        d.commit(big)
    # two and a bit fit; the rest waits for acknowledgements
    assert sum(n for _, n in d.core.in_flight) >= ps.UPLOAD_WINDOW_BYTES
    assert d.uploaded != [1, 2, 3, 4]
    d.serve()
    d.serve()
    assert d.uploaded == [1, 2, 3, 4]


def test_downloads_never_move_the_cursor_back() -> None:
    core = SessionProtocol(download_cursor=5)
    with pytest.raises(LocalProtocolError, match="behind"):
        core.downloaded(4, 0, 5, 0, 0)
