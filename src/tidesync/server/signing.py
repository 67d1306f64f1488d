"""Token signing keys and their rotation: which key signs now, which still verify.

Every access and refresh token names the key that signed it (the JWT header's ``kid``;
tokens without one were signed with :data:`DEFAULT_KID`, the server's first secret). A
deployment keeps a list of :class:`SigningKey` values in its user store. Rotating adds a
key that *starts signing later* (``signs_from``, two reload intervals ahead by default), so
every server process has loaded it before any token signed with it reaches one: no process
ever sees a token whose key it does not know yet. From then on the new key signs, and the
old one only verifies: until every token it signed has expired (``signs_from`` of its
successor plus the refresh-token lifetime), after which it is dropped.

Everything here is pure (the time is passed in); the stores keep the keys and
:class:`~tidesync.server.auth.Authenticator` loads them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

#: The id of the first secret (``secret.key`` or the PostgreSQL default row).
DEFAULT_KID = "default"
#: How often every server process re-reads the keys (seconds).
KEY_RELOAD_INTERVAL = 30.0
#: How long after a rotation the new key starts signing, by default (seconds).
DEFAULT_PROPAGATION = 4 * KEY_RELOAD_INTERVAL


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One HMAC secret tokens are signed with (``signs_from``: seconds since the epoch)."""

    kid: str
    secret: bytes
    signs_from: float

    def __repr__(self) -> str:  # never the secret
        return f"SigningKey({self.kid!r}, signs_from={self.signs_from})"


def current_key(keys: Iterable[SigningKey], now: float) -> SigningKey:
    """The key that signs at ``now``: the newest whose ``signs_from`` has come (the oldest
    key if none has, which only happens when a clock is far behind)."""
    ordered = sorted(keys, key=lambda k: (k.signs_from, k.kid))
    if not ordered:
        raise ValueError("there is no signing key")
    live = [k for k in ordered if k.signs_from <= now]
    return live[-1] if live else ordered[0]


def expired_keys(keys: Iterable[SigningKey], now: float, token_ttl: float) -> list[str]:
    """The kids of keys no token can still need: a key stops signing when its successor
    starts, and its last token expires ``token_ttl`` seconds after that."""
    ordered = sorted(keys, key=lambda k: (k.signs_from, k.kid))
    gone = []
    for older, newer in itertools.pairwise(ordered):
        if newer.signs_from <= now and newer.signs_from + token_ttl < now:
            gone.append(older.kid)
    return gone
