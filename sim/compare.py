"""``fedwb sim compare``: each policy with each seed, one figure, rounds- and seconds-to-target."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sim.evaluator import headline
from sim.plots import plot_compare
from sim.runner import SimConfig, run_sim


def to_target(rounds: list[dict[str, Any]], target: float) -> tuple[int | None, float | None]:
    """First round (and its wall seconds) whose headline metric reaches ``target``."""
    for r in rounds:
        value = headline(r["eval"])[1]
        if value is not None and value >= target:
            return r["round"], r["wall_seconds"]
    return None, None


def _policy_config(base: SimConfig, policy: str, seed: int, out: Path) -> SimConfig:
    """One run of the comparison: ``base`` with this policy and seed (hybrid's switch options only for
    hybrid; it switches after a third of the rounds unless told otherwise)."""
    hybrid = policy == "hybrid"
    switch_after = base.switch_after if hybrid else None
    dispersion_below = base.dispersion_below if hybrid else None
    if hybrid and switch_after is None and dispersion_below is None:
        switch_after = max(1, base.rounds // 3)
    return replace(base, policy=policy, seed=seed, out=str(out / f"{policy}-s{seed}"), job=None,
                   switch_after=switch_after, dispersion_below=dispersion_below)


def run_compare(base: SimConfig, policies: list[str], seeds: int, target: float | None) -> dict[str, Any]:
    if target is not None and not math.isfinite(target):
        raise ValueError(f"--target must be a finite number, got {target}")
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    if target is None:
        target = {"mnist": 0.9, "cartpole": 475.0}.get(base.task, 0.0)
    configs = {policy: [_policy_config(base, policy, seed, out) for seed in range(seeds)]
               for policy in policies}  # every run's options checked before the first one starts
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    table = []
    for policy in policies:
        runs[policy] = [run_sim(cfg)["rounds"] for cfg in configs[policy]]
        hits = [to_target(r, target) for r in runs[policy]]
        finals = [headline(r[-1]["eval"])[1] for r in runs[policy] if r]
        table.append({
            "policy": policy, "target": target,
            "rounds_to_target": [h[0] for h in hits], "seconds_to_target": [h[1] for h in hits],
            "final_mean": float(np.mean(finals)) if finals else None,
            "final_min": float(np.min(finals)) if finals else None,
            "final_max": float(np.max(finals)) if finals else None,
        })
    figure = plot_compare(runs, out, f"{base.task}")
    result = {"config": {**base.__dict__}, "policies": policies, "seeds": seeds, "table": table,
              "figure": str(figure)}
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'policy':16s} {'final (mean [min, max])':28s} {'rounds to target':18s} seconds to target"]
    for row in result["table"]:
        fin = "-" if row["final_mean"] is None else \
            f"{row['final_mean']:.3f} [{row['final_min']:.3f}, {row['final_max']:.3f}]"
        rt = ",".join("-" if r is None else str(r) for r in row["rounds_to_target"])
        st = ",".join("-" if s is None else f"{s:.0f}" for s in row["seconds_to_target"])
        lines.append(f"{row['policy']:16s} {fin:28s} {rt:18s} {st}")
    return "\n".join(lines)
