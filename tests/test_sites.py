"""Two sites bridged to a center (issue 17): three mosquittos on loopback, mosquitto's own bridges,
two site aggregators and a central one; the two-level FedAvg equals the flat one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

import schemas
from aggregator.fusion import fuse
from aggregator.settings import AggregatorSettings
from broker import UPSTREAM_PREFIX, Bridge, start_broker
from schemas import GlobalModel, Topics
from schemas.topics import UPSTREAM_PREFIX as WIRE_PREFIX
from tests.conftest import require_mosquitto
from tests.mqtt_helpers import Watcher, client, publish, update
from tests.test_aggregator import running

pytestmark = pytest.mark.timeout(180)
SHAPES = [[20, 10], [10]]


def test_bridge_config_maps_only_the_sites_topics() -> None:
    assert UPSTREAM_PREFIX == WIRE_PREFIX
    text = Bridge("mqtt://center:1883", "j", "site-a", username="site-a", password="pw").config()
    assert "address center:1883" in text and "cleansession false" in text
    assert "topic j/update/site-a out 1 fedwbup/ fedwb/" in text and "topic j/global in 1 fedwbup/ fedwb/" in text
    assert "remote_username site-a" in text
    with pytest.raises(ValueError, match="--bridge-to"):
        Bridge("http://center", "j", "a").config()


def agg(b, job: str, **kw) -> AggregatorSettings:
    base = dict(broker=b.url, job=job, task="noop", task_options={"shapes": SHAPES}, quorum=2, device="cpu",
                status_interval=0.2, clip_factor=0.0, max_share=1.0)  # exact FedAvg: the bounds are tested elsewhere
    base.update(kw)
    return AggregatorSettings(**base)


async def retained(b, job: str) -> GlobalModel:
    async with client(b, "probe") as c:
        await c.subscribe(Topics(job).global_model, qos=1)
        async with asyncio.timeout(15):
            async for m in c.messages:
                return schemas.unpack(bytes(m.payload), GlobalModel)
    raise AssertionError("no retained global")


@pytest.fixture
def three_brokers(job: str, tmp_path: Path):
    """A central mosquitto and two site mosquittos bridged to it (mosquitto's bridge)."""
    require_mosquitto()
    with start_broker(kind="mosquitto", data_dir=tmp_path / "center") as center, \
            start_broker(kind="mosquitto", data_dir=tmp_path / "a",
                         bridge=Bridge(center.url, job, "site-a")) as site_a, \
            start_broker(kind="mosquitto", data_dir=tmp_path / "b",
                         bridge=Bridge(center.url, job, "site-b")) as site_b:
        yield center, site_a, site_b


async def test_two_level_fedavg_equals_flat_fedavg(three_brokers, job: str) -> None:
    center, site_a, site_b = three_brokers
    async with Watcher(center, job) as w, Watcher(site_a, job) as wa, Watcher(site_b, job) as wb, \
            running(agg(center, job)), running(agg(site_a, job, upstream="bridge", site="site-a")), \
            running(agg(site_b, job, upstream="bridge", site="site-b")):
        g0 = await w.version(0)
        await wa.version(0)  # each site aggregator is subscribed (it publishes v0 after subscribing)
        await wb.version(0)
        gen = torch.Generator().manual_seed(3)
        updates = {name: update(job, name, 0, {k: v + torch.randn(v.shape, generator=gen) for k, v in
                                               g0.weights.items()}, n=n)
                   for name, n in (("a1", 1), ("a2", 2), ("b1", 3), ("b2", 4))}
        topics = Topics(job)
        for name, u in updates.items():
            await publish(site_a if name.startswith("a") else site_b, topics.update(name), schemas.pack(u))
        g1 = await w.version(1, 60)
        assert sorted(g1.contributors) == ["site-a", "site-b"]
        flat = fuse([u.weights for u in updates.values()], [u.num_samples for u in updates.values()])
        for k in flat:
            assert torch.allclose(g1.weights[k], flat[k], rtol=1e-6, atol=1e-6), k
        for site in (site_a, site_b):  # the center's model came down to each site's agents
            async with asyncio.timeout(30):
                while (await retained(site, job)).version < 1:
                    await asyncio.sleep(0.1)
            down = await retained(site, job)
            assert all(torch.equal(down.weights[k], g1.weights[k]) for k in flat)


async def test_a_site_broker_down_for_10_s_loses_no_update(three_brokers, job: str, tmp_path: Path) -> None:
    from edge_agent.agent import Agent, AgentSettings

    center, site_a, site_b = three_brokers
    async with Watcher(center, job) as w, running(agg(center, job)), \
            running(agg(site_a, job, upstream="bridge", site="site-a", state_dir=str(tmp_path / "sa"))), \
            running(agg(site_b, job, upstream="bridge", site="site-b", state_dir=str(tmp_path / "sb"))):
        await w.version(0)
        agents = [Agent(AgentSettings(broker=site.url, job=job, agent_id=f"{name}{i}", task="noop",
                                      task_options={"shapes": SHAPES}, max_rounds=3, exit_wait=120,
                                      confirm_timeout=5, seed=i))
                  for site, name in ((site_a, "a"), (site_b, "b")) for i in range(2)]
        runs = [asyncio.create_task(a.run()) for a in agents]
        await w.version(1, 60)
        await asyncio.to_thread(site_a.kill)  # kill -9: whatever it had not saved is gone
        await asyncio.sleep(10)  # the outage itself (the scenario, not a wait for something)
        await asyncio.to_thread(site_a.restart)
        await w.version(3, 120)
        assert await asyncio.wait_for(asyncio.gather(*runs), 120) == [0, 0, 0, 0]
    for v in (1, 2, 3):
        assert sorted(w.globals[v].contributors) == ["site-a", "site-b"], v
    for a in agents:  # every update of every agent was confirmed by its site
        assert sum(a.verdicts.values()) == 3 and a.unconfirmed is None, (a.s.agent_id, a.verdicts)


async def test_a_site_keeps_its_unfused_partial_across_a_restart(three_brokers, job: str, tmp_path: Path) -> None:
    from aggregator.service import Aggregator

    center, site_a, _ = three_brokers
    s = agg(site_a, job, upstream="bridge", site="site-a", state_dir=str(tmp_path / "sa"))
    async with Watcher(center, job) as w, Watcher(site_a, job) as wa, running(agg(center, job)), \
            running(s) as site:
        g0 = await w.version(0)
        await wa.version(0)  # the site aggregator is subscribed (it publishes v0 after subscribing)
        for name, n in (("a1", 1), ("a2", 2)):  # site b sends nothing: the center waits for its quorum of 2
            await publish(site_a, Topics(job).update(name), schemas.pack(update(job, name, 0, g0.weights, n=n)))
        async with asyncio.timeout(30):  # sent (the center may confirm it at once: _partial is then cleared)
            while not site._awaiting_central:
                await asyncio.sleep(0.05)
        sent = site.history[-1]["partial_update_id"]
    again = Aggregator(s)
    again.prepare()
    assert again._partial is not None and again._partial[0] == sent and again._awaiting_central
    assert again.version == 0 and len(again.buffer) == 0  # the site's own version is still the center's


async def test_a_secure_site_broker_from_gen_site_config(job: str, tmp_path: Path) -> None:
    """The site broker as deployed (compose profile ``sites``): authenticated, ACL with the site's upstream
    topics (``gen-credentials --site``), bridge from ``gen-site-config``; its aggregator and agents log in."""
    import getpass
    import json
    import subprocess

    from typer.testing import CliRunner

    from broker import BrokerProcess, find_mosquitto, free_port, wait_for_port
    from broker.security import gen_credentials, gen_tls
    from fedwb.cli import app

    require_mosquitto()
    secrets_dir = tmp_path / "site-secrets"
    gen_credentials(secrets_dir, 3, job=job, site="site-a")
    gen_tls(secrets_dir / "tls", ["127.0.0.1"])
    creds = json.loads((secrets_dir / "credentials.json").read_text())
    (tmp_path / "sdata").mkdir()
    port, tls_port = free_port(), free_port()
    with start_broker(kind="mosquitto", data_dir=tmp_path / "center") as center:
        result = CliRunner().invoke(app, [
            "broker", "gen-site-config", "--bridge-to", center.url, "--site", "site-a", "--job", job,
            "--conf-dir", str(secrets_dir), "--data-dir", str(tmp_path / "sdata"), "--port", str(port),
            "--tls-port", str(tls_port), "--user", getpass.getuser(), "--bind", "127.0.0.1",
            "--out", str(tmp_path / "site.conf")])
        assert result.exit_code == 0, result.output
        proc = subprocess.Popen([find_mosquitto(), "-c", str(tmp_path / "site.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        site = BrokerProcess("mosquitto", "127.0.0.1", port, proc, tmp_path / "sdata")
        try:
            wait_for_port("127.0.0.1", port)
            site_agg = agg(site, job, upstream="bridge", site="site-a", username=f"aggregator-{job}",
                           password=creds[f"aggregator-{job}"])
            async with Watcher(center, job) as w, Watcher(site, job, username="agent-0",
                                                          password=creds["agent-0"]) as ws, \
                    running(agg(center, job, quorum=1)), running(site_agg):
                g0 = await w.version(0)
                await ws.version(0)
                for name in ("agent-1", "agent-2"):  # each agent logs in as itself and sends its own update
                    async with client(site, name, username=name, password=creds[name]) as c:
                        await c.publish(Topics(job).update(name), schemas.pack(update(job, name, 0, g0.weights)),
                                        qos=1)
                g1 = await w.version(1, 60)
                assert g1.contributors == ["site-a"]
                await ws.version(1, 60)  # the center's model came back down to the site's agents
        finally:
            proc.terminate()
            proc.wait(10)
