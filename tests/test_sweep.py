"""``fedwb sim sweep`` (issue 18): grid parsing, the 95 % interval, and a resumable run on a real broker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from broker import BrokerProcess
from fedwb import executable
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


def test_sweep_runs_each_cell_once_and_resumes(mosquitto: BrokerProcess, tmp_path: Path) -> None:
    cmd = [executable(), "sim", "--task", "noop", "--agents", "2", "--rounds", "1", "--broker", mosquitto.url,
           "--out", str(tmp_path), "sweep", "--grid", "seed=0,1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == ["seed-0", "seed-1"] and all(r["versions"] == 1 for r in rows)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 done before, 0 to run" in again.stderr
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 2  # nothing ran twice
    summary = json.loads((tmp_path / "sweep-summary.json").read_text())
    assert summary["table"][0]["seeds"] == 2 and (tmp_path / "sweep.png").exists()
