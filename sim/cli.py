"""``fedwb sim``, ``fedwb sim compare`` and ``fedwb evaluate``."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer

from schemas.connection import run_loop

sim_app = typer.Typer(help="Simulate a fleet locally: broker, aggregator and N agents as real processes.",
                      invoke_without_command=True)

_OPTS: dict = {}


def _specs(text: str | None) -> list[str]:
    """``'a=1;b=2'`` -> ``['a=1', 'b=2']``: ``;``-separated cartpole physics specs."""
    return [e.strip() for e in (text or "").split(";") if e.strip()]


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    if ":" in text:  # a range START:STOP:COUNT
        import numpy as np

        a, b, n = text.split(":")
        return [round(float(x), 4) for x in np.linspace(float(a), float(b), int(n))]
    return [float(x) for x in text.split(",") if x]


@sim_app.callback()
def sim(
    ctx: typer.Context,
    task: Annotated[str, typer.Option(help="mnist | cartpole | noop | a plugin (fedwb tasks list) | "
                                                      "package.module:Class")] = "mnist",
    agents: Annotated[int, typer.Option(help="Number of agents.")] = 5,
    rounds: Annotated[int, typer.Option(help="Global versions to produce.")] = 10,
    policy: Annotated[str, typer.Option(help="fedavg | fedwb | fedwb-sinkhorn | fedwb-neurons | hybrid")] = "fedavg",
    switch_after: Annotated[int | None, typer.Option(help="hybrid: FedWB fusions before FedAvg.")] = None,
    dispersion_below: Annotated[float | None, typer.Option(help="hybrid: switch to FedAvg at the first fusion "
                                                                "whose models' dispersion is below this.")] = None,
    reg: Annotated[float | None, typer.Option(help="Entropic regularization.")] = None,
    wb_method: Annotated[str | None, typer.Option(help="hybrid's FedWB phase: fedwb-sinkhorn | fedwb | "
                                                       "fedwb-neurons.")] = None,
    max_iter: Annotated[str | None, typer.Option(help="Entropic FedWB iterations ('paper': 10,000).")] = None,
    stop_threshold: Annotated[float | None, typer.Option(help="Entropic FedWB stopping error.")] = None,
    solver: Annotated[str | None, typer.Option(help="Entropic solver, as the aggregator's --solver: auto | plain | "
                                                    "plain-torch | triton | log | pot-plain | wide.")] = None,
    task_option: Annotated[list[str] | None, typer.Option(help="Task option KEY=VALUE for the agents and the "
                                                               "aggregator (repeatable).")] = None,
    server_lr: Annotated[float | None, typer.Option(help="Aggregator's server learning rate (1: plain).")] = None,
    clip_factor: Annotated[float | None, typer.Option(help="Aggregator's norm clipping (x median; 0 off) "
                                                           "[default: 3].")] = None,
    max_share: Annotated[float | None, typer.Option(help="Aggregator's weight-share cap [default: 2/quorum].")]
    = None,
    quorum: Annotated[int | None, typer.Option(help="Quorum (default: all agents).")] = None,
    deadline: Annotated[float | None, typer.Option(help="Round deadline in seconds.")] = None,
    stragglers: Annotated[str | None, typer.Option(help="e.g. slow=0.3x4,delay=lognormal:-1.5:0.5,"
                                                        "drop=0.1,crash=0.05")] = None,
    broker: Annotated[str, typer.Option(help="auto | embedded | mosquitto | mqtt://HOST:PORT")] = "auto",
    job: Annotated[str | None, typer.Option(help="Job name (default: generated).")] = None,
    out: Annotated[str, typer.Option(help="Output directory.")] = "runs/sim",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    quick: Annotated[bool, typer.Option(help="Small budgets, for CI and demos.")] = False,
    partition: Annotated[str, typer.Option(help="mnist: iid | dirichlet:ALPHA")] = "iid",
    pole_lengths: Annotated[str | None, typer.Option(help="cartpole: a,b,c or START:STOP:COUNT.")] = None,
    held_out: Annotated[str | None, typer.Option(help="cartpole: held-out pole lengths a,b.")] = None,
    env_params: Annotated[str | None, typer.Option(
        help="cartpole: each agent's physics, ';'-separated and cycled, e.g. 'length=0.25,masspole=0.05;"
             "masscart=2,force_mag=7' (keys length, masspole, masscart, force_mag; a spec without length "
             "takes the agent's --pole-lengths entry). Each is also evaluated.")] = None,
    held_out_envs: Annotated[str | None, typer.Option(
        help="cartpole: held-out physics, ';'-separated specs as --env-params, evaluated only.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="mnist: local epochs per round.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="cartpole: env steps per round.")] = None,
    model: Annotated[str, typer.Option(help="mnist: mlp | cnn")] = "mlp",
    init: Annotated[str, typer.Option(help="Agents' first round: global | own (each from its own random init).")
                    ] = "global",
    pretrain: Annotated[int, typer.Option(help="With --init own: extra local budget before the first update "
                                               "(cartpole: steps each agent trains alone).")] = 0,
    preset: Annotated[str, typer.Option(help="cartpole: stable (default recipe) | paper (the authors' protocol: "
                                             "10 agents' lengths, 100 steps a round)")] = "stable",
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 1800.0,
) -> None:
    """Run one simulation (or, with `compare`, several); writes summary.json, rounds.jsonl, plots."""
    from sim.runner import SimConfig, run_sim

    kwargs = dict(task=task, agents=agents, rounds=rounds, policy=policy, switch_after=switch_after,
                  dispersion_below=dispersion_below, reg=reg,
                  wb_method=wb_method, max_iter=max_iter, stop_threshold=stop_threshold, solver=solver,
                  task_options=tuple(task_option or ()), server_lr=server_lr, clip_factor=clip_factor,
                  max_share=max_share, quorum=quorum, deadline=deadline,
                  stragglers=stragglers, broker=broker, job=job, out=out,
                  seed=seed, quick=quick, partition=partition, local_epochs=local_epochs,
                  local_steps=local_steps, model=model, preset=preset, init=init, pretrain=pretrain,
                  timeout=timeout)
    if pole_lengths:
        kwargs["pole_lengths"] = _floats(pole_lengths)
    if held_out:
        kwargs["held_out_lengths"] = _floats(held_out)
    kwargs["env_params"], kwargs["held_out_envs"] = _specs(env_params), _specs(held_out_envs)
    try:
        cfg = SimConfig(**kwargs, check_policy=ctx.invoked_subcommand is None)  # a sweep checks each cell
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _OPTS["cfg"] = cfg
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        summary = run_sim(cfg)
    except KeyboardInterrupt:
        typer.echo("interrupted; every process was stopped", err=True)
        raise typer.Exit(130) from None
    except ValueError as exc:  # the operator's (e.g. more agents than this machine holds): nothing was started
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    final = summary["totals"]["final"]
    typer.echo(f"done: {len(summary['rounds'])} rounds in {summary['totals']['wall_seconds']:.0f}s; final "
               f"{json.dumps(final)}; results in {cfg.out}")


@sim_app.command("compare")
def compare(
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = "fedavg,fedwb,fedwb-sinkhorn,hybrid",
    seeds: Annotated[int, typer.Option(help="Seeds per policy.")] = 3,
    target: Annotated[float | None, typer.Option(help="Target metric (default 0.9 mnist, 475 cartpole).")] = None,
) -> None:
    """Run every policy with every seed; one comparison figure and a rounds/seconds-to-target table."""
    from fedwb.errors import fail
    from sim.compare import format_table, run_compare

    cfg = _OPTS["cfg"]
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names or seeds < 1:
        fail(f"--policies needs at least one policy and --seeds at least 1 (got {policies!r}, {seeds})")
    try:
        result = run_compare(cfg, names, seeds, target)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(format_table(result))
    typer.echo(f"figure: {result['figure']}")


@sim_app.command("sweep")
def sweep(
    grid: Annotated[list[str], typer.Option(help="An axis KEY=V1,V2,... over any sim option (repeatable), e.g. "
                                                 "policy=fedavg,hybrid switch-after=1,3 seed=0,1,2.")],
    target: Annotated[float | None, typer.Option(help="Target metric (default 0.9 mnist, 475 cartpole).")] = None,
) -> None:
    """Run a grid of simulations one after another (resumable: finished cells are kept in OUT/sweep.jsonl),
    then print mean and 95 % interval over seeds per cell; figures in OUT.

    Grid: one --grid KEY=V1,V2,... per axis, KEY any scalar sim option; every combination is a cell.

    Values take the option's type (null unsets an optional one); an axis or value given twice is an error.

    Re-running the same command resumes; a cell finished with other options is an error (use another --out).

    A new --target is applied to finished cells from their per-version records."""
    from fedwb.errors import fail
    from sim.sweep import format_summary, parse_grid, run_sweep

    try:
        axes = parse_grid(grid)
    except ValueError as exc:
        fail(str(exc))
    try:
        summary = run_sweep(_OPTS["cfg"], axes, target, progress=lambda m: typer.echo(m, err=True))
    except ValueError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted; finished cells are kept (run the same command to resume)", err=True)
        raise typer.Exit(130) from None
    typer.echo(format_summary(summary))
    typer.echo("figures: " + ", ".join(summary["figures"]))


def evaluate(
    broker: Annotated[str, typer.Option(help="Broker URL.")] = "mqtt://127.0.0.1:1883",
    job: Annotated[str, typer.Option(help="Job name.")] = "default",
    task: Annotated[str, typer.Option(help="mnist | cartpole | noop | a plugin (fedwb tasks list) | "
                                                      "package.module:Class")] = "mnist",
    task_option: Annotated[list[str] | None, typer.Option(help="Task option KEY=VALUE.")] = None,
    out: Annotated[str | None, typer.Option(help="Append records to this JSONL file.")] = None,
) -> None:
    """Evaluate every global version of a job as it is published (beside the aggregator)."""
    import asyncio
    import signal

    from aggregator.cli import parse_task_options
    from sim.evaluator import Evaluator

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    def record(rec: dict) -> None:
        line = json.dumps(rec)
        typer.echo(line)
        if out:
            try:
                with open(out, "a") as f:
                    f.write(line + "\n")
            except OSError as exc:  # a full disk: the record is on stdout still; the evaluator keeps going
                typer.echo(f"warning: --out {out}: v{rec.get('version')} not written ({exc.strerror or exc})",
                           err=True)

    from aggregator.cli import check_broker_url, check_task
    from fedwb.errors import fail

    check_task(task)
    check_broker_url(broker)
    if out:
        try:  # an --out that cannot be written is an error now, not a silent stop at the first record
            open(out, "a").close()
        except OSError as exc:
            fail(f"--out {out}: {exc.strerror or exc}")

    async def main() -> str | None:
        ev = Evaluator(broker, job, task, parse_task_options(task_option), record)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, ev.stop)
        await ev.run()
        return ev.fatal

    fatal = run_loop(main())
    if fatal is not None:
        fail(fatal)
