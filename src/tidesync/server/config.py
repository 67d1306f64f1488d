"""The sync server's settings, in one immutable value.

Every tunable the server has (token lifetimes, frame limit, download page size, shutdown
grace) lives here so the CLI, the in-process runner and the tests configure the server the
same way, and so the defaults are written down once (``docs/server.md`` lists them).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..protocol.messages import DEFAULT_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE
from .limits import Limits
from .settings import AuthSettings
from .signing import KEY_RELOAD_INTERVAL

#: Default access token lifetime: 30 minutes.
DEFAULT_ACCESS_TOKEN_TTL = 1800.0
#: Default refresh token lifetime: 60 days.
DEFAULT_REFRESH_TOKEN_TTL = 60 * 24 * 3600.0
#: Default soft size of one DOWNLOAD page (instruction bytes).
DEFAULT_DOWNLOAD_PAGE_BYTES = 256 * 1024
#: How much larger than the protocol's frame limit the WebSocket layer's limit is, so the
#: protocol's own check (which answers with a clear ERROR) fires first.
WS_MAX_SIZE_SLACK = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of one sync server (all times in seconds, sizes in bytes).

    ``development_mode`` (the default) accepts any app id, anonymous login and whatever
    schema clients declare (merged additively).
    """

    access_token_ttl: float = DEFAULT_ACCESS_TOKEN_TTL
    refresh_token_ttl: float = DEFAULT_REFRESH_TOKEN_TTL
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    download_page_bytes: int = DEFAULT_DOWNLOAD_PAGE_BYTES
    development_mode: bool = True
    #: How long a new sync connection may take to send HELLO before it is closed.
    hello_timeout: float = 30.0
    #: How long shutdown waits for connections to say goodbye before cutting them.
    shutdown_grace: float = 5.0
    #: uvicorn's log level ("critical", "error", "warning", "info", "debug").
    log_level: str = "warning"
    #: Size and rate limits (``docs/security.md``).
    limits: Limits = field(default_factory=Limits)
    #: Declared apps, their auth providers, admin keys, token delivery.
    auth: AuthSettings = field(default_factory=AuthSettings)
    #: TLS certificate chain and private key (PEM files); both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: How long a refresh token replaced by rotation is still accepted (concurrent refreshes).
    refresh_reuse_grace: float = 30.0
    #: Where the sync data lives: "" for SQLite in the data folder, or a
    #: ``postgresql://user@host:port/db[?schema=name]`` URL (``docs/deploying.md``).
    storage_url: str = ""
    #: Trim sync history older than this many seconds (0: keep it all, the default).
    #: Devices whose cursor falls behind the trimmed point get a client reset
    #: (``docs/client-reset.md``).
    history_retention: float = 0.0
    #: How often expired refresh tokens and expired confirmation / reset tokens are deleted
    #: from the user store (seconds).
    token_purge_interval: float = 3600.0
    #: How often the token signing keys are read again from the user store, so a rotation
    #: (``tidesync keys rotate``) reaches every process (seconds).
    key_reload_interval: float = KEY_RELOAD_INTERVAL
    #: Addresses or networks (``10.0.0.0/8``) of the reverse proxies / load balancers in
    #: front of the server. ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed only
    #: from these peers; with none (the default) they are ignored, so a client cannot choose
    #: the address the rate limits count it under.
    trusted_proxies: tuple[str, ...] = ()
    #: How long a new connection may take to send a complete HTTP request head (seconds).
    request_head_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.access_token_ttl <= 0 or self.refresh_token_ttl <= 0:
            raise ValueError("token lifetimes must be positive")
        if self.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {MIN_MAX_FRAME_SIZE} bytes")
        if self.download_page_bytes < 1:
            raise ValueError("download_page_bytes must be positive")
        if self.hello_timeout <= 0:
            raise ValueError("hello_timeout must be positive")
        if not self.request_head_timeout > 0:
            raise ValueError("request_head_timeout must be a positive number of seconds")
        if not self.key_reload_interval > 0:
            raise ValueError("key_reload_interval must be a positive number of seconds")
        if not self.token_purge_interval > 0:
            raise ValueError("token_purge_interval must be a positive number of seconds")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must not be negative")
        if self.storage_url and not self.storage_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("storage_url must be empty (SQLite) or a postgresql:// URL")
        if not self.history_retention >= 0:
            raise ValueError("history_retention must be a non-negative number of seconds")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {proxy!r} is not an IP address or network"
                ) from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (tls_cert) and a key (tls_key)")

    @property
    def ws_max_size(self) -> int:
        """The WebSocket layer's message size limit: a little above the protocol's."""
        return self.max_frame_size + WS_MAX_SIZE_SLACK

    @property
    def page_bytes(self) -> int:
        """Instruction bytes per DOWNLOAD page, small enough to fit one frame."""
        return max(1, min(self.download_page_bytes, self.max_frame_size // 2))
