"""Random command sequences against the client session core (hypothesis.stateful): pauses,
resumes, reconnects, session errors, client resets, full disks, time passing and server
answers, in any order. After every step: no upload went out unless the session was bound
and not holding uploads back, no wait ended twice, the cursors never moved back (between
resets), and what is in flight lies between what was acknowledged and what was sent. At
the end a pause ends every wait left, so each wait ended exactly once."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tidesync.errors import ClientResetError, SessionInactiveError, SyncAction
from tidesync.protocol.messages import ErrorCode
from tidesync.protocol.session import SessionPhase

from .session_core_helpers import Device


class SessionMachine(RuleBasedStateMachine):
    """One device's session core, its server, and a fake clock."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Device()
        self.cursor = 0
        self.acked = 0
        self.resets = 0

    def _on_server(self) -> bool:
        d = self.d
        return (
            d.link is not None
            and d.session_no is not None
            and d.attached
            and d.link.server.is_bound(d.session_no)
        )

    @initialize(start=st.booleans())
    def begin(self, start: bool) -> None:
        """Half the runs start from a bound session that uploaded a change (the rest from
        nothing)."""
        if start:
            self.d.commit()
            self.d.activate()
            self.d.connect()
            self.d.serve()

    @rule()
    def activate(self) -> None:
        self.d.activate()
        self.d.flush()

    @rule()
    def pause(self) -> None:
        self.d.pause()
        self.d.flush()

    @precondition(lambda self: self.d.link is None)
    @rule(slow=st.booleans())
    def connect(self, slow: bool) -> None:
        self.d.run(self.d.core.connecting())
        self.d.connect(slow=slow)

    @precondition(lambda self: self.d.link is not None)
    @rule()
    def drop(self) -> None:
        self.d.drop()

    @rule(size=st.integers(1, 3))
    def commit(self, size: int) -> None:
        self.d.commit(b"c" * size)

    @rule(ahead=st.integers(0, 2))
    def wait_upload(self, ahead: int) -> None:
        last = self.d.changelog[-1][0] if self.d.changelog else 0
        self.d.wait_upload(last + ahead)

    @rule()
    def wait_download(self) -> None:
        self.d.wait_download()

    @precondition(lambda self: self.d.link is not None)
    @rule()
    def serve(self) -> None:
        self.d.serve()

    @precondition(lambda self: self.d.link is not None)
    @rule()
    def download_from_other(self) -> None:
        self.d.download_from_other()
        self.d.deliver()

    @precondition(lambda self: self._on_server())
    @rule(delay_ms=st.sampled_from([None, 0, 500, 3000]))
    def session_error(self, delay_ms: int | None) -> None:
        self.d.server_error(ErrorCode.OTHER_SESSION_ERROR, delay_ms, SyncAction.RETRY)

    @precondition(lambda self: self._on_server())
    @rule()
    def stopping_error(self) -> None:
        self.d.server_error(ErrorCode.PERMISSION_DENIED)

    @precondition(lambda self: self._on_server())
    @rule()
    def reset_demanded(self) -> None:
        self.d.server_error(ErrorCode.CLIENT_RESET_NEEDED)

    @precondition(lambda self: self.d.core.phase is SessionPhase.BOUND)
    @rule(delay=st.sampled_from([0.5, 2.0]))
    def disk_full(self, delay: float) -> None:
        self.d.run(self.d.core.disk_full(delay, self.d.clock.now))
        self.d.flush()

    @rule(seconds=st.sampled_from([0.1, 1.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.d.advance(seconds)

    @rule()
    def reconnect_now(self) -> None:
        self.d.reconnect_now()

    @invariant()
    def no_upload_unless_bound_and_not_held(self) -> None:
        assert all(phase is SessionPhase.BOUND and not held for phase, held in self.d.upload_phases)

    @invariant()
    def no_upload_while_paused(self) -> None:
        if not self.d.core.active:
            assert self.d.core.upload_room() is None

    @invariant()
    def waits_end_at_most_once(self) -> None:
        assert all(len(ends) == 1 for ends in self.d.outcomes.values())
        pending = set(self.d.core.upload_waiters) | set(self.d.core.download_waiters)
        assert not pending & set(self.d.outcomes)

    @invariant()
    def cursors_never_move_back(self) -> None:
        """(Between client resets: a reset starts them over.)"""
        core = self.d.core
        if core.resets != self.resets:
            self.resets, self.cursor, self.acked = core.resets, 0, 0
        assert core.download_cursor >= self.cursor and core.upload_acked >= self.acked
        self.cursor, self.acked = core.download_cursor, core.upload_acked

    @invariant()
    def in_flight_lies_between_acknowledged_and_sent(self) -> None:
        core = self.d.core
        assert core.upload_acked <= core.upload_sent
        assert all(core.upload_acked < v <= core.upload_sent for v, _ in core.in_flight)

    def teardown(self) -> None:
        d = self.d
        d.pause()
        assert all(len(ends) == 1 for ends in d.outcomes.values())
        assert set(d.outcomes) == set(range(1, d.next_key + 1))  # every wait ended
        assert not d.core.upload_waiters and not d.core.download_waiters
        for ends in d.outcomes.values():
            assert ends[0] is None or isinstance(ends[0], SessionInactiveError | ClientResetError)


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
