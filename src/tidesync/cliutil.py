"""What every ``tidesync`` command shares: one-line errors and the usage exit status.

A mistake a user can make on the command line is one line on stderr, ``error: ...``, and
exit status 2 (:data:`USAGE_ERROR`); never a traceback.
"""

from __future__ import annotations

from typing import NoReturn

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
