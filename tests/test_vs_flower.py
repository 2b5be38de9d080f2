"""bench.vs_flower: the summary math, a small real run (relay + fedwb through mosquitto), clean stops.

Flower itself runs only where flwr 1.42.0 is already installed (``.venv-flower`` or this
environment); the bench installs it on demand, which tests do not do.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.relay import raw_loopback_seconds
from bench.sampler import Sampler, tree_cpu_seconds
from bench.vs_flower import flower
from bench.vs_flower.main import parse_args, ratios, run_all, summarize
from sim.runner import Processes


def _fake_sampler(times: list[float], cpu: list[float], net: list[float]) -> Sampler:
    s = Sampler()
    s.times, s.net, s.cpu_by_role = times, net, {"all": cpu}
    return s


def test_summarize_uses_gaps_between_quorums_and_totals_over_the_span() -> None:
    s = _fake_sampler([0.0, 10.0], [0.0, 20.0], [0.0, 1000.0])
    out = summarize([4.0, 1.0, 2.0, 7.0], s, payload_bytes=100)  # sorted: 1, 2, 4, 7 -> gaps 1, 2, 3
    assert out["rounds_measured"] == 3
    assert out["seconds_per_round"]["all"] == [1.0, 2.0, 3.0]
    assert out["seconds_per_round"]["median"] == 2.0
    assert out["cpu_seconds_per_round"] == pytest.approx((14.0 - 2.0) / 3)  # cpu(t) = 2t
    assert out["cpu_seconds_per_round_by_role"] == {"all": pytest.approx(4.0)}
    assert out["bytes_per_round"] == pytest.approx((700.0 - 100.0) / 3)
    assert out["payloads_per_round"] == pytest.approx(2.0)


def test_summarize_refuses_a_single_round() -> None:
    with pytest.raises(RuntimeError, match="fewer than two"):
        summarize([1.0], _fake_sampler([0.0, 1.0], [0.0, 1.0], [0.0, 1.0]), 4)


def test_ratios_divide_medians_and_tolerate_missing_systems() -> None:
    def sys_(median: float) -> dict:
        return {"seconds_per_round": {"median": median}}

    r = ratios({"fedwb": sys_(0.5), "flower": sys_(20.0), "relay": {"error": "x"},
                "raw_loopback": {"seconds": 0.05}})
    assert r["fedwb_over_flower"] == pytest.approx(0.025)
    assert r["fedwb_over_relay"] is None
    assert r["fedwb_over_raw_loopback"] == pytest.approx(10.0)


def test_raw_loopback_moves_every_byte() -> None:
    assert raw_loopback_seconds(10_000_000, repeats=1) > 0


def test_tree_cpu_counts_a_busy_child() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                          "while time.process_time()-t<0.3: pass\nprint('done', flush=True)\ninput()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "done"
        assert tree_cpu_seconds([p.pid]) >= 0.3
    finally:
        p.kill()
        p.wait()


_BURNER = """
import time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("burnt", flush=True)
input()
"""


def test_sampler_counts_a_descendant_it_found_in_its_scan(tmp_path: Path) -> None:
    """The sampler scans the tree once (rescan is an hour here) and counts the child found there."""
    burner = tmp_path / "burner.py"
    burner.write_text(_BURNER)
    parent = (f"import subprocess, sys\nc = subprocess.Popen([sys.executable, {str(burner)!r}], stdin=sys.stdin)\n"
              "c.wait()")
    p = subprocess.Popen([sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        s = Sampler(rescan=3600.0)
        s.watch(p.pid, "root")
        assert p.stdout.readline().strip() == "burnt"  # the grandchild has used its 0.3 s of CPU
        s.sample()  # the first sample after watch() scans: root and child
        assert len(s._trees[p.pid]) == 2
        assert s.cpu_by_role["root"][-1] >= 0.3
    finally:
        for q in psutil.Process(p.pid).children(recursive=True):
            q.kill()
        p.kill()
        p.wait()


def test_processes_stop_reaches_descendants_in_their_own_session(tmp_path: Path) -> None:
    code = ("import subprocess, sys\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
            "print(c.pid, flush=True)\nc.wait()")
    procs = Processes(tmp_path)
    parent = procs.start("parent", [sys.executable, "-c", code])
    log = tmp_path / "parent.log"
    deadline = time.monotonic() + 30
    while not log.read_text().strip():  # the child's pid, once it exists
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = psutil.Process(int(log.read_text().split()[0]))
    procs.stop(grace=5)
    assert parent.poll() is not None
    gone, _ = psutil.wait_procs([child], timeout=10)
    assert gone, "the grandchild in its own session survived stop()"


def test_relay_and_fedwb_small_run(tmp_path: Path, mosquitto_bin: None) -> None:
    # 1M params (4 MB): a 1k-param relay round uses less CPU than one 10 ms clock tick, so it read as 0 at times
    args = parse_args(["--clients", "2", "--params", "1000000", "--rounds", "2", "--systems", "relay,fedwb",
                       "--timeout", "120", "--keep", str(tmp_path)])
    out = run_all(args)
    for name in ("relay", "fedwb"):
        r = out["systems"][name]
        assert "error" not in r, r
        assert r["rounds_measured"] == 2
        assert 0 < r["seconds_per_round"]["median"] < 30
        assert r["cpu_seconds_per_round"] > 0
        assert sum(r["cpu_seconds_per_round_by_role"].values()) == pytest.approx(r["cpu_seconds_per_round"])
    assert out["ratios"]["fedwb_over_relay"] > 0
    assert out["ratios"]["fedwb_over_flower"] is None and not out["goals"]["fedwb_over_flower"]["met"]
    assert json.loads(json.dumps(out, default=str))["clients"] == 2
    assert not psutil.Process().children(recursive=True), "a process of the run was left behind"


def _started_by(pid: int) -> dict[psutil.Process, str]:
    """The processes ``pid`` started (its broker and echo clients) with their command lines — not another
    job's processes on the same machine."""
    found = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            found[p] = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
    return found


def test_ctrl_c_stops_every_process(tmp_path: Path, mosquitto_bin: None) -> None:
    bench = subprocess.Popen([sys.executable, "-m", "bench.vs_flower", "--json", "--clients", "3",
                              "--params", "1000", "--rounds", "100000", "--systems", "relay"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sum("echo" in cmd for cmd in _started_by(bench.pid).values()) < 3:
            assert time.monotonic() < deadline and bench.poll() is None, bench.stderr.read() if bench.poll() else ""
            time.sleep(0.1)
        started = _started_by(bench.pid)
        assert len(started) >= 4, list(started.values())
        bench.send_signal(signal.SIGINT)
        assert bench.wait(60) == 130
    finally:
        if bench.poll() is None:
            bench.kill()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_flower_round_trip(tmp_path: Path) -> None:
    try:
        flower.find_or_create(create=False)
    except RuntimeError:
        pytest.skip(f"flwr {flower.FLWR_VERSION} not installed (the bench installs it into .venv-flower on demand)")
    args = parse_args(["--clients", "2", "--params", "1000", "--rounds", "1", "--systems", "flower",
                       "--timeout", "180", "--keep", str(tmp_path)])
    r = run_all(args)["systems"]["flower"]
    assert "error" not in r, r
    assert r["rounds_measured"] == 1 and r["flwr_version"] == flower.FLWR_VERSION
    assert not psutil.Process().children(recursive=True)
