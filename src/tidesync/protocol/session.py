"""The client's sync session as a pure state machine: commands in, instructions out.

:class:`SessionProtocol` decides what one synced file does; the sync client's
``SessionWorker`` and ``Connection`` (``client/syncclient.py``) carry its instructions out
with the local engine, the socket and timers. Nothing here does I/O or reads a clock:
times come in as arguments (``now``, seconds on any monotonic clock).

Every command is a method that returns a list of :data:`Instruction` values to be carried
out in order. The session's state is one :class:`SessionPhase`; the commands that move it
are the keys of :data:`TRANSITIONS` (in the style of h11's ``_state.py``), and a command
not in a phase's row is either ignored (a stale event, listed in :data:`IGNORED`) or a
:class:`~tidesync.errors.LocalProtocolError` (the executor misused the machine). Beside the
phase the machine keeps data, never flags: the cursors, what was uploaded and not yet
acknowledged, the waiters (by the executor's keys), the MARK requests in flight, the
session number whose UNBOUND the file waits for, and the reset times.

Uploads are held back after a slow reconnect until the download caught up: that hold is
an ordinary download waiter (key :data:`HOLD`) of the machine itself, so it ends the way
waiters end (a MARK reply, or a pause that fails it).

docs/architecture.md, "The client session core", draws the table and says how the worker
executes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ..errors import ClientResetError, LocalProtocolError, SessionInactiveError, SyncAction
from ..errors import SyncError as SyncError
from .messages import ErrorCode

#: Upload at most this many bytes of changesets per UPLOAD message.
UPLOAD_BATCH_BYTES = 256 * 1024
#: Keep at most this many bytes uploaded but not yet acknowledged.
UPLOAD_WINDOW_BYTES = 4 * 1024 * 1024
#: The waiter key of the machine's own download wait that holds uploads back.
HOLD = -1


class ConnectionState(Enum):
    """A session's view of its connection to the server (what the app sees)."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class SessionPhase(Enum):
    """Where one synced file's session is."""

    INACTIVE = "inactive"  # not started, paused or stopped: nothing is sent
    DISCONNECTED = "disconnected"  # active; the connection is down, a retry will come
    CONNECTING = "connecting"  # active; a connection attempt is under way
    WAITING_UNBOUND = "waiting_unbound"  # connected; the file's last UNBIND is unanswered
    BINDING = "binding"  # BIND sent, waiting for BOUND
    BOUND = "bound"  # uploads and downloads flow
    SUSPENDED = "suspended"  # a session error or a full disk: binds again after a delay
    CLOSED = "closed"  # for good


class Command(Enum):
    """The commands that may move the phase (the columns of :data:`TRANSITIONS`)."""

    ACTIVATE = "activate"
    PAUSE = "pause"
    CLOSE = "close"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    UNBOUND = "unbound"
    BOUND = "bound"
    SUSPEND = "suspend"
    REBIND = "rebind"


P, C = SessionPhase, Command
_ACTIVE = (P.DISCONNECTED, P.CONNECTING, P.WAITING_UNBOUND, P.BINDING, P.BOUND, P.SUSPENDED)

#: phase -> command -> next phase. CONNECTED goes to BINDING, or to WAITING_UNBOUND when
#: the file's previous session on this connection is still unbinding (see ``connected``).
TRANSITIONS: dict[SessionPhase, dict[Command, SessionPhase]] = {
    P.INACTIVE: {C.ACTIVATE: P.CONNECTING, C.PAUSE: P.INACTIVE, C.CLOSE: P.CLOSED},
    P.DISCONNECTED: {C.CONNECTING: P.CONNECTING, C.CONNECTED: P.BINDING},
    P.CONNECTING: {C.CONNECTED: P.BINDING, C.DISCONNECTED: P.DISCONNECTED},
    P.WAITING_UNBOUND: {C.UNBOUND: P.BINDING, C.DISCONNECTED: P.DISCONNECTED},
    P.BINDING: {C.BOUND: P.BOUND, C.DISCONNECTED: P.DISCONNECTED},
    P.BOUND: {C.DISCONNECTED: P.DISCONNECTED},
    P.SUSPENDED: {C.REBIND: P.CONNECTING},
    P.CLOSED: {},
}
for _phase in _ACTIVE:
    TRANSITIONS[_phase] |= {C.PAUSE: P.INACTIVE, C.CLOSE: P.CLOSED}
for _phase in (P.CONNECTING, P.WAITING_UNBOUND, P.BINDING, P.BOUND):
    TRANSITIONS[_phase][C.CONNECTING] = P.CONNECTING  # a new attempt starts
for _phase in (P.DISCONNECTED, P.CONNECTING, P.WAITING_UNBOUND, P.BINDING, P.BOUND):
    TRANSITIONS[_phase][C.SUSPEND] = P.SUSPENDED

#: phase -> commands that leave it unchanged and do nothing: events that arrive late
#: (for a session that has moved on) or that the phase waits out.
IGNORED: dict[SessionPhase, frozenset[Command]] = {
    P.INACTIVE: frozenset(
        {C.CONNECTING, C.CONNECTED, C.DISCONNECTED, C.UNBOUND, C.BOUND, C.SUSPEND, C.REBIND}
    ),
    P.DISCONNECTED: frozenset({C.ACTIVATE, C.DISCONNECTED, C.UNBOUND, C.BOUND, C.REBIND}),
    P.CONNECTING: frozenset({C.ACTIVATE, C.UNBOUND, C.BOUND, C.REBIND}),
    P.WAITING_UNBOUND: frozenset({C.ACTIVATE, C.CONNECTED, C.BOUND, C.REBIND}),
    P.BINDING: frozenset({C.ACTIVATE, C.CONNECTED, C.UNBOUND, C.REBIND}),
    P.BOUND: frozenset({C.ACTIVATE, C.CONNECTED, C.UNBOUND, C.BOUND, C.REBIND}),
    # a suspended session waits for its timer, whatever the connection does
    P.SUSPENDED: frozenset(
        {C.ACTIVATE, C.CONNECTING, C.CONNECTED, C.DISCONNECTED, C.UNBOUND, C.BOUND, C.SUSPEND}
    ),
    P.CLOSED: frozenset(Command),
}
del _phase, P, C


# --- instructions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Attach:
    """Join the user's connection (a new session number); it then says ``connecting`` or
    ``connected``."""


@dataclass(frozen=True)
class Detach:
    """Leave the connection: send UNBIND if the session is on it (then ``unbind_sent``)."""


@dataclass(frozen=True)
class Unbind:
    """Send UNBIND for the session's number, staying attached (then ``unbind_sent``)."""


@dataclass(frozen=True)
class SendBind:
    """Send BIND for the file with these cursors."""

    download_cursor: int
    upload_acked: int


@dataclass(frozen=True)
class SendQuery:
    """Send the newest subscription set, if this binding has not sent it yet."""


@dataclass(frozen=True)
class SendUploads:
    """Upload from the change log while :meth:`SessionProtocol.upload_room` allows."""


@dataclass(frozen=True)
class SendMark:
    """Send MARK for these download waiters (then ``mark_sent`` with its request id)."""

    waiters: tuple[int, ...]


@dataclass(frozen=True)
class RebindAfter:
    """Call ``tick`` after ``delay`` seconds: the suspended session binds again then."""

    delay: float


@dataclass(frozen=True)
class ResetFile:
    """Reset the local file (``recover``: keep the unacknowledged changes), then call
    ``reset_done`` (or ``reset_failed``); ``message``: the server's words."""

    recover: bool
    message: str


@dataclass(frozen=True)
class ReportError:
    """Hand an error to the error handler."""

    error: SyncError


@dataclass(frozen=True)
class ReportManualReset:
    """Hand the error handler a ClientResetError with a backup copy of the file."""

    message: str


@dataclass(frozen=True)
class ResolveWaiter:
    """The wait with this key is done."""

    key: int


@dataclass(frozen=True)
class FailWaiter:
    """The wait with this key fails with ``error``."""

    key: int
    error: Exception


@dataclass(frozen=True)
class StoreAcked:
    """Write ``upload_acked`` to the file (the server acknowledged more uploads)."""

    upload_acked: int


@dataclass(frozen=True)
class SaveCursors:
    """Write the cursors memory holds to the file now."""


@dataclass(frozen=True)
class ConnectionChanged:
    """Tell the app the session's connection state (``reason``: why it went down)."""

    state: ConnectionState
    reason: str | None = None


@dataclass(frozen=True)
class Progress:
    """The counters changed: report progress (``download_complete``: a MARK reply)."""

    download_complete: bool = False


@dataclass(frozen=True)
class Bound:
    """The session is bound: the executor's own BOUND work (the clock check)."""


Instruction = (
    Attach
    | Detach
    | Unbind
    | SendBind
    | SendQuery
    | SendUploads
    | SendMark
    | RebindAfter
    | ResetFile
    | ReportError
    | ReportManualReset
    | ResolveWaiter
    | FailWaiter
    | StoreAcked
    | SaveCursors
    | ConnectionChanged
    | Progress
    | Bound
)


@dataclass(frozen=True)
class UploadRoom:
    """What the next UPLOAD may carry: changesets after ``after``, at most ``max_bytes``
    more in flight; ``renumber_first``: close the change log's gap first (``renumbered``)."""

    after: int
    max_bytes: int
    renumber_first: bool


class ResetMode(Enum):
    """The configured client reset mode, as the machine needs to know it."""

    MANUAL = "manual"
    RECOVER = "recover"
    DISCARD = "discard"


def too_many_resets_error(max_resets: int, window: float) -> ClientResetError:
    """The error of a session stopped because the server keeps demanding resets."""
    error = ClientResetError(
        f"the server demanded more than {max_resets} client resets within "
        f"{window:g} s; the session was stopped (resume it to try again)"
    )
    error.action = SyncAction.STOP
    return error


# --- the machine ---------------------------------------------------------------------------


class SessionProtocol:
    """One synced file's session: cursors, uploads in flight, waiters and the phase."""

    def __init__(self, download_cursor: int = 0, upload_acked: int = 0) -> None:
        self.phase = SessionPhase.INACTIVE
        self.download_cursor = download_cursor
        self.upload_acked = upload_acked
        self.upload_sent = upload_acked
        self.in_flight: list[tuple[int, int]] = []  # (version, size) sent, not acknowledged
        self.server_latest = 0
        self.downloadable_bytes = 0
        #: download progress: bytes received, outstanding, and whether the server said
        self.down_transferred = 0
        self.down_remaining = 0
        self.down_known = False
        self.inactive_reason = "the session is paused"
        self.upload_waiters: dict[int, int] = {}  # key -> local version to be acknowledged
        self.download_waiters: list[int] = []  # keys (HOLD among them while holding)
        self.marks: dict[int, list[int]] = {}  # MARK request id -> waiter keys
        #: the session number whose UNBOUND the file waits for before it may bind again
        self.unbound_awaited: int | None = None
        #: after a client reset: the change log may have to be renumbered before uploading
        self.renumber_pending = False
        self.upload_refused_reported = False
        self.held_count = 0  # slow reconnects that held uploads back
        self.resets = 0  # client resets done
        self._reset_times: list[float] = []
        self._rebind_at: float | None = None

    # --- the phase ---------------------------------------------------------------------

    def _move(self, command: Command) -> bool:
        """Apply ``command`` to the phase: True if it moved (or stayed by a table row),
        False if the phase ignores it; a command the phase neither takes nor ignores is
        the executor's mistake."""
        row = TRANSITIONS[self.phase]
        if command in row:
            self.phase = row[command]
            return True
        if command in IGNORED[self.phase]:
            return False
        raise LocalProtocolError(f"{command.value} is not allowed in {self.phase.value}")

    @property
    def active(self) -> bool:
        """Whether the session is started (not paused, stopped or closed)."""
        return self.phase not in (SessionPhase.INACTIVE, SessionPhase.CLOSED)

    @property
    def is_bound(self) -> bool:
        """Whether BOUND arrived on the current binding."""
        return self.phase is SessionPhase.BOUND

    @property
    def holding_uploads(self) -> bool:
        """Whether uploads wait for the download to catch up (after a slow reconnect)."""
        return HOLD in self.download_waiters

    # --- lifecycle ---------------------------------------------------------------------

    def activate(self) -> list[Instruction]:
        """Start (or resume) syncing."""
        if not self._move(Command.ACTIVATE):
            return []
        return [Attach()]

    def resume(self) -> list[Instruction]:
        """Resume a paused session (the same as :meth:`activate`)."""
        return self.activate()

    def pause(self, reason: str) -> list[Instruction]:
        """Stop syncing (``reason``: what waits started meanwhile fail with)."""
        was_active = self.active
        if not self._move(Command.PAUSE) or not was_active:
            return []
        return self._stopped(reason)

    def close(self, reason: str = "the database was closed") -> list[Instruction]:
        """End the session for good."""
        was_active = self.active
        if not self._move(Command.CLOSE):
            return []
        return self._stopped(reason) if was_active else []

    def _stopped(self, reason: str) -> list[Instruction]:
        self.inactive_reason = reason
        self._rebind_at = None
        self.down_known = False
        self._unsent()
        out: list[Instruction] = [SaveCursors(), Detach()]
        out.append(ConnectionChanged(ConnectionState.DISCONNECTED))
        err = SessionInactiveError(reason)
        keys = [*self.upload_waiters, *self.download_waiters]
        self.upload_waiters.clear()
        self.download_waiters.clear()
        self.marks.clear()
        out += [FailWaiter(k, err) for k in keys if k != HOLD]
        return out

    def resend(self) -> None:
        """What was uploaded and not acknowledged will be sent again (it was refused)."""
        self._unsent()

    def _unsent(self) -> None:
        """What was uploaded and not acknowledged will be sent again."""
        self.in_flight.clear()
        self.upload_sent = self.upload_acked

    # --- the connection ----------------------------------------------------------------

    def connecting(self) -> list[Instruction]:
        """A connection attempt starts (or the session joined one under way)."""
        if not self._move(Command.CONNECTING):
            return []
        return [ConnectionChanged(ConnectionState.CONNECTING)]

    def connected(self, *, slow: bool = False, unbind_open: bool = False) -> list[Instruction]:
        """The connection is open (WELCOME) with this session on it. ``slow``: it was down
        longer than the fast reconnect limit (uploads wait for the download to catch up);
        ``unbind_open``: the session named by :attr:`unbound_awaited` is still on this
        connection (its UNBOUND has not come)."""
        if not self._move(Command.CONNECTED):
            return []
        if slow and not self.holding_uploads:
            self.held_count += 1
            self.download_waiters.append(HOLD)
        if self.unbound_awaited is not None and unbind_open:
            self.phase = SessionPhase.WAITING_UNBOUND
            return [ConnectionChanged(ConnectionState.CONNECTING)]
        self.unbound_awaited = None
        return self._bind()

    def _bind(self) -> list[Instruction]:
        self.phase = SessionPhase.BINDING
        self.down_known = False  # the binding's first DOWNLOAD says what is outstanding
        return [
            SendBind(self.download_cursor, self.upload_acked),
            ConnectionChanged(ConnectionState.CONNECTING),
        ]

    def unbind_sent(self, session_no: int) -> None:
        """UNBIND went out for ``session_no``: the file binds again after its UNBOUND."""
        self.unbound_awaited = session_no

    def unbound(self, session_no: int) -> list[Instruction]:
        """UNBOUND arrived for ``session_no``."""
        if session_no != self.unbound_awaited:
            return []
        self.unbound_awaited = None
        if not self._move(Command.UNBOUND):
            return []
        return self._bind()

    def disconnected(self, reason: str | None = None) -> list[Instruction]:
        """The connection dropped (``reason``: why, in words)."""
        self.unbound_awaited = None  # the next connection has none of this one's sessions
        self.marks.clear()  # MARK replies are lost: waiters ask again on the next binding
        self._unsent()
        self.down_known = False
        if not self._move(Command.DISCONNECTED):
            return []
        return [ConnectionChanged(ConnectionState.DISCONNECTED, reason)]

    def bound(self, server_version: int, upload_acked: int) -> list[Instruction]:
        """BOUND: the server's view of the uploads; start uploading and re-ask marks."""
        if not self._move(Command.BOUND):
            return []
        self.server_latest = server_version
        out: list[Instruction] = []
        if upload_acked > self.upload_acked:
            out.append(StoreAcked(upload_acked))
            out += self._acked(upload_acked)
        self._unsent()
        out += [Bound(), ConnectionChanged(ConnectionState.CONNECTED), SendQuery(), SendUploads()]
        out += self._mark()
        out.append(Progress())
        return out

    # --- uploads -----------------------------------------------------------------------

    def local_committed(self) -> list[Instruction]:
        """A local transaction committed: upload it (and report progress)."""
        if self.phase is SessionPhase.CLOSED:
            return []
        return [SendUploads(), Progress()]

    def upload_room(self) -> UploadRoom | None:
        """What the next UPLOAD may carry, or None: not bound, held back, or the window is
        full."""
        if self.phase is not SessionPhase.BOUND or self.holding_uploads:
            return None
        left = UPLOAD_WINDOW_BYTES - sum(s for _, s in self.in_flight)
        if left <= 0:
            return None
        renumber = self.renumber_pending and self.upload_sent == self.upload_acked
        return UploadRoom(self.upload_sent, left, renumber)

    def uploads_sent(self, entries: Sequence[tuple[int, int]]) -> None:
        """An UPLOAD went out with these ``(version, size)`` changesets."""
        if not entries:
            return
        if entries[0][0] <= self.upload_sent:
            raise LocalProtocolError(
                f"upload of version {entries[0][0]}, already sent up to {self.upload_sent}"
            )
        self.upload_sent = entries[-1][0]
        self.in_flight.extend(entries)

    def renumbered(self, gap: int) -> None:
        """The change log's unacknowledged changesets were renumbered down by ``gap``
        (after a reset) so they follow the server's acknowledged version."""
        self.renumber_pending = False
        if gap <= 0:
            return
        acked = self.upload_acked
        self.upload_waiters = {
            k: t - gap if t > acked else t for k, t in self.upload_waiters.items()
        }

    def upload_refused(self, message: str) -> list[Instruction]:
        """The protocol cannot take a changeset (an old server's frame limit): reported
        once."""
        if self.upload_refused_reported:
            return []
        self.upload_refused_reported = True
        return [ReportError(SyncError(int(ErrorCode.LIMITS_EXCEEDED), message, SyncAction.RETRY))]

    def _acked(self, acked: int) -> list[Instruction]:
        """Everything up to ``acked`` is acknowledged: resolve upload waits."""
        if acked <= self.upload_acked:
            return []
        self.upload_acked = acked
        self.in_flight = [(v, s) for v, s in self.in_flight if v > acked]
        self.upload_sent = max(self.upload_sent, acked)
        done = [k for k, target in self.upload_waiters.items() if target <= acked]
        for k in done:
            del self.upload_waiters[k]
        return [Progress(), *(ResolveWaiter(k) for k in done)]

    def acknowledged(self, upload_acked: int) -> list[Instruction]:
        """The server acknowledged uploads up to ``upload_acked`` (stored by the caller)."""
        return self._acked(upload_acked)

    # --- downloads ---------------------------------------------------------------------

    def downloaded(
        self,
        cursor: int,
        upload_acked: int,
        latest_server_version: int,
        downloadable_bytes: int,
        size: int,
    ) -> list[Instruction]:
        """A DOWNLOAD was applied (and its cursor stored, or noted to be stored soon)."""
        if cursor < self.download_cursor:
            raise LocalProtocolError(
                f"download cursor {cursor} is behind the applied {self.download_cursor}"
            )
        self.download_cursor = cursor
        self.server_latest = latest_server_version
        self.downloadable_bytes = downloadable_bytes
        self.down_transferred += size
        self.down_remaining = downloadable_bytes
        self.down_known = True
        out = self._acked(upload_acked)
        return [*out, SendUploads(), Progress()]

    def wait_download(self, key: int) -> list[Instruction]:
        """Wait (``key``) until everything the server holds now is applied locally."""
        if not self.active:
            return [FailWaiter(key, SessionInactiveError(self.inactive_reason))]
        self.download_waiters.append(key)
        return self._mark()

    def wait_upload(self, key: int, target: int) -> list[Instruction]:
        """Wait (``key``) until every local version up to ``target`` is acknowledged."""
        if not self.active:
            return [FailWaiter(key, SessionInactiveError(self.inactive_reason))]
        if target <= self.upload_acked:
            return [ResolveWaiter(key)]
        self.upload_waiters[key] = target
        return [SendUploads()]

    def forget(self, key: int) -> None:
        """The executor gave up a wait (cancelled): it is resolved by no one."""
        self.upload_waiters.pop(key, None)
        if key in self.download_waiters:
            self.download_waiters.remove(key)
        for keys in self.marks.values():
            if key in keys:
                keys.remove(key)

    def _mark(self) -> list[Instruction]:
        if self.phase is not SessionPhase.BOUND:
            return []
        asked = {k for keys in self.marks.values() for k in keys}
        waiting = tuple(k for k in self.download_waiters if k not in asked)
        return [SendMark(waiting)] if waiting else []

    def mark_sent(self, request_id: int, waiters: Sequence[int]) -> None:
        """MARK ``request_id`` went out for ``waiters``."""
        self.marks[request_id] = [k for k in waiters if k in self.download_waiters]

    def mark_replied(self, request_id: int) -> list[Instruction]:
        """A MARK reply: everything up to its version was downloaded and applied."""
        out: list[Instruction] = [Progress(download_complete=True)]
        keys = self.marks.pop(request_id, [])
        for k in keys:
            if k in self.download_waiters:
                self.download_waiters.remove(k)
                if k == HOLD:
                    out.append(SendUploads())  # the hold ends
                else:
                    out.append(ResolveWaiter(k))
        return out

    # --- errors, rebinding, resets -------------------------------------------------------

    def error(
        self, code: int, message: str, action: SyncAction, retry_delay_ms: int | None, now: float
    ) -> list[Instruction]:
        """A session-level ERROR that suspends the session: report it, then stop (STOP,
        CLIENT_RESET) or bind again after the server's delay (1 s if it gave none)."""
        out: list[Instruction] = [ReportError(SyncError(code, message, action))]
        if action in (SyncAction.STOP, SyncAction.CLIENT_RESET):
            return out + self.pause(f"the server stopped this session: {message}")
        return out + self.suspend((retry_delay_ms or 1000) / 1000.0, now)

    def suspend(self, delay: float, now: float) -> list[Instruction]:
        """Take the session off the binding for ``delay`` seconds (a session error, or a
        full disk: nothing more is applied past the stored cursor), then bind again."""
        if not self._move(Command.SUSPEND):
            return []
        self.marks.clear()  # the suspended session answers none: waiters re-ask on rebind
        self._unsent()
        self._rebind_at = now + delay
        return [RebindAfter(delay)]

    def disk_full(self, delay: float, now: float) -> list[Instruction]:
        """The file's disk cannot take what the server sent (it was rolled back): leave the
        binding at once (UNBIND; what still comes for it is dropped) and bind again after
        ``delay`` seconds, from the stored cursor."""
        out = self.suspend(delay, now)
        if not out:
            return []
        return [Unbind(), ConnectionChanged(ConnectionState.CONNECTING), *out]

    def rebind_due_in(self, now: float) -> float | None:
        """Seconds until a suspended session binds again (0 or less: due; None: no rebind
        waits). A timer may fire a little early: the executor asks before ``tick``."""
        if self._rebind_at is None:
            return None
        return self._rebind_at - now

    def tick(self, now: float) -> list[Instruction]:
        """Time passed: a suspended session whose delay is over binds again (it leaves
        its old session number and joins the connection under a new one)."""
        due = self._rebind_at
        if due is None or now < due:
            return []
        self._rebind_at = None
        if not self._move(Command.REBIND):
            return []
        return [Detach(), Attach()]

    def rebind_now(self, now: float) -> list[Instruction]:
        """Cut a rebind delay short (``App.reconnect()``)."""
        if self._rebind_at is not None:
            self._rebind_at = now
        return self.tick(now)

    def reset_needed(
        self, message: str, mode: ResetMode, max_resets: int, window: float, now: float
    ) -> list[Instruction]:
        """ERROR 211: reset the file by ``mode``; manual mode, or more than ``max_resets``
        demands within ``window`` seconds, stop the session. Otherwise the session is
        suspended until the reset is done (``reset_done``)."""
        self._reset_times = [t for t in self._reset_times if now - t < window]
        if len(self._reset_times) >= max_resets:
            error = too_many_resets_error(max_resets, window)
            return [ReportError(error), *self.pause("the server keeps demanding client resets")]
        self._reset_times.append(now)
        if mode is ResetMode.MANUAL:
            reason = f"client reset needed (manual recovery): {message}"
            return [ReportManualReset(message), *self.pause(reason)]
        if self._move(Command.SUSPEND):
            self.marks.clear()
            self._rebind_at = None  # until the reset is done
        self._unsent()
        return [SaveCursors(), ResetFile(mode is ResetMode.RECOVER, message)]

    def reset_done(self, recovered: bool, now: float | None = None) -> list[Instruction]:
        """The file was reset (or its objects re-stamped and its changes applied again):
        the cursors start over; unless ``recovered``, the unacknowledged writes are gone
        and their waits fail. With ``now`` (after a client reset) a suspended session binds
        again at once."""
        self.resets += 1
        self.renumber_pending = True
        self.download_cursor = 0
        self.upload_acked = 0
        self._unsent()
        out: list[Instruction] = []
        if not recovered:
            err = ClientResetError("the unsynced changes were discarded by a client reset")
            out += [FailWaiter(k, err) for k in self.upload_waiters]
            self.upload_waiters.clear()
        out.append(Progress())
        if now is not None and self.phase is SessionPhase.SUSPENDED:
            self._rebind_at = now
            out.append(RebindAfter(0.0))
        return out

    def reset_failed(self, message: str, failure: str) -> list[Instruction]:
        """The automatic reset failed (``failure``, in words): a manual-recovery error, and
        the session stops."""
        report = ReportManualReset(f"{message} (the automatic reset failed: {failure})")
        return [report, *self.pause(f"the client reset failed: {failure}")]


__all__ = [
    "HOLD",
    "IGNORED",
    "TRANSITIONS",
    "Attach",
    "Bound",
    "Command",
    "ConnectionChanged",
    "ConnectionState",
    "Detach",
    "FailWaiter",
    "Instruction",
    "Progress",
    "RebindAfter",
    "ReportError",
    "ReportManualReset",
    "ResetFile",
    "ResetMode",
    "ResolveWaiter",
    "SaveCursors",
    "SendBind",
    "SendMark",
    "SendQuery",
    "SendUploads",
    "SessionPhase",
    "SessionProtocol",
    "StoreAcked",
    "Unbind",
    "UploadRoom",
    "too_many_resets_error",
]
