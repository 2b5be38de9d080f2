"""PNG plots of simulation results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sim.evaluator import headline  # noqa: E402


def _series(rounds: list[dict[str, Any]]) -> tuple[str, list[int], list[float], list[float]]:
    key = headline(rounds[0]["eval"])[0] if rounds else ""
    xs = [r["round"] for r in rounds]
    ts = [r["wall_seconds"] for r in rounds]
    ys = [r["eval"].get(key, float("nan")) for r in rounds]
    return key, xs, ts, ys


def plot_run(rounds: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Metric against round and against wall time; staleness and quorum wait."""
    key, xs, ts, ys = _series(rounds)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(xs, ys, marker="o", label=f"global model, {key}")
    ma = [r.get("training", {}).get("episode_return_ma50", float("nan")) for r in rounds]
    if any(np.isfinite(ma)):  # cartpole: the paper's metric (agents' training episodes, 50-episode average)
        axes[0].plot(xs, ma, "--", label="agents' training episodes (MA 50, the paper's metric)")
        axes[0].legend()
    axes[0].set(xlabel="global version", ylabel=key, title=f"{title}: {key} by round")
    axes[1].plot(ts, ys, marker="o")
    axes[1].set(xlabel="wall time (s)", ylabel=key, title="by wall time")
    axes[2].bar(xs, [r.get("quorum_wait_seconds") or 0 for r in rounds], label="quorum wait (s)")
    axes[2].plot(xs, [np.mean(r["staleness"]) if r["staleness"] else 0 for r in rounds], "k.-",
                 label="mean staleness")
    axes[2].set(xlabel="global version", title="quorum wait and staleness")
    axes[2].legend()
    fig.tight_layout()
    path = out / "metric.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_compare(runs: dict[str, list[list[dict[str, Any]]]], out: Path, title: str) -> Path:
    """Mean and spread across seeds of each policy, against rounds and against wall time."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    key = ""
    for policy, seeds in runs.items():
        seeds = [s for s in seeds if s]
        if not seeds:
            continue
        n = min(len(s) for s in seeds)
        key = _series(seeds[0])[0]
        ys = np.array([[r["eval"].get(key, np.nan) for r in s[:n]] for s in seeds])
        ts = np.array([[r["wall_seconds"] for r in s[:n]] for s in seeds])
        xs = [r["round"] for r in seeds[0][:n]]
        mean, lo, hi = ys.mean(0), ys.min(0), ys.max(0)
        axes[0].plot(xs, mean, marker="o", label=policy)
        axes[0].fill_between(xs, lo, hi, alpha=0.2)
        axes[1].plot(ts.mean(0), mean, marker="o", label=policy)
        axes[1].fill_between(ts.mean(0), lo, hi, alpha=0.2)
    axes[0].set(xlabel="global version", ylabel=key, title=f"{title}: mean and range over seeds")
    axes[1].set(xlabel="wall time (s)", ylabel=key, title="against wall time")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
