"""What the entropic barycenter's iteration count does to a fused model (the study of issue 13).

    python -m bench.iterations --json [--seeds 3] [--agents 5] [--iters 1,10,100,1000,10000] [--regs 0.01,0.1,1]

In process, no broker: the MNIST MLP (offline 5k subset), a shared global model trained
for one epoch, then ``--agents`` IID shards each train one local epoch from it, and the
updates are fused once by ``fedwb-sinkhorn`` for every (reg, max_iter) pair with
``stop_threshold = 0`` (so exactly ``max_iter`` iterations), and by FedAvg and the exact
barycenter. Per cell: test accuracy of the fused model, its relative distance to FedAvg
and to the exact barycenter, the solver's final error, and the seconds it took. Also the
authors' exact call (``solver pot-plain``: POT's plain iteration, dense) where the tensor
sizes allow it, with the tensors whose result was not finite.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aggregator.fusion import fuse_with_report
from bench.common import emit, machine, progress
from edge_agent.tasks import get_task


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(b[k].double().norm() ** 2) for k in b)
    return (num / den) ** 0.5


def _round(seed: int, agents: int) -> tuple:
    """A global model after one epoch (the evaluator's task) and ``agents`` one-epoch updates from it."""
    torch.manual_seed(seed)
    server = get_task("mnist", seed=seed)
    start = server.train(server.initial_weights(), 1).weights
    updates = [get_task("mnist", seed=seed * 100 + i, shard=f"{i}/{agents}", partition_seed=seed)
               .train(start, 1).weights for i in range(agents)]
    return server, start, updates


def one_seed(seed: int, agents: int, iters: list[int], regs: list[float]) -> dict:
    """One shared start, ``agents`` local epochs, every fusion variant on the same updates."""
    server, _, updates = _round(seed, agents)
    lam = [1.0] * agents
    avg, _ = fuse_with_report(updates, lam, "fedavg")
    exact, _ = fuse_with_report(updates, lam, "fedwb")
    out = {"seed": seed, "fedavg_accuracy": server.evaluate(avg)["accuracy"],
           "exact_accuracy": server.evaluate(exact)["accuracy"], "exact_to_fedavg": _rel(exact, avg), "cells": []}
    for reg in regs:
        for n_it in iters:
            t0 = time.perf_counter()
            fused, rep = fuse_with_report(updates, lam, "fedwb-sinkhorn", reg=reg, max_iter=n_it, stop_threshold=0.0,
                                          warn=False)
            cell = {"reg": reg, "max_iter": n_it, "seconds": time.perf_counter() - t0,
                    "accuracy": server.evaluate(fused)["accuracy"], "to_fedavg": _rel(fused, avg),
                    "to_exact": _rel(fused, exact), "error": rep.sinkhorn_error,
                    "escaped_tensors": len(rep.sinkhorn_escaped)}  # left the plain range, continued wide (CPU)
            out["cells"].append(cell)
            progress(f"  seed {seed} reg {reg:g} iters {n_it}: acc {cell['accuracy']:.3f}, "
                     f"to fedavg {cell['to_fedavg']:.3f}, to exact {cell['to_exact']:.3f} ({cell['seconds']:.1f}s)")
    return out


def pot_plain(seed: int, agents: int, reg: float, n_it: int) -> dict:
    """The authors' call on every tensor small enough for a dense cost (the others: FedAvg, said)."""
    server, start, updates = _round(seed, agents)
    small = [n for n, t in start.items() if t.numel() <= 8192]
    sub = [{n: u[n] for n in small} for u in updates]
    fused_small, rep = fuse_with_report(sub, [1.0] * agents, "fedwb-sinkhorn", solver="pot-plain", reg=reg,
                                        max_iter=n_it, stop_threshold=1e-9, warn=False)
    avg, _ = fuse_with_report(updates, [1.0] * agents, "fedavg")
    fused = {**avg, **fused_small}
    finite = all(bool(torch.isfinite(t).all()) for t in fused.values())
    return {"seed": seed, "reg": reg, "max_iter": n_it, "tensors_through_pot": small,
            "non_finite_tensors": rep.pot_plain_non_finite,
            "accuracy": server.evaluate(fused)["accuracy"] if finite else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--iters", default="1,10,100,1000,10000")
    p.add_argument("--regs", default="0.01,0.1,1")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    iters = [int(x) for x in args.iters.split(",")]
    regs = [float(x) for x in args.regs.split(",")]
    runs = [one_seed(s, args.agents, iters, regs) for s in range(args.seeds)]
    table = []
    for reg in regs:
        for n_it in iters:
            cells = [c for r in runs for c in r["cells"] if c["reg"] == reg and c["max_iter"] == n_it]
            acc = [c["accuracy"] for c in cells]
            table.append({"reg": reg, "max_iter": n_it, "accuracy_mean": float(np.mean(acc)),
                          "accuracy_min": float(np.min(acc)), "accuracy_max": float(np.max(acc)),
                          "to_fedavg_mean": float(np.mean([c["to_fedavg"] for c in cells])),
                          "to_exact_mean": float(np.mean([c["to_exact"] for c in cells])),
                          "seconds_median": float(np.median([c["seconds"] for c in cells]))})
    progress("the authors' exact call (POT plain iteration, 10,000 iterations, reg 0.1), small tensors, seed 0")
    authors = [pot_plain(0, args.agents, 0.1, 10_000)]  # dense POT, 10,000 iterations: one seed
    emit({"benchmark": "iterations", "machine": machine(), "runs": runs, "table": table, "authors_call": authors,
          "fedavg_accuracy": [r["fedavg_accuracy"] for r in runs],
          "exact_accuracy": [r["exact_accuracy"] for r in runs]}, args.json)


if __name__ == "__main__":
    main()
