"""``fedwb demo`` (what ``make demo`` runs): a small MNIST comparison and a heterogeneous CartPole run.

Everything is real: a broker (mosquitto when installed, else the embedded one), the
aggregator and agents as processes over MQTT. Under 3 minutes on a 2-core machine.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer


def demo(
    out: Annotated[str, typer.Option(help="Where results and plots go.")] = "runs/demo",
    rounds: Annotated[int, typer.Option(help="Global versions per MNIST run.")] = 4,
    cartpole_rounds: Annotated[int, typer.Option(help="Global versions of the CartPole run (1,000 steps each).")] = 30,
) -> None:
    """Compare FedAvg, FedWB (entropic, reg 0.1) and hybrid on MNIST with stragglers; then CartPole."""
    from sim.compare import format_table, run_compare
    from sim.runner import SimConfig, run_sim

    # hybrid switches after one FedWB fusion: with a shared init nothing later differs from FedAvg
    # (docs/results.md, "When to switch"), so one fusion shows the switch at the least cost
    t0 = time.perf_counter()
    typer.echo("fedwb demo 1/2: MNIST (offline 5k subset), 4 agents, quorum 3 (asynchronous), one agent 2x "
               f"slower, {rounds} rounds each of fedavg, fedwb-sinkhorn and hybrid")
    base = SimConfig(task="mnist", agents=4, rounds=rounds, quorum=3, stragglers="slow=0.25x2",
                     out=f"{out}/mnist", quick=True, live=False, switch_after=1)
    result = run_compare(base, ["fedavg", "fedwb-sinkhorn", "hybrid"], seeds=1, target=0.85)
    typer.echo(format_table(result))
    typer.echo(f"  figure: {result['figure']}")
    typer.echo("fedwb demo 2/2: CartPole, 3 agents with pole half-lengths 0.3, 0.5, 1.0 "
               f"(held out: 0.75), {cartpole_rounds} rounds of 1,000 steps, hybrid switch after 1")
    cp = run_sim(SimConfig(task="cartpole", agents=3, rounds=cartpole_rounds, policy="hybrid", switch_after=1,
                           pole_lengths=[0.3, 0.5, 1.0], held_out_lengths=[0.75], out=f"{out}/cartpole",
                           quick=True, live=False, local_steps=1000))
    typer.echo(f"{'version':8s} {'method':16s} " + " ".join(f"{k:>12s}" for k in cp["rounds"][-1]["eval"]))
    for r in cp["rounds"]:
        typer.echo(f"{r['version']:<8d} {r['method']:16s} " + " ".join(f"{v:12.1f}" for v in r["eval"].values()))
    typer.echo(f"  plots: {out}/cartpole/metric.png, {out}/mnist/compare.png")
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f}s")
