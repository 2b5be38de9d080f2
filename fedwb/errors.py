"""How every command reports an operator's error: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def read_secret(path: Path, option: str) -> str:
    """The first line of a secret file (a password); exit 2 naming ``option`` and the file when it
    cannot be read or is empty."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        fail(f"{option} {path}: {exc.strerror or exc}")
    if not lines or not lines[0].strip():
        fail(f"{option} {path}: empty")
    return lines[0].strip()
