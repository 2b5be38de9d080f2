"""Registers the service subcommands (aggregator, agent, policy, sim, demo, ...)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from fedwb.demo import demo

    app.command(name="demo")(demo)
