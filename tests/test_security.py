"""Broker auth, ACL and TLS with the project's production mosquitto config (real mosquitto)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path

import aiomqtt
import pytest

import schemas
from aggregator.settings import AggregatorSettings
from broker import start_broker
from broker.security import gen_credentials, gen_tls
from schemas import GlobalModel, ModelUpdate, PolicyCommand, PolicySpec, Topics
from tests.conftest import require_mosquitto
from tests.mqtt_helpers import Watcher, client
from tests.test_aggregator import running

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def secure(tmp_path: Path, job: str):
    require_mosquitto()
    conf = tmp_path / "secrets"
    users = gen_credentials(conf, agents=2, job=job)
    gen_tls(conf / "tls", clients=["agent-0"])
    with start_broker(kind="mosquitto", secure_dir=conf, data_dir=tmp_path / "data") as b:
        yield b, users, conf


def creds(users: dict, name: str) -> dict:
    return {"username": name, "password": users[name]}


async def test_acl_blocks_impersonation_global_and_control(secure, job: str) -> None:
    b, users, _ = secure
    topics = Topics(job)
    agg = creds(users, f"aggregator-{job}")
    s = AggregatorSettings(broker=b.url, job=job, task="noop", task_options={"shapes": [[4, 4]]}, quorum=1,
                           status_interval=0.2, device="cpu", **agg)
    async with Watcher(b, job, **creds(users, f"operator-{job}")) as w, running(s):
        g0 = await w.version(0)
        w_up = {k: v + 1 for k, v in g0.weights.items()}
        async with client(b, "a0", **creds(users, "agent-0")) as a0:
            forged = ModelUpdate(job=job, agent_id="agent-1", base_version=0, num_samples=1, weights=w_up)
            await a0.publish(topics.update("agent-1"), schemas.pack(forged), qos=1)
            fake_global = GlobalModel(job=job, version=99, policy="fedavg", weights=w_up)
            await a0.publish(topics.global_model, schemas.pack(fake_global), qos=1, retain=True)
            cmd = PolicyCommand(job=job, policy=PolicySpec(name="fedwb"))
            await a0.publish(topics.control, schemas.pack(cmd), qos=1, retain=True)
            # a legitimate update on its own topic goes through: the forged ones were not delivered
            own = ModelUpdate(job=job, agent_id="agent-0", base_version=0, num_samples=1, weights=w_up)
            await a0.publish(topics.update("agent-0"), schemas.pack(own), qos=1)
        g1 = await w.version(1)
        assert g1.contributors == ["agent-0"] and 99 not in w.globals
        await w.until(lambda: w.status.version == 1, 10, "status v1")
        st = w.status
        assert st.accepted == 1 and st.policy.name == "fedavg" and st.last_command is None


async def test_unauthenticated_and_wrong_password_are_refused(secure) -> None:
    b, users, _ = secure
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(10), client(b, "anon"):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(10), client(b, "bad", username="agent-0", password="wrong"):
            pass


async def test_tls_listener(secure) -> None:
    b, users, conf = secure
    good = ssl.create_default_context(cafile=str(conf / "tls" / "ca.crt"))
    async with asyncio.timeout(10), aiomqtt.Client(b.host, b.tls_port, tls_context=good,
                                                   **creds(users, "agent-0")) as c:
        await c.publish(Topics("x").update("agent-0"), b"hello", qos=1)
    untrusted = ssl.create_default_context()  # system CAs only: our server cert is not trusted
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(10), aiomqtt.Client(b.host, b.tls_port, tls_context=untrusted,
                                                       **creds(users, "agent-0")):
            pass
    with pytest.raises((aiomqtt.MqttError, TimeoutError)):
        async with asyncio.timeout(5), aiomqtt.Client(b.host, b.tls_port, **creds(users, "agent-0")):
            pass  # plain MQTT on the TLS port


async def test_big_payloads_over_tls_reach_the_aggregators_fast_reader_intact(secure, job: str) -> None:
    """The aggregator's receive path over TLS: bodies read with recv_into from an SSL socket (16 KB records, data
    already decrypted when the socket stops signalling), payloads as views, the backlog bounded at 1 MB."""
    from schemas.backlog import bound_backlog
    from schemas.receive import fast_publish

    b, users, conf = secure
    tls = ssl.create_default_context(cafile=str(conf / "tls" / "ca.crt"))
    payloads = [os.urandom(n) for n in (3 * 2**20, 200_000, 1_000_000, 70_000, 2 * 2**20)]
    sub = aiomqtt.Client(b.host, b.tls_port, tls_context=tls, **creds(users, f"aggregator-{job}"))
    assert fast_publish(sub, views=True)
    queue = bound_backlog(sub, max_bytes=2**20)
    async with asyncio.timeout(30), sub, aiomqtt.Client(b.host, b.tls_port, tls_context=tls,
                                                        **creds(users, "agent-0")) as pub:
        await sub.subscribe(Topics(job).updates, qos=1)
        for p in payloads:
            await pub.publish(Topics(job).update("agent-0"), p, qos=1)
        got = []
        async for m in sub.messages:
            got.append(m.payload)
            if len(got) == len(payloads):
                break
    assert all(isinstance(p, memoryview) for p in got)
    assert [bytes(p) for p in got] == payloads
    assert queue.pauses >= 1


async def test_python_password_hash_is_accepted_by_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    conf = tmp_path / "s"
    users = gen_credentials(conf, agents=1, use_binary=False)
    gen_tls(conf / "tls")
    assert json.loads((conf / "credentials.json").read_text()) == users
    with start_broker(kind="mosquitto", secure_dir=conf, data_dir=tmp_path / "d") as b:
        async with asyncio.timeout(10), client(b, "a", **creds(users, "agent-0")) as c:
            await c.publish(Topics("x").update("agent-0"), b"1", qos=1)


def test_compose_names_only_existing_commands() -> None:
    import yaml
    from typer.main import get_command

    from fedwb.cli import app
    from fedwb.commands import register

    register(app)
    known = set(get_command(app).commands)
    compose = yaml.safe_load((Path(__file__).parent.parent / "compose.yaml").read_text())
    used = []
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "fedwb":
            used.append(cmd[1])
            assert cmd[1] in known, f"service {name} runs unknown command fedwb {cmd[1]}"
    assert {"aggregator", "agent"} <= set(used)




async def test_chunked_models_pass_the_generated_acl_and_agents_cannot_forge_chunks(secure, job: str) -> None:
    """The generated ACL lets agents read global/chunk/+ (and only the aggregator write it)."""
    from edge_agent.agent import Agent, AgentSettings
    from schemas.chunks import pack_chunk
    from tests.test_faults import wait_for

    b, users, _ = secure
    small = {"chunk_bytes": 4096, "chunk_above": 1024}
    s = AggregatorSettings(broker=b.url, job=job, task="noop", task_options={"shapes": [[64, 64]]}, quorum=1,
                           status_interval=0.2, device="cpu", **creds(users, f"aggregator-{job}"), **small)
    async with running(s) as agg:
        await wait_for(lambda: agg.published_version == 0, 15, "chunked v0 published")
        async with client(b, "a1", **creds(users, "agent-1")) as a1:  # a forged chunk 0 is not delivered
            await a1.publish(Topics(job).global_chunk(0), pack_chunk("global-v0", 0, b"x" * 4096), qos=1,
                             retain=True)
        dev = Agent(AgentSettings(broker=b.url, job=job, agent_id="agent-0", task="noop",
                                  task_options={"shapes": [[64, 64]]}, max_rounds=1, exit_wait=30,
                                  **creds(users, "agent-0"), **small))
        await asyncio.wait_for(dev.run(), 60)
        assert dev.trained_from == 0 and dev.verdicts == {"accepted": 1}
        await wait_for(lambda: agg.version == 1, 15, "the chunked update fused")


async def test_refused_credentials_end_the_agent_and_the_aggregator_with_one_line(secure, job: str) -> None:
    """A wrong password at the first connection is the operator's error, not an outage: exit code 2 and one
    line naming the user, instead of retrying "connection lost (Not authorized)" forever (the evaluator
    retried in silence)."""
    import subprocess

    from fedwb import executable

    b, users, _ = secure
    env = {**os.environ, "FEDWB_USERNAME": "agent-0", "FEDWB_PASSWORD": users["agent-0"] + "x"}
    cmds = {"agent": [executable(), "agent", "--broker", b.url, "--job", job, "--task", "noop", "--agent-id",
                      "agent-0"],
            "aggregator": [executable(), "aggregator", "--broker", b.url, "--job", job, "--task", "noop"],
            "evaluate": [executable(), "evaluate", "--broker", b.url.replace("mqtt://", "mqtt://agent-0:wrong@"),
                         "--job", job, "--task", "noop"]}
    runs = await asyncio.gather(*(asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True,
                                                    timeout=90) for cmd in cmds.values()))
    for name, r in zip(cmds, runs, strict=True):
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2, f"{name}: exit {r.returncode}\n{r.stderr}"
        assert "Traceback" not in r.stderr and last.startswith("error: the broker at") and "'agent-0'" in last, last
