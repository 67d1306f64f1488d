"""Checking an app's ``base_url`` and app id when the configuration is made.

A bad URL found at construction is one clear :class:`~tidesync.ConfigurationError` naming
the URL and what is wrong, instead of a failure deep in a background connection later
(``docs/sync-session.md``, "Logging"). Pure functions: no I/O, no name lookups.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from ..errors import ConfigurationError

#: What an app id may hold: the server takes it as one URL path segment.
_APP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: The longest app id accepted.
APP_ID_MAX_LENGTH = 128
#: A host name: labels of letters (any script), digits, ``-`` and ``_``, joined by dots.
_HOST = re.compile(r"[^\W_]([\w-]*[^\W_])?(\.[^\W_]([\w-]*[^\W_])?)*\.?")


def check_app_id(app_id: object) -> None:
    """Raise :class:`ConfigurationError` unless ``app_id`` is a non-empty string of
    letters, digits, ``_``, ``.`` and ``-`` (starting with a letter or digit), at most
    :data:`APP_ID_MAX_LENGTH` long."""
    if not isinstance(app_id, str):
        raise ConfigurationError(f"the app id must be a string, not {app_id!r}")
    if not app_id:
        raise ConfigurationError("the app id is empty")
    if len(app_id) > APP_ID_MAX_LENGTH:
        raise ConfigurationError(
            f"the app id {app_id[:20]!r}... is {len(app_id)} characters long, "
            f"more than {APP_ID_MAX_LENGTH}"
        )
    if not _APP_ID.fullmatch(app_id):
        bad = next((c for c in app_id if not (c.isascii() and (c.isalnum() or c in "_.-"))), "")
        what = f"the character {bad!r}" if bad else "a first character that is no letter or digit"
        raise ConfigurationError(
            f"the app id {app_id!r} has {what}: an app id is letters, digits, '_', '.' and "
            "'-', starting with a letter or digit"
        )


def check_base_url(url: object) -> None:
    """Raise :class:`ConfigurationError` unless ``url`` is ``http://`` or ``https://``,
    a host (name, IPv4 or ``[IPv6]``), an optional port in 1-65535 and no path beyond an
    optional trailing ``/`` (no query, fragment or user name)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"base_url must be a string, not {url!r}")

    def bad(what: str) -> ConfigurationError:
        return ConfigurationError(f"base_url {url!r} is not usable: {what}")

    if url != url.strip() or any(c.isspace() for c in url):
        raise bad("it contains white space")
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise bad("it must start with http:// or https://")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of range or not a number, a broken [IPv6]
        raise bad(_port_problem(url, exc)) from None
    if parts.username is not None or parts.password is not None:
        raise bad("it holds a user name or password (log in with Credentials instead)")
    netloc = parts.netloc.rpartition("@")[2]
    host = parts.hostname or ""
    if not host:
        raise bad("it has no host")
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"[{host}] is not an IPv6 address") from None
    elif not _HOST.fullmatch(host):
        raise bad(f"{host!r} is not a host name or IP address")
    if port is not None and not 1 <= port <= 65535:
        raise bad(f"the port {port} is not in 1-65535")
    if netloc.endswith(":"):
        raise bad("the port after ':' is missing")
    if parts.path not in ("", "/"):
        raise bad(
            f"it has the path {parts.path!r}: give only the server's address (the client adds "
            "/api/v1/apps/<app id>/...)"
        )
    if parts.query or url.endswith("?"):
        raise bad("it has a query ('?...')")
    if parts.fragment or url.endswith("#"):
        raise bad("it has a fragment ('#...')")


def _port_problem(url: str, exc: ValueError) -> str:
    netloc = url.partition("://")[2].split("/")[0].split("?")[0].split("#")[0]
    after_host = netloc.rpartition("@")[2].rpartition("]")[2]
    port = after_host.rpartition(":")[2] if ":" in after_host else ""
    if port.isdigit() and not 1 <= int(port) <= 65535:
        return f"the port {int(port)} is not in 1-65535"
    if port and not port.isdigit():
        return f"the port {port!r} is not a number"
    return f"it cannot be read as a URL ({exc})"


def host_and_port(url: str) -> str:
    """``host:port`` of a checked base URL, the port filled in from the scheme (for
    messages such as "connection refused by 127.0.0.1:8765")."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
