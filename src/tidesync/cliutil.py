"""What every ``tidesync`` command shares: one-line errors and the usage exit status.

A mistake a user can make on the command line is one line on stderr, ``error: ...``, and
exit status 2 (:data:`USAGE_ERROR`); never a traceback.
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

#: Exit status of a usage mistake (bad option, unparsable configuration).
USAGE_ERROR = 2


def say_error(message: str) -> None:
    """Write ``error: MESSAGE`` on stderr as one line (newlines in it become spaces)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)


def fail(message: str, status: int = USAGE_ERROR) -> NoReturn:
    """Report a mistake as one ``error:`` line on stderr and exit with ``status``."""
    say_error(message)
    raise typer.Exit(status)


#: ``--server`` (or ``TIDESYNC_SERVER``): the sync server's URL.
ServerOption = Annotated[
    str, typer.Option("--server", envvar="TIDESYNC_SERVER", help="The sync server's URL.")
]
#: ``--app`` (or ``TIDESYNC_APP``): the app id.
AppOption = Annotated[str, typer.Option("--app", envvar="TIDESYNC_APP", help="The app id.")]
#: ``--admin-key`` (or ``TIDESYNC_ADMIN_KEY``): one of the server's admin keys.
AdminKeyOption = Annotated[
    str,
    typer.Option(
        "--admin-key", envvar="TIDESYNC_ADMIN_KEY", help="One of the server's admin keys."
    ),
]


def check_server_options(**given: str) -> None:
    """Fail naming every empty one of ``given`` (option name without dashes: value) and a
    ``server`` that is not an http(s) URL."""
    missing = [f"--{name.replace('_', '-')}" for name, value in given.items() if not value]
    if missing:
        envs = ", ".join(f"TIDESYNC_{name.upper()}" for name in given)
        fail(f"{', '.join(missing)} missing (or set {envs})")
    server = given.get("server", "")
    if not server.startswith(("http://", "https://")):
        fail(f"--server must be an http:// or https:// URL, not {server!r}")
