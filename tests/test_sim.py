"""The simulator end to end (quick runs), its outputs, and no process left behind."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import psutil
import pytest

from sim.runner import SimConfig, run_sim

pytestmark = pytest.mark.timeout(400)

ROUND_KEYS = {"round", "version", "policy", "method", "contributors", "n_contributors", "staleness",
              "quorum_wait_seconds", "fusion_seconds", "wall_seconds", "eval"}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _check_summary(out: Path, rounds: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"config", "rounds", "totals", "job"}
    assert len(summary["rounds"]) == rounds
    for r in summary["rounds"]:
        assert ROUND_KEYS <= set(r), ROUND_KEYS - set(r)
        assert r["n_contributors"] == len(r["contributors"]) >= 1
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert len(lines) >= rounds  # version 0 and every fused version
    assert (out / "metric.png").stat().st_size > 1000
    return summary


def test_quick_mnist_hybrid_follows_schedule(tmp_path: Path, mosquitto_bin: None) -> None:
    before = _children()
    summary = run_sim(SimConfig(task="mnist", agents=3, rounds=3, policy="hybrid", switch_after=1, quorum=2,
                                broker="mosquitto", out=str(tmp_path), quick=True, live=False,
                                stragglers="slow=0.34x2"))
    s = _check_summary(tmp_path, 3)
    assert [r["policy"] for r in s["rounds"]] == ["fedwb", "fedavg", "fedavg"]
    assert s["rounds"][-1]["eval"]["accuracy"] > summary["initial"]["eval"]["accuracy"]
    assert _children() <= before


def test_hybrid_switches_on_dispersion_and_records_it(tmp_path: Path, mosquitto_bin: None) -> None:
    """--dispersion-below reaches the aggregator: a threshold above any dispersion switches at the first
    fusion; one below none never does; the records carry the dispersion while it is measured; no state dir
    is left behind."""
    states = set(Path(tempfile.gettempdir()).glob("fedwb-sim-state-*"))
    for below, methods in ((1e9, ["fedavg", "fedavg"]), (1e-12, ["fedwb-sinkhorn", "fedwb-sinkhorn"])):
        run_sim(SimConfig(task="mnist", agents=2, rounds=2, policy="hybrid", switch_after=5, dispersion_below=below,
                          broker="mosquitto", out=str(tmp_path / str(below)), quick=True, live=False,
                          max_iter="20"))
        rounds = [json.loads(line) for line in (tmp_path / str(below) / "rounds.jsonl").read_text().splitlines()]
        fused = [r for r in rounds if r["version"] >= 1]
        assert [r["method"] for r in fused] == methods
        # measured while the switch is open; once switched, no longer needed
        measured = fused if methods[-1] != "fedavg" else fused[:1]
        assert all(isinstance(r["dispersion"], float) and r["dispersion"] > 0 for r in measured)
        assert methods[-1] != "fedavg" or fused[0]["reason"].startswith("hybrid: dispersion")
    assert set(Path(tempfile.gettempdir()).glob("fedwb-sim-state-*")) <= states


def test_quick_cartpole_reports_trained_and_held_out_lengths(tmp_path: Path) -> None:
    before = _children()
    run_sim(SimConfig(task="cartpole", agents=2, rounds=2, policy="fedavg", broker="embedded",
                      pole_lengths=[0.3, 1.0], held_out_lengths=[0.6], out=str(tmp_path), quick=True,
                      live=False, local_steps=200))
    s = _check_summary(tmp_path, 2)
    assert set(s["rounds"][0]["eval"]) == {"return@0.3", "return@0.6", "return@1", "mean_return"}
    assert _children() <= before


def test_quick_cartpole_with_per_agent_physics_evaluates_each_and_the_held_out_ones(tmp_path: Path) -> None:
    run_sim(SimConfig(task="cartpole", agents=2, rounds=1, policy="fedavg", broker="embedded",
                      env_params=["length=0.3,masspole=0.3", "masscart=2,force_mag=7"], pole_lengths=[0.3, 1.0],
                      held_out_lengths=[], held_out_envs=["length=0.6,masscart=0.5"], out=str(tmp_path),
                      quick=True, live=False, local_steps=200))
    s = _check_summary(tmp_path, 1)
    assert set(s["rounds"][0]["eval"]) == {"return@length=0.3,masspole=0.3", "return@length=1,masscart=2,force_mag=7",
                                           "return@length=0.6,masscart=0.5", "mean_return"}
    with pytest.raises(ValueError, match="bad cartpole env parameter 'gravity=3'"):
        SimConfig(task="cartpole", env_params=["gravity=3"])
    with pytest.raises(ValueError, match="cartpole options"):
        SimConfig(task="mnist", held_out_envs=["masspole=1"])


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="quorum"):
        SimConfig(agents=2, quorum=3)
    with pytest.raises(ValueError, match="unknown straggler key"):
        SimConfig(stragglers="lag=3")


def _runs(p: psutil.Process, words: tuple[str, ...]) -> bool:
    """Whether ``p``'s command line has one of ``words``; False for a process that is already gone (a
    short-lived child can exit between the listing and the read)."""
    try:
        return any(a in p.cmdline() for a in words)
    except psutil.Error:
        return False


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_a_stopped_sim_leaves_no_process_behind(tmp_path: Path, signame: str) -> None:
    """A scheduler stops jobs with SIGTERM: the aggregator, the agents and the broker go with the sim, which
    says so. Killed with SIGKILL (an OOM kill, a CI timeout) it cannot stop them: they notice that it is gone
    (fedwb.lifeline) and stop by themselves instead of running out their 100,000 rounds."""
    import signal
    import subprocess
    import time

    from fedwb import executable

    sim = subprocess.Popen([executable(), "sim", "--task", "noop", "--agents", "2", "--rounds", "100000",
                            "--broker", "embedded", "--quick", "--out", str(tmp_path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kids: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sim.poll() is None:  # until the broker, aggregator and 2 agents run
            kids = [p for p in psutil.Process(sim.pid).children(recursive=True)
                    if _runs(p, ("aggregator", "agent", "broker.embedded"))]
            if len(kids) >= 4 and (tmp_path / "rounds.jsonl").exists() and (tmp_path / "rounds.jsonl").read_text():
                break
            psutil.wait_procs([psutil.Process(sim.pid)], timeout=0.2)
        assert len(kids) >= 4, "the sim did not start its processes"
        sim.send_signal(getattr(signal, signame))
        assert sim.wait(60) == (130 if signame == "SIGTERM" else -signal.SIGKILL)
        gone, alive = psutil.wait_procs(kids, timeout=40)
        assert not alive, f"left running after {signame}: {[p.cmdline() for p in alive]}"
        if signame == "SIGTERM":
            assert "interrupted; every process was stopped" in sim.stderr.read().decode()
    finally:
        for p in kids:  # a failed check must not leave the sim's processes to the next tests
            with contextlib.suppress(psutil.Error):
                p.kill()
        if sim.poll() is None:
            sim.kill()
        sim.wait(30)  # reaped: no zombie for later tests' "nothing left behind" checks
