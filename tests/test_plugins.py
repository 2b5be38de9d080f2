"""Task plugins and the lean agent (issue 19): an installed plugin federates, a module on
PYTHONPATH works as --task package.module:Class, and the agent imports none of the aggregator's stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import BrokerProcess
from fedwb import executable

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "fedwb-sine"
FEDWB = executable()


def test_installed_plugin_federates_through_fedwb_sim(mosquitto: BrokerProcess, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    str(PLUGIN)], check=True, capture_output=True, cwd=tmp_path)
    listed = subprocess.run([FEDWB, "tasks", "list"], capture_output=True, text=True, check=True).stdout
    assert "sine" in listed and "fedwb_sine:SineTask" in listed
    out = tmp_path / "run"
    r = subprocess.run([FEDWB, "sim", "--task", "sine", "--agents", "3", "--rounds", "3", "--broker", mosquitto.url,
                        "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["rounds"] == 3
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["eval"]["mse"] < summary["initial"]["eval"]["mse"]  # the federation learned the wave


async def test_agent_takes_a_module_on_pythonpath_as_its_task(mosquitto: BrokerProcess, job: str) -> None:
    import asyncio

    from aggregator.settings import AggregatorSettings
    from tests.mqtt_helpers import Watcher
    from tests.test_aggregator import running

    sys.path.insert(0, str(PLUGIN))
    try:
        s = AggregatorSettings(broker=mosquitto.url, job=job, task="fedwb_sine:SineTask", quorum=1, device="cpu",
                               status_interval=0.2)
        env = {**os.environ, "PYTHONPATH": f"{PLUGIN}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        async with Watcher(mosquitto, job) as w, running(s):
            await w.version(0)
            proc = await asyncio.create_subprocess_exec(
                FEDWB, "agent", "--broker", mosquitto.url, "--job", job, "--agent-id", "dev", "--task",
                "fedwb_sine:SineTask", "--max-rounds", "1", env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            g1 = await w.version(1, 120)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, out.decode()[-2000:]
        assert g1.contributors == ["dev"] and set(g1.weights) == {"fc1.weight", "fc1.bias", "fc2.weight",
                                                                    "fc2.bias", "out.weight", "out.bias"}
    finally:
        sys.path.remove(str(PLUGIN))


def test_agent_entry_point_leaves_the_aggregator_stack_out() -> None:
    code = ("import sys, fedwb.cli; fedwb.cli._register_subcommands(); "
            "from edge_agent.agent import Agent, AgentSettings; Agent(AgentSettings(task='noop')); "
            "print(','.join(m for m in ('ot', 'numba', 'matplotlib', 'amqtt', 'prometheus_client') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "", f"the agent imported {r.stdout.strip()}"


def test_bad_task_plugins_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "notatask.py").write_text("class Thing:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for task, needle in (("notatask:Thing", "not a subclass"), ("nosuchmodule:X", "cannot import"),
                         ("notatask:Missing", "has no 'Missing'"), ("bogus", "unknown task")):
        r = subprocess.run([FEDWB, "agent", "--task", task, "--broker", "mqtt://127.0.0.1:1"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (task, r.stderr)
