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
    app.add_typer(tasks_app, name="tasks")


tasks_app = typer.Typer(help="Tasks this install can federate (built-ins and plugins).", no_args_is_help=True)


@tasks_app.command("list")
def tasks_list() -> None:
    """Built-in tasks and the plugins registered under the entry-point group fedwb.tasks."""
    from edge_agent.tasks import available

    for name, source in available().items():
        typer.echo(f"{name:<16} {source}")
    typer.echo("any other: --task package.module:Class (a Task subclass importable here)")
