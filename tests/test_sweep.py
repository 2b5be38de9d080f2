"""``fedwb sim sweep`` (issue 18): grid parsing, the 95 % interval, and a resumable run on a real broker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from broker import BrokerProcess
from fedwb import executable
from sim.runner import SimConfig
from sim.sweep import cell_key, cells, interval, parse_grid

pytestmark = pytest.mark.timeout(240)


def test_grid_cells_and_interval() -> None:
    grid = parse_grid(["policy=fedavg,hybrid", "switch-after=1,null", "seed=0,1,2"])
    assert grid == {"policy": ["fedavg", "hybrid"], "switch_after": [1, None], "seed": [0, 1, 2]}
    assert len(cells(grid)) == 12 and len({cell_key(c) for c in cells(grid)}) == 12
    with pytest.raises(ValueError, match="not a sim option"):
        parse_grid(["bogus=1"])
    with pytest.raises(ValueError, match="KEY=V1"):
        parse_grid(["policy"])
    s = interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["ci95"] == pytest.approx(4.303 * 1.0 / 3**0.5) and s["n"] == 3
    assert interval([None, 5.0]) == {"n": 1, "mean": 5.0, "ci95": None, "min": 5.0, "max": 5.0}


@pytest.mark.parametrize(("items", "message"), [
    (["agents=two"], "agents takes an integer"),
    (["seed=1.5"], "seed takes an integer"),
    (["reg=nan"], "reg takes a finite number"),
    (["quick=1"], "quick takes true or false"),
    (["agents=null"], "null is not allowed"),
    (["seed=0,1,0"], "0 is given twice"),
    (["agents=2", "agents=3"], "'agents' is already an axis"),
    (["pole-lengths=1"], "takes a list"),
    (["out=x"], "not a sim option"),
])
def test_a_bad_grid_is_named_before_anything_runs(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_grid(items)


def test_grid_values_take_their_options_types() -> None:
    grid = parse_grid(["max-iter=1000,paper", "reg=1,0.1", "quick=true"])
    assert grid == {"max_iter": ["1000", "paper"], "reg": [1, 0.1], "quick": [True]}
    assert cell_key({"reg": 1}) == "reg-1"  # an int stays one: keys of earlier sweeps still match


@pytest.mark.parametrize(("opts", "message"), [
    ({"policy": "bogus"}, "invalid policy: name"),
    ({"policy": "hybrid"}, "needs switch_after"),
    ({"wb_method": "bogus"}, "invalid policy: wb_method"),
    ({"solver": "bogus"}, "invalid policy: solver"),
    ({"max_iter": "-3"}, "invalid policy: max_iter"),
    ({"max_iter": "many"}, "--max-iter must be a whole number or 'paper'"),
    ({"reg": 0}, "invalid policy: reg"),
    ({"partition": "dirichlet:-1"}, "alpha must be positive"),
    ({"partition": "bogus"}, "unknown partition"),
])
def test_sim_options_fail_before_anything_starts(opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(task="mnist", **opts)


def test_every_solver_the_fusion_knows_is_a_valid_policy_solver() -> None:
    import typing

    from aggregator.fusion.fuse import SOLVERS
    from schemas.messages import EntropicSolver

    assert set(typing.get_args(EntropicSolver)) == set(SOLVERS)
    SimConfig(task="mnist", policy="fedwb-sinkhorn", solver="wide", max_iter="paper")  # accepted


def _sweep(mosquitto: BrokerProcess, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [executable(), "sim", "--task", "noop", "--rounds", "1", "--broker", mosquitto.url, "--out", str(out),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_sweep_runs_each_cell_once_and_resumes(mosquitto: BrokerProcess, tmp_path: Path) -> None:
    """Two policies with 2 seeds, end to end: one seed first, then both (resume skips the finished
    half), then nothing left to run; a resume with other options or another target never mixes results.
    (Each cell is a real sim: aggregator and agent processes on the broker, ~3 s of start-up each, so
    the grid is the smallest that has a resumed half: 2 x 2, not the 2 x 2 x 2 it once was.)"""
    grid = ["--grid", "policy=fedavg,fedwb", "--grid", "agents=2"]
    first = _sweep(mosquitto, tmp_path, "sweep", *grid, "--grid", "seed=0")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "2 cells, 0 done before, 2 to run" in first.stderr
    full = _sweep(mosquitto, tmp_path, "sweep", *grid, "--grid", "seed=0,1")
    assert full.returncode == 0, full.stderr[-2000:]
    assert "4 cells, 2 done before, 2 to run" in full.stderr
    rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert len({r["key"] for r in rows}) == len(rows) == 4 and all(r["versions"] == 1 for r in rows)
    summary = json.loads((tmp_path / "sweep-summary.json").read_text())
    assert [t["seeds"] for t in summary["table"]] == [2, 2] and all(t["reached"] == 2 for t in summary["table"])
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "sweep-heatmap.png").exists()
    again = _sweep(mosquitto, tmp_path, "sweep", *grid, "--grid", "seed=0,1", "--target", "1e9")
    assert again.returncode == 0 and "4 cells, 4 done before, 0 to run" in again.stderr
    summary = json.loads((tmp_path / "sweep-summary.json").read_text())
    assert all(t["reached"] == 0 for t in summary["table"])  # the new target, from each cell's record
    other = _sweep(mosquitto, tmp_path, "--local-epochs", "2", "sweep", *grid, "--grid", "seed=0,1")
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "local_epochs=None (now 2)" in other.stderr and "use another --out" in other.stderr
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 4  # nothing ran twice or with mixed options


def test_compare_checks_every_run_before_the_first_starts(tmp_path: Path) -> None:
    from sim.compare import run_compare

    with pytest.raises(ValueError, match="invalid policy: name"):
        run_compare(SimConfig(task="noop", out=str(tmp_path)), ["fedavg", "bogus"], 2, None)
    assert not (tmp_path / "fedavg-s0").exists()  # nothing ran
    with pytest.raises(ValueError, match="--target must be a finite number"):
        run_compare(SimConfig(task="noop", out=str(tmp_path)), ["fedavg"], 1, float("inf"))


def test_a_damaged_record_is_named_not_a_traceback(tmp_path: Path) -> None:
    from sim.sweep import done_cells

    (tmp_path / "sweep.jsonl").write_text('{"key": "seed-0", "final": 0.5}\n{"key": "seed-1", "fin\n')
    with pytest.raises(ValueError, match=r"sweep.jsonl:2: not a sweep record"):
        done_cells(tmp_path / "sweep.jsonl")


def test_a_template_may_leave_to_its_cells_what_they_vary(tmp_path: Path) -> None:
    """``--policy hybrid`` without a switch is a valid template when the grid gives each cell one."""
    from sim.sweep import run_sweep

    base = SimConfig(task="noop", policy="hybrid", out=str(tmp_path), check_policy=False)
    with pytest.raises(ValueError, match="needs switch_after"):
        run_sweep(base, parse_grid(["seed=0,1"]), None)  # no cell gets a switch: named before anything runs
    assert not (tmp_path / "cells").exists()
    cli = subprocess.run([executable(), "sim", "--task", "noop", "--policy", "hybrid", "--out", str(tmp_path),
                          "sweep", "--grid", "switch-after=1,1"], capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0 and "is given twice" in cli.stderr  # the template itself was accepted
    alone = subprocess.run([executable(), "sim", "--task", "noop", "--policy", "hybrid", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 2 and "needs switch_after" in alone.stderr and "Traceback" not in alone.stderr
