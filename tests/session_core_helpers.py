"""A pure executor of the client session core (protocol/session.py) for tests: no sockets,
no engine, no loop. A :class:`Device` carries out the core's instructions against a
``ClientProtocol`` joined in memory to a ``ServerProtocol`` (a fresh pair per connection),
keeps its change log in a list and its timers against a :class:`FakeClock`, and records
what it did, so tests can check what the core decided and that the protocol accepted it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidesync.errors import SyncAction, SyncError
from tidesync.protocol import session as ps
from tidesync.protocol.client import (
    ClientProtocol,
    DownloadReceived,
    ErrorReceived,
    MarkReplied,
    SessionBound,
    SessionUnbound,
)
from tidesync.protocol.messages import DownloadChangeset, ErrorCode
from tidesync.protocol.server import (
    BindReceived,
    MarkReceived,
    ServerProtocol,
    UnbindReceived,
    UploadReceived,
)
from tidesync.protocol.session import ConnectionState, SessionPhase, SessionProtocol

SCHEMA = [{"name": "Task", "primary_key": "id", "fields": [{"name": "id", "kind": "int"}]}]


@dataclass
class FakeClock:
    """Seconds that pass only when a test says so."""

    now: float = 0.0


@dataclass
class Link:
    """One connection: a client and a server protocol in memory."""

    client: ClientProtocol
    server: ServerProtocol
    binds: list[BindReceived] = field(default_factory=list)
    marks: list[MarkReceived] = field(default_factory=list)
    unbinds: list[int] = field(default_factory=list)


class Device:
    """A synced file driven by the core, with an in-memory server."""

    def __init__(self, *, mode: ps.ResetMode = ps.ResetMode.RECOVER) -> None:
        self.core = SessionProtocol()
        self.clock = FakeClock()
        self.mode = mode
        self.changelog: list[tuple[int, bytes]] = []
        self.link: Link | None = None
        self.session_no: int | None = None
        self.next_no = 1
        self.attached = False
        self.timers: list[float] = []
        self.outcomes: dict[int, list[Any]] = {}  # waiter key -> what it ended with
        self.next_key = 0
        self.errors: list[SyncError] = []
        self.manual_resets: list[str] = []
        self.states: list[ConnectionState] = []
        self.resets: list[bool] = []
        self.progress: list[bool] = []
        self.uploaded: list[int] = []  # versions, in the order they were sent
        self.upload_phases: list[tuple[SessionPhase, bool]] = []
        #: the server's view: what it integrated, and its latest version
        self.server_acked = 0
        self.server_version = 0

    # --- executing the core ------------------------------------------------------------

    def run(self, instructions: list[ps.Instruction]) -> None:
        for ins in instructions:
            self._do(ins)

    def _do(self, ins: ps.Instruction) -> None:
        link = self.link
        match ins:
            case ps.Attach():
                self.attached = True
                self.session_no = self.next_no
                self.next_no += 1
                if link is not None:
                    self._connected(slow=False)
                else:
                    self.run(self.core.connecting())
            case ps.Detach():
                self._unbind()
                self.attached = False
            case ps.Unbind():
                self._unbind()
            case ps.SendBind(download_cursor=cursor, upload_acked=acked):
                assert link is not None and self.session_no is not None
                last = self.changelog[-1][0] if self.changelog else 0
                link.client.bind(
                    self.session_no, "file-A", SCHEMA, cursor, acked, local_version=last
                )
            case ps.SendUploads():
                self._pump()
            case ps.SendMark(waiters=keys):
                assert link is not None and self.session_no is not None
                self.core.mark_sent(link.client.mark(self.session_no), keys)
            case ps.RebindAfter(delay=delay):
                self.timers.append(self.clock.now + delay)
            case ps.ResetFile(recover=recover):
                self.resets.append(recover)
                if not recover:
                    self.changelog = [(v, d) for v, d in self.changelog if v <= 0]
                self.run(self.core.reset_done(recover, self.clock.now))
            case ps.ReportError(error=error):
                self.errors.append(error)
            case ps.ReportManualReset(message=message):
                self.manual_resets.append(message)
            case ps.ResolveWaiter(key=key):
                self.outcomes.setdefault(key, []).append(None)
            case ps.FailWaiter(key=key, error=error):
                self.outcomes.setdefault(key, []).append(error)
            case ps.ConnectionChanged(state=state):
                if not self.states or self.states[-1] is not state:
                    self.states.append(state)
            case ps.Progress(download_complete=complete):
                self.progress.append(complete)
            case ps.StoreAcked() | ps.SaveCursors() | ps.Bound() | ps.SendQuery():
                pass

    def _unbind(self) -> None:
        link, no = self.link, self.session_no
        if link is None or no is None or not self.attached or not link.client.has_session(no):
            return
        try:
            link.client.unbind(no)
        except Exception:
            return  # already unbinding
        self.core.unbind_sent(no)

    def _pump(self) -> None:
        link, no = self.link, self.session_no
        if link is None or no is None:
            return
        while (room := self.core.upload_room()) is not None:
            if room.renumber_first:
                self.core.renumbered(0)
                continue
            entries = [(v, d) for v, d in self.changelog if v > room.after][:2]
            if not entries:
                break
            self.upload_phases.append((self.core.phase, self.core.holding_uploads))
            from tidesync.protocol.messages import UploadChangeset

            link.client.upload(
                no, [UploadChangeset(v, d) for v, d in entries], self.core.download_cursor
            )
            self.uploaded += [v for v, _ in entries]
            self.core.uploads_sent([(v, len(d)) for v, d in entries])

    def _connected(self, slow: bool) -> None:
        link = self.link
        assert link is not None
        awaited = self.core.unbound_awaited
        still = awaited is not None and link.client.has_session(awaited)
        self.run(self.core.connected(slow=slow, unbind_open=still))

    # --- the app and the network -------------------------------------------------------

    def activate(self) -> None:
        self.run(self.core.activate())

    def pause(self) -> None:
        self.run(self.core.pause("the session is paused"))

    def commit(self, data: bytes = b"x") -> int:
        version = (self.changelog[-1][0] if self.changelog else 0) + 1
        self.changelog.append((version, data))
        self.run(self.core.local_committed())
        self.flush()
        return version

    def wait_upload(self, target: int) -> int:
        self.next_key += 1
        self.run(self.core.wait_upload(self.next_key, target))
        self.flush()
        return self.next_key

    def wait_download(self) -> int:
        self.next_key += 1
        self.run(self.core.wait_download(self.next_key))
        self.flush()
        return self.next_key

    def connect(self, *, slow: bool = False) -> None:
        """A connection opens (HELLO, WELCOME); the attached session binds on it."""
        client, server = ClientProtocol(), ServerProtocol()
        client.start("token")
        for frame in client.data_to_send():
            server.receive_data(frame)
        server.welcome(0, "c")
        for frame in server.data_to_send():
            client.receive_data(frame)
        self.link = Link(client, server)
        if self.attached:
            self._connected(slow)
        self.flush()

    def drop(self) -> None:
        """The connection is gone."""
        self.link = None
        self.run(self.core.disconnected("the connection dropped"))

    def advance(self, seconds: float) -> None:
        """Time passes: due timers fire (``tick``)."""
        self.clock.now += seconds
        due = [t for t in self.timers if t <= self.clock.now]
        self.timers = [t for t in self.timers if t > self.clock.now]
        if due:
            self.run(self.core.tick(self.clock.now))
            self.flush()

    def reconnect_now(self) -> None:
        """``App.reconnect()``: a rebind delay is cut short."""
        self.timers.clear()
        self.run(self.core.rebind_now(self.clock.now))
        self.flush()

    def flush(self) -> None:
        """Frames the client queued reach the server."""
        link = self.link
        if link is None:
            return
        for frame in link.client.data_to_send():
            for ev in link.server.receive_data(frame):
                if isinstance(ev, BindReceived):
                    link.binds.append(ev)
                elif isinstance(ev, MarkReceived):
                    link.marks.append(ev)
                elif isinstance(ev, UnbindReceived):
                    link.unbinds.append(ev.session)
                elif isinstance(ev, UploadReceived):
                    for cs in ev.changesets:
                        if cs.version > self.server_acked:
                            self.server_acked = cs.version
                            self.server_version += 1

    def deliver(self) -> None:
        """Frames the server queued reach the client; the core takes the events."""
        link = self.link
        if link is None:
            return
        for frame in link.server.data_to_send():
            for ev in link.client.receive_data(frame):
                self._event(ev)
        self.flush()

    def _event(self, ev: Any) -> None:
        core, now = self.core, self.clock.now
        if isinstance(ev, SessionBound):
            self.run(core.bound(ev.server_version, ev.upload_acked))
        elif isinstance(ev, DownloadReceived):
            self.run(
                core.downloaded(
                    ev.cursor,
                    ev.upload_acked,
                    ev.latest_server_version,
                    ev.downloadable_bytes,
                    ev.size,
                )
            )
        elif isinstance(ev, MarkReplied):
            self.run(core.mark_replied(ev.request_id))
        elif isinstance(ev, SessionUnbound):
            self.run(core.unbound(ev.session))
        elif isinstance(ev, ErrorReceived) and ev.session is not None:
            if ev.code == ErrorCode.CLIENT_RESET_NEEDED:
                self.run(core.reset_needed(ev.message, self.mode, 3, 300.0, now))
            else:
                self.run(core.error(ev.code, ev.message, ev.action, ev.retry_delay_ms, now))

    # --- the server's answers ----------------------------------------------------------

    def serve(self) -> None:
        """The server answers every BIND, UNBIND and MARK it holds, acknowledging the
        uploads it got; then the client takes the answers."""
        link = self.link
        assert link is not None
        self.flush()
        gone = set(link.unbinds)  # a BIND unbound before its answer is only UNBOUND
        for bind in link.binds:
            if bind.session in gone:
                continue
            acked = max(bind.upload_acked, min(self.server_acked, self._local_last()))
            link.server.bound(bind.session, max(self.server_version, bind.download_cursor), acked)
        link.binds.clear()
        for no in link.unbinds:
            link.server.unbound(no)
        link.unbinds.clear()
        self.ack()
        self.deliver()
        self.ack()  # what the answers made the client upload
        for mark in link.marks:
            if link.server.is_bound(mark.session):
                link.server.mark_reply(mark.session, mark.request_id, self.server_version)
        link.marks.clear()
        self.deliver()

    def _local_last(self) -> int:
        return self.changelog[-1][0] if self.changelog else 0

    def ack(self) -> None:
        """The server sends a DOWNLOAD that acknowledges every upload it integrated."""
        link, no = self.link, self.session_no
        if link is None or no is None or not link.server.is_bound(no):
            return
        link.server.download(no, [], self.server_version, self.server_version, 0, self.server_acked)

    def download_from_other(self, size: int = 10) -> None:
        """Another device's changeset arrives at the server and is sent here."""
        link, no = self.link, self.session_no
        self.server_version += 1
        if link is None or no is None or not link.server.is_bound(no):
            return
        cs = DownloadChangeset(self.server_version, "file-B", 1, b"y" * size)
        link.server.download(
            no, [cs], self.server_version, self.server_version, 0, self.server_acked
        )

    def server_error(
        self, code: ErrorCode, delay_ms: int | None = None, action: SyncAction | None = None
    ) -> None:
        """The server suspends the session with a session-level ERROR."""
        link, no = self.link, self.session_no
        assert link is not None and no is not None
        link.server.error(code, "refused", action=action, retry_delay_ms=delay_ms, session=no)
        self.deliver()
