"""The door of the server: what a connection may hold before it has logged in.

Someone without an account can open sockets and send bytes; this module bounds what that
costs the server, so normal clients keep logging in and syncing during such an attack:

- **connections per client address**: at most ``Limits.max_connections_per_address`` open
  at once from one peer address (HTTP and WebSocket alike); one more is closed at once,
  before a byte of it is read. Peers listed in ``trusted_proxies`` are exempt (every client
  behind a load balancer shares its address);
- **a deadline for the request head**: a connection that has not sent a complete HTTP
  request head within ``request_head_timeout`` seconds of connecting is closed (slow-loris:
  one byte every few seconds, forever);
- **a small frame limit before HELLO**: a sync WebSocket accepts frames of at most
  ``Limits.max_frame_bytes_before_hello`` until its HELLO is verified; then the full
  ``max_frame_size``. A 16 MiB frame from someone who never logs in is refused by its header
  (close 1009), before its payload is read;
- the HELLO itself must come within ``hello_timeout`` (``server/hub.py``).

It works at the level of uvicorn's protocol classes (the only place that sees a connection
before its request head is complete): :func:`protocol_classes` returns subclasses of
uvicorn's h11 and websockets-sansio protocols bound to one :class:`ConnectionGate`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger("tidesync.server.gate")

#: The ASGI scope extension a sync WebSocket's handler calls once HELLO is verified.
OPEN_FRAMES = "tidesync.open_frames"


class ConnectionGate:
    """Counts open connections per peer address (pure bookkeeping; the protocols call it)."""

    def __init__(self, per_address: int, trusted: tuple[str, ...] = ()) -> None:
        self.per_address = per_address
        self._trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]
        self._open: Counter[str] = Counter()
        self._held: dict[int, str] = {}
        #: Connections refused because their address had too many (for tests and logs).
        self.refused = 0

    def _exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def admit(self, transport: object, address: str) -> bool:
        """Count a new connection from ``address``; False if it must be closed."""
        if not self._exempt(address) and self._open[address] >= self.per_address:
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1, 2, 4, 8, ...: a log, not a flood
                log.warning(
                    "refused a connection from %s: it has %d open (limit %d; %d refused so far)",
                    address,
                    self._open[address],
                    self.per_address,
                    self.refused,
                )
            return False
        self._open[address] += 1
        self._held[id(transport)] = address
        return True

    def release(self, transport: object) -> None:
        """The connection on ``transport`` ended (idempotent: both protocols may call it)."""
        address = self._held.pop(id(transport), None)
        if address is not None:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]

    def open_from(self, address: str) -> int:
        """How many connections ``address`` has open."""
        return self._open.get(address, 0)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


def protocol_classes(
    gate: ConnectionGate, head_timeout: float, frame_limit_before_hello: int
) -> tuple[type[asyncio.Protocol], type[asyncio.Protocol]]:
    """uvicorn's HTTP and WebSocket protocol classes, gated by ``gate``."""

    class GatedWebSocket(WebSocketsSansIOProtocol):
        """A sync WebSocket whose frames are small until HELLO is verified."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._full_limit = _frame_limit(self.conn)
            _set_frame_limit(self.conn, frame_limit_before_hello)

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope = getattr(self, "scope", None)
            if isinstance(scope, dict):
                scope["extensions"][OPEN_FRAMES] = self._open_frames

        def _open_frames(self) -> None:
            _set_frame_limit(self.conn, self._full_limit)

        def connection_lost(self, exc: Exception | None) -> None:
            gate.release(self.transport)
            super().connection_lost(exc)

    class GatedHTTP(H11Protocol):
        """HTTP/1.1 with a per-address connection cap and a deadline for the first head."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ws_protocol_class = GatedWebSocket
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if not gate.admit(transport, _peer(transport)):
                transport.close()
                self.transport = None  # type: ignore[assignment]  # never served
                return
            super().connection_made(transport)  # type: ignore[arg-type]
            self._head_timer = self.loop.call_later(head_timeout, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            if getattr(self, "scope", None) is None and self.transport is not None:
                log.info(
                    "closed a connection from %s: no request head within %g s",
                    _peer(self.transport),
                    head_timeout,
                )
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport is None:
                return
            super().data_received(data)
            if self._head_timer is not None and getattr(self, "scope", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:
                return  # refused at the door
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            gate.release(self.transport)
            super().connection_lost(exc)

    return GatedHTTP, GatedWebSocket


def _frame_limit(conn: Any) -> int | None:
    name = "max_message_size" if hasattr(conn, "max_message_size") else "max_size"
    value = getattr(conn, name)
    return value if isinstance(value, int) else None


def _set_frame_limit(conn: Any, limit: int | None) -> None:
    """websockets >= 14 calls it ``max_message_size``, older releases ``max_size``."""
    name = "max_message_size" if hasattr(conn, "max_message_size") else "max_size"
    setattr(conn, name, limit)


def open_frames(scope: MutableMapping[str, Any]) -> None:
    """Lift a sync WebSocket's frame limit to the full ``max_frame_size`` (after HELLO)."""
    opener: Callable[[], None] | None = scope.get("extensions", {}).get(OPEN_FRAMES)
    if opener is not None:
        opener()
