r"""``fedwb sim sweep``: a grid over sim options, run one cell after another, resumable, summarized over seeds.

Each cell is one ``fedwb sim`` run (its own directory ``OUT/cells/<key>``). A finished cell
appends one line to ``OUT/sweep.jsonl`` and is never run again: stopping and re-running the
same command resumes. The summary groups cells that differ only by ``seed`` and reports, per
group, the mean and a 95 % interval over seeds (Student t: :math:`\bar x \pm t_{0.975,n-1} s/\sqrt n`)
of the final metric, rounds and seconds to the target, and the median fusion seconds; plus one
figure per group (metric against version and against wall time) and a heat map of the final
metric when the grid has exactly two non-seed axes.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
import types
import typing
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from sim.compare import to_target
from sim.evaluator import headline
from sim.runner import SimConfig, run_sim

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["policy=fedavg,hybrid", "seed=0,1,2"]`` -> ``{"policy": ["fedavg", "hybrid"], "seed": [0, 1, 2]}``.

    Keys are ``SimConfig`` fields (dashes or underscores); values are parsed as JSON when they
    can be (numbers, ``null``), else kept as strings, then checked against the field's type
    (an ``int`` option takes integers, a ``float`` one finite numbers, ``null`` only where the
    option may be unset). ``ValueError`` names a bad item: an unknown or list-valued option, an
    axis given twice, a value given twice, a value of the wrong type.
    """
    known = _grid_types()
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {item!r}: use KEY=V1,V2,...")
        if key not in known:
            listed = key in {f.name for f in fields(SimConfig)} and key not in _NOT_GRIDDED
            why = "takes a list, which a grid cannot vary (one sweep per value, each with its own --out)" if listed \
                else "is not a sim option that a grid can vary"
            raise ValueError(f"--grid {item!r}: {key!r} {why}")
        if key in grid:
            raise ValueError(f"--grid {item!r}: {key!r} is already an axis (give its values once: {key}=V1,V2,...)")
        parsed = [_typed(key, known[key], _value(v.strip())) for v in values.split(",") if v.strip()]
        twice = next((v for i, v in enumerate(parsed) if v in parsed[:i]), _NONE)
        if twice is not _NONE:
            raise ValueError(f"--grid {item!r}: {twice!r} is given twice")
        grid[key] = parsed
    if not grid:
        raise ValueError("give at least one --grid KEY=V1,V2,...")
    return grid


_NONE = object()
_NOT_GRIDDED = ("out", "job", "live")  # where a cell runs and how it reports, not what it computes


def _grid_types() -> dict[str, tuple[type, bool]]:
    """Scalar ``SimConfig`` fields a grid may vary: name -> (type, whether None is allowed)."""
    out = {}
    for name, hint in typing.get_type_hints(SimConfig).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
        scalar = [a for a in args if a is not type(None)]
        if name not in _NOT_GRIDDED and len(scalar) == 1 and scalar[0] in (int, float, str, bool):
            out[name] = (scalar[0], type(None) in args)
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _typed(key: str, kind: tuple[type, bool], value: Any) -> Any:
    """``value`` as the option's type, or ``ValueError`` naming it."""
    typ, optional = kind
    if value is None:
        if optional:
            return None
        raise ValueError(f"--grid {key}: null is not allowed (the option must have a value)")
    if typ is bool and isinstance(value, bool):
        return value
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is float and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value  # an int stays one, so a cell's key reads as it was typed
    if typ is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    need = {int: "an integer", float: "a finite number", str: "a word", bool: "true or false"}[typ]
    raise ValueError(f"--grid {key}={value!r}: {key} takes {need}")


def cell_key(cell: dict[str, Any]) -> str:
    """A stable, filesystem-safe name for a cell."""
    return "_".join(f"{k}-{str(v).replace('/', '-').replace(':', '-')}" for k, v in sorted(cell.items()))


def cells(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def interval(values: list[float]) -> dict[str, Any]:
    """Mean, 95 % t-interval half-width, min, max and n of ``values`` (None entries dropped)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"n": 0, "mean": None, "ci95": None, "min": None, "max": None}
    n = len(xs)
    mean = statistics.fmean(xs)
    half = None
    if n > 1:
        t = T975.get(n - 1) or T975[max(k for k in T975 if k <= n - 1)]
        half = t * statistics.stdev(xs) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": half, "min": min(xs), "max": max(xs)}


def cell_result(cell: dict[str, Any], summary: dict[str, Any], target: float) -> dict[str, Any]:
    rounds = summary["rounds"]
    hit_round, hit_seconds = to_target(rounds, target)
    fusion = [r["fusion_seconds"] for r in rounds if r.get("fusion_seconds") is not None]
    final = headline(rounds[-1]["eval"])[1] if rounds else None
    return {"cell": cell, "key": cell_key(cell), "target": target, "final": final, "rounds_to_target": hit_round,
            "seconds_to_target": hit_seconds, "fusion_seconds_median": statistics.median(fusion) if fusion else None,
            "wall_seconds": summary["totals"]["wall_seconds"], "versions": len(rounds),
            "metric": [headline(r["eval"])[1] for r in rounds], "wall": [r["wall_seconds"] for r in rounds]}


def done_cells(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["key"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a sweep record (a cut or edited line?); remove that line "
                             "to run its cell again") from None
    return out


_NOT_COMPARED = ("out", "job", "live", "broker", "timeout")  # where and how a cell ran, not what it computed


def fingerprint(cfg: SimConfig) -> dict[str, Any]:
    """The options that decide a cell's result, as JSON values (what a resumed cell must match)."""
    opts = {k: v for k, v in asdict(cfg).items() if k not in _NOT_COMPARED}
    return json.loads(json.dumps(opts, default=str))


def _same_options(record: Path, key: str, before: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """``ValueError`` when a finished cell ran with other options than this run would use (rows written
    before options were recorded are taken as they are)."""
    if before is None or before == now:
        return
    diff = [f"{k}={before.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)]
    raise ValueError(f"{record}: cell {key} was run with {', '.join(diff[:3])}"
                     f"{' and more' if len(diff) > 3 else ''}; resume with the same options or use another --out")


def run_sweep(base: SimConfig, grid: dict[str, list[Any]], target: float | None,
              progress: Any = print) -> dict[str, Any]:
    """Run every cell not yet in ``sweep.jsonl`` (resume), then summarize; returns the summary."""
    if target is not None and not math.isfinite(target):
        raise ValueError(f"--target must be a finite number, got {target}")
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    target = target if target is not None else {"mnist": 0.9, "cartpole": 475.0}.get(base.task, 0.0)
    record = out / "sweep.jsonl"
    done = done_cells(record)
    every = cells(grid)
    configs = {cell_key(c): replace(base, **c, out=str(out / "cells" / cell_key(c)), job=None, live=False)
               for c in every}  # every cell validated (and resumed ones compared) before the first one runs
    for key, cfg in configs.items():
        if key in done:
            _same_options(record, key, done[key].get("config"), fingerprint(cfg))
    todo = [c for c in every if cell_key(c) not in done]
    progress(f"sweep: {len(every)} cells, {len(every) - len(todo)} done before, {len(todo)} to run -> {record}")
    spent: list[float] = []
    for i, cell in enumerate(todo, start=1):
        cfg = configs[cell_key(cell)]
        t0 = time.monotonic()
        summary = run_sim(cfg)
        spent.append(time.monotonic() - t0)
        row = cell_result(cell, summary, target) | {"config": fingerprint(cfg)}
        with record.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        eta = statistics.fmean(spent) * (len(todo) - i)
        progress(f"sweep: cell {i}/{len(todo)} {cell_key(cell)}: final {row['final']}, "
                 f"{spent[-1]:.0f}s; {len(todo) - i} left, ETA {eta / 60:.1f} min")
    return summarize(out, grid, target)


def summarize(out: Path, grid: dict[str, list[Any]], target: float) -> dict[str, Any]:
    rows = [_at_target(r, target) for r in done_cells(out / "sweep.jsonl").values()
            if all(r["cell"].get(k) in v for k, v in grid.items())]
    axes = [k for k in grid if k != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["cell"].get(k) for k in axes), []).append(r)
    table = []
    for key, members in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        table.append({"cell": dict(zip(axes, key, strict=True)), "seeds": len(members),
                      "final": interval([m["final"] for m in members]),
                      "rounds_to_target": interval([m["rounds_to_target"] for m in members]),
                      "reached": sum(m["rounds_to_target"] is not None for m in members),
                      "seconds_to_target": interval([m["seconds_to_target"] for m in members]),
                      "fusion_seconds_median": interval([m["fusion_seconds_median"] for m in members])})
    summary = {"grid": grid, "target": target, "axes": axes, "table": table,
               "figures": [str(p) for p in _plots(out, axes, groups, table)]}
    (out / "sweep-summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _at_target(row: dict[str, Any], target: float) -> dict[str, Any]:
    """``row`` with rounds and seconds to ``target`` taken from its per-version metric (a resumed cell may
    have been run with another ``--target``)."""
    if row.get("target") == target or "metric" not in row:
        return row
    hit = next((i for i, m in enumerate(row["metric"]) if m is not None and m >= target), None)
    return row | {"target": target, "rounds_to_target": None if hit is None else hit + 1,  # metric[0] is v1
                  "seconds_to_target": None if hit is None else row["wall"][hit]}


def _order(key: tuple) -> tuple:
    """Numbers in numeric order (3 before 10), then anything else as text."""
    return tuple((0, float(v), "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0.0, str(v))
                 for v in key)


def _plots(out: Path, axes: list[str], groups: dict[tuple, list[dict[str, Any]]],
           table: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, members in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        label = ", ".join(f"{a}={v}" for a, v in zip(axes, key, strict=True)) or "all"
        n = min(len(m["metric"]) for m in members)
        mean = [statistics.fmean(m["metric"][i] for m in members if m["metric"][i] is not None) for i in range(n)]
        wall = [statistics.fmean(m["wall"][i] for m in members) for i in range(n)]
        ax[0].plot(range(1, n + 1), mean, marker="o", label=label)  # the runs' rounds are versions 1..n
        ax[1].plot(wall, mean, marker="o", label=label)
    ax[0].set(xlabel="global version", ylabel="metric (mean over seeds)")
    ax[1].set(xlabel="wall time (s)", ylabel="metric (mean over seeds)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "sweep.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    if len(axes) == 2:
        xs = sorted({r["cell"][axes[0]] for r in table}, key=str)
        ys = sorted({r["cell"][axes[1]] for r in table}, key=str)
        grid = [[next((r["final"]["mean"] for r in table if r["cell"][axes[0]] == x and r["cell"][axes[1]] == y),
                      float("nan")) for x in xs] for y in ys]
        fig, ax1 = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2))
        im = ax1.imshow([[float("nan") if v is None else v for v in row] for row in grid], cmap="viridis")
        ax1.set(xticks=range(len(xs)), xticklabels=[str(x) for x in xs], yticks=range(len(ys)),
                yticklabels=[str(y) for y in ys], xlabel=axes[0], ylabel=axes[1], title="final metric (mean)")
        fig.colorbar(im)
        fig.tight_layout()
        paths.append(out / "sweep-heatmap.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def format_summary(summary: dict[str, Any]) -> str:
    def fmt(s: dict[str, Any], digits: int = 3) -> str:
        if s["mean"] is None:
            return "-"
        ci = "" if s["ci95"] is None else f" ± {s['ci95']:.{digits}g}"
        return f"{s['mean']:.{digits}g}{ci}"

    lines = [f"{'cell':40s} {'seeds':>5s}  {'final (mean ± 95%)':22s} {'rounds to target':18s} "
             f"{'s to target':14s} fusion s"]
    for row in summary["table"]:
        name = ", ".join(f"{k}={v}" for k, v in row["cell"].items()) or "all"
        lines.append(f"{name[:40]:40s} {row['seeds']:5d}  {fmt(row['final']):22s} "
                     f"{fmt(row['rounds_to_target'])} ({row['reached']}/{row['seeds']})".ljust(90)
                     + f" {fmt(row['seconds_to_target']):14s} {fmt(row['fusion_seconds_median'])}")
    return "\n".join(lines)
