"""The agent as a device service (issue 19): config file, secrets from files, health, systemd unit."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

import schemas
from aggregator.settings import AggregatorSettings
from broker import BrokerProcess
from fedwb import executable
from schemas import AgentStatus, Topics
from tests.mqtt_helpers import Watcher, client
from tests.test_aggregator import running

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
FEDWB = executable()


async def test_agent_from_a_config_file_joins_and_reports_health(mosquitto: BrokerProcess, job: str,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "password").write_text("unused-on-this-broker\n")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'broker = "{mosquitto.url}"\njob = "{job}"\nagent-id = "dev-7"\ntask = "noop"\n'
                    f'task_option = ["shapes=[[8, 8]]"]\nmax_rounds = 2\nthreads = 1\nmax_memory_mb = 100000\n'
                    f'password_file = "{tmp_path / "password"}"\n')
    s = AggregatorSettings(broker=mosquitto.url, job=job, task="noop", task_options={"shapes": [[8, 8]]}, quorum=1,
                           device="cpu", status_interval=0.2)
    async with Watcher(mosquitto, job) as w, running(s):
        await w.version(0)
        proc = await asyncio.create_subprocess_exec(FEDWB, "agent", "--config", str(conf),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        await w.version(2, 60)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()[-2000:]
    async with client(mosquitto, "health") as c:
        await c.subscribe(Topics(job).agent_status("dev-7"), qos=1)
        async with asyncio.timeout(10):
            async for m in c.messages:
                st = schemas.unpack(bytes(m.payload), AgentStatus)
                break
    assert st.state == "offline" and st.rounds == 2 and st.trained_from == 1 and st.uptime_seconds > 0


@pytest.mark.parametrize("content,needle", [(None, "No such file"), ("task = [", "not valid TOML"),
                                            ('tsak = "noop"', "unknown option 'tsak'")])
def test_bad_agent_config_is_one_line_exit_2(tmp_path: Path, content: str | None, needle: str) -> None:
    conf = tmp_path / "agent.toml"
    if content is not None:
        conf.write_text(content)
    r = subprocess.run([FEDWB, "agent", "--config", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --config") and needle in r.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (the unit is checked where systemd is)")
    text = (ROOT / "deploy" / "fedwb-agent.service").read_text()
    unit = tmp_path / "fedwb-agent.service"  # the template's paths, pointed at this checkout's install
    unit.write_text(text.replace("/opt/fedwb/bin/fedwb", FEDWB).replace("User=fedwb", "User=root")
                    .replace("Group=fedwb", "Group=root"))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "fedwb agent --config" in text and "RestartPreventExitStatus=2" in text
