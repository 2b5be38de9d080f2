"""Registers the service subcommands (aggregator, agent, policy, sim, demo, ...)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from aggregator.cli import aggregator, policy_app
    from edge_agent.cli import agent
    from fedwb.demo import demo

    app.command(name="agent")(agent)

    app.command(name="aggregator")(aggregator)
    app.add_typer(policy_app, name="policy")
    app.command(name="demo")(demo)
