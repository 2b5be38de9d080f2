"""How every command reports an operator's error: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
