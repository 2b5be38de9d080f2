"""Federated CartPole in one process: the recipe's arithmetic without MQTT, for ablations.

    python -m bench.fedrl --json [--seed 0] [--rounds 30] [--local-steps 1000]
        [--pole-lengths 0.25,0.5,0.75,1.0,1.5] [--held-out 0.4,1.25] [--option KEY=VALUE ...] [--why]

K ``cartpole`` task agents (one per pole half-length, agent i seeded 100·seed + i) start each
round from the global model, train ``local-steps`` environment steps, and are fused by the
aggregator's own FedAvg (weights = samples). After each of the last 8 rounds (and every 10th)
the global model's greedy return is measured on every trained and held-out length, as the
sim's evaluator does. ``--why`` also replays the last global model and counts how its
episodes end: ``cap`` (500 steps), ``angle`` (the pole fell) or ``cart`` (the cart left the
track with the pole up), and evaluates each agent's last local model the same way (is it
the average that fails, or the agents?). One core, ~2.5 min per seed for the default
30 × 1,000 steps. The sim (`fedwb sim --task cartpole ...`) is the system's measurement;
this is for choosing among recipes quickly and seeing why a policy fails.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from aggregator.fusion import fuse_with_report
from bench.common import emit, machine, progress
from edge_agent.tasks import get_task


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"bench.fedrl: not a comma-separated list of numbers: {text!r}") from None


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bench.fedrl: --option needs KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def why(task, weights: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """How the greedy episodes of ``weights`` end, per evaluation environment."""
    return {label: dict(Counter(end for _, end in eps)) for label, eps in task.episodes(weights).items()}


def run(seed: int, rounds: int, local_steps: int, lengths: list[float], held_out: list[float],
        options: dict[str, str], episodes: int, explain: bool) -> dict:
    torch.set_num_threads(1)
    evals = sorted(set(lengths) | set(held_out))
    total = {"total_steps": str(rounds * local_steps), **options}
    agents = [get_task("cartpole", seed=100 * seed + i, pole_length=length, eval_lengths=evals,
                       eval_episodes=episodes, **total) for i, length in enumerate(lengths)]
    torch.manual_seed(seed)
    weights = agents[0].initial_weights()
    curve, t0 = [], time.perf_counter()
    for r in range(1, rounds + 1):
        results = [a.train(weights, local_steps) for a in agents]
        weights, _ = fuse_with_report([x.weights for x in results], [x.num_samples for x in results], "fedavg",
                                      warn=False)
        if r > rounds - 8 or r % 10 == 0:
            ev = agents[0].evaluate(weights)
            curve.append({"version": r, **{k: round(v, 1) for k, v in ev.items()}})
            progress(f"  seed {seed} v{r}: mean {ev['mean_return']:.0f}  "
                     + " ".join(f"{v:.0f}" for k, v in ev.items() if k != "mean_return")
                     + f"  ({time.perf_counter() - t0:.0f}s)")
    last5 = [c["mean_return"] for c in curve[-5:]]
    out = {"seed": seed, "rounds": rounds, "local_steps": local_steps, "options": options,
           "final_mean_return": curve[-1]["mean_return"], "last5_at_475": sum(v >= 475 for v in last5),
           "curve": curve, "seconds": round(time.perf_counter() - t0, 1)}
    if explain:
        out["episode_ends"] = why(agents[0], weights)
        out["local_models"] = {f"{length:g}": {k: round(v, 1) for k, v in agents[0].evaluate(x.weights).items()}
                               for length, x in zip(lengths, results, strict=True)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=1000)
    p.add_argument("--pole-lengths", default="0.25,0.5,0.75,1.0,1.5")
    p.add_argument("--held-out", default="0.4,1.25")
    p.add_argument("--episodes", type=int, default=5, help="greedy episodes per length and evaluation")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a cartpole task option (default: the task's own, the stable preset)")
    p.add_argument("--why", action="store_true", help="count how the last global model's episodes end")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.local_steps < 1 or a.episodes < 1:
        raise SystemExit("bench.fedrl: --rounds, --local-steps and --episodes must be >= 1")
    options = _options(a.option)
    try:
        result = run(a.seed, a.rounds, a.local_steps, _floats(a.pole_lengths), _floats(a.held_out), options,
                     a.episodes, a.why)
    except ValueError as exc:  # a bad task option names itself
        raise SystemExit(f"bench.fedrl: {exc}") from None
    result["machine"] = machine()
    result["mean_of_last5"] = float(np.mean([c["mean_return"] for c in result["curve"][-5:]]))
    emit(result, a.json)


if __name__ == "__main__":
    main()
