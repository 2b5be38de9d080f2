"""Registers the service subcommands (aggregator, agent, policy, sim, demo, ...)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from aggregator.cli import aggregator, policy_app
    from edge_agent.cli import agent
    from fedwb.demo import demo
    from sim.cli import evaluate, sim_app

    app.command(name="agent")(agent)
    app.add_typer(sim_app, name="sim")
    app.command(name="evaluate")(evaluate)

    app.command(name="aggregator")(aggregator)
    app.add_typer(policy_app, name="policy")
    app.command(name="demo")(demo)
