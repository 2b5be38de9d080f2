"""The trust boundary (issue 15): each attack from the issue, against a real mosquitto.

Every test here failed on the code before the fix (the figure it failed with is in
docs/security.md's table).
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch

import schemas
from aggregator.fusion.robust import delta_norm
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker import BrokerProcess, start_broker
from broker.security import gen_credentials, gen_tls
from edge_agent.agent import Agent, AgentSettings
from schemas import GlobalModel, Topics
from tests.conftest import require_mosquitto
from tests.mqtt_helpers import Watcher, client, publish, update
from tests.test_aggregator import running

pytestmark = pytest.mark.timeout(120)
SHAPES = [[20, 10], [10]]


def settings(b: BrokerProcess, job: str, **kw) -> AggregatorSettings:
    """Production defaults for the influence bounds (unlike tests/test_aggregator.py)."""
    base = dict(broker=b.url, job=job, task="noop", task_options={"shapes": SHAPES}, quorum=3,
                status_interval=0.2, device="cpu")
    base.update(kw)
    return AggregatorSettings(**base)


def moved(g: dict[str, torch.Tensor], delta: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + delta * torch.randn(v.shape, generator=gen) for k, v in g.items()}


async def test_hijack_by_num_samples_and_huge_tensor_is_bounded(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job)
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        for i in range(2):
            honest = update(job, f"h{i}", 0, moved(g0.weights, 0.1, i))
            await publish(mosquitto, topics.update(f"h{i}"), schemas.pack(honest))
        evil = {k: torch.full_like(v, 1e30) for k, v in g0.weights.items()}
        await publish(mosquitto, topics.update("x"), schemas.pack(update(job, "x", 0, evil, n=10**15)))
        g1 = await w.version(1)
    shares = dict(zip(g1.info["contributors"], g1.info["weights"], strict=True))
    assert shares["x"] <= 2 / 3 + 1e-6  # share cap 2/quorum, was 0.999999999999998
    defense = g1.info["defense"]
    assert defense["norms_clipped"] == ["x"] and defense["shares_capped"] == ["x"]
    honest = sorted(delta_norm(moved(g0.weights, 0.1, i), g0.weights) for i in range(2))
    # every fused delta is clipped to 3x the lower median (an honest norm): the model moves at most that
    assert delta_norm(g1.weights, g0.weights) <= 3 * honest[0] * (1 + 1e-5)
    assert all(torch.isfinite(t).all() and t.abs().max() < 10 for t in g1.weights.values())


async def test_loose_wire_types_are_rejected_and_counted(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=1)
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        good = update(job, "a", 0, moved(g0.weights, 0.1, 0))
        body = msgpack.unpackb(schemas.pack(good), raw=False)
        for bad in (True, "7", 3.0, "1" + "0" * 400, 2**60):
            await publish(mosquitto, topics.update("a"), msgpack.packb({**body, "num_samples": bad,
                                                                        "update_id": f"bad{len(str(bad))}"}))
        await publish(mosquitto, topics.update("a"), msgpack.packb({**body, "base_version": False}))
        await w.until(lambda: w.status.rejected.get("invalid_field", 0) == 6, 20, "6 invalid_field rejections")
        assert 1 not in w.globals and w.status.buffer_fill == 0
        await publish(mosquitto, topics.update("a"), schemas.pack(good))
        g1 = await w.version(1)
        assert g1.contributors == ["a"]


async def test_a_spoofed_sent_at_does_not_lock_out_the_real_agent(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=2)
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        fake = {k: v + 1000.0 for k, v in g0.weights.items()}
        far = update(job, "h1", 0, fake).model_copy(update={"sent_at": time.time() + 1e9})
        near = update(job, "h1", 0, fake).model_copy(update={"sent_at": time.time() + 200})  # within tolerance
        await publish(mosquitto, topics.update("h1"), schemas.pack(far))
        await w.until(lambda: w.status.rejected.get("clock_skew", 0) == 1, 20, "clock_skew rejection")
        await publish(mosquitto, topics.update("h1"), schemas.pack(near))
        await w.until(lambda: w.status.accepted == 1, 20, "the spoof within tolerance buffered")
        real = update(job, "h1", 0, {k: v + 1.0 for k, v in g0.weights.items()})  # arrives later: replaces
        await publish(mosquitto, topics.update("h1"), schemas.pack(real))
        await w.until(lambda: w.status.replaced == 1, 20, "the real h1 replaced the spoof")
        await publish(mosquitto, topics.update("h2"), schemas.pack(update(job, "h2", 0,
                                                                          {k: v + 3.0 for k, v in g0.weights.items()})))
        g1 = await w.version(1)
    for k in g0.weights:  # (real h1 + h2) / 2: the spoof is gone
        assert torch.allclose(g1.weights[k], g0.weights[k] + 2.0, atol=1e-4)


async def test_a_failure_at_any_step_of_a_round_loses_no_update(tmp_path: Path, monkeypatch) -> None:
    """Inject an exception into each step of a fusion round: the updates stay buffered (and in the
    inbox) and the next round fuses all of them."""
    import aggregator.service as service
    from aggregator.checkpoint import Checkpoint

    steps = {"bound_influence": (service, "bound_influence"), "dispersion": (service, "dispersion"),
             "fuse": (service, "fuse_with_report"), "checkpoint": (Checkpoint, "save")}
    for step, (owner, attr) in steps.items():
        job = f"fault-{step}"
        s = AggregatorSettings(job=job, task="noop", task_options={"shapes": SHAPES}, quorum=3, device="cpu",
                               state_dir=str(tmp_path / step), policy={"name": "hybrid", "switch_after": 1,
                                                                     "dispersion_below": 1e-9})
        agg = Aggregator(s)
        agg.prepare()
        ids = []
        for i in range(3):
            u = update(job, f"a{i}", 0, moved(agg.weights, 0.1, i))
            ids.append(u.update_id)
            agg.checkpoint.inbox_put(u.update_id, schemas.pack(u))
            assert agg.buffer.admit(u, f"a{i}", 0, agg.weights, time.monotonic()).kept
        real = getattr(owner, attr)

        def broken(*a, _step=step, **kw):
            raise RuntimeError(f"injected failure in {_step}")

        monkeypatch.setattr(owner, attr, broken)
        await agg._fuse()
        assert agg.version == 0 and len(agg.buffer) == 3, step
        assert sorted(uid for uid, _ in agg.checkpoint.inbox()) == sorted(ids), step
        monkeypatch.setattr(owner, attr, real)
        await agg._fuse()
        assert agg.version == 1 and len(agg.buffer) == 0, step
        assert sorted(agg.history[-1]["update_ids"]) == sorted(ids), step
        assert agg.checkpoint.inbox() == [], step


async def test_agents_refuse_a_forged_retained_global(mosquitto: BrokerProcess, job: str, tmp_path: Path) -> None:
    users = gen_credentials(tmp_path, agents=1, job=job)
    assert f"aggregator-{job}" in users
    s = settings(mosquitto, job, quorum=1, signing_key=str(tmp_path / "global-signing.key"))
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        assert g0.signature
        forged = GlobalModel(job=job, version=10**9, policy="fedavg", weights=moved(g0.weights, 5.0, 9))
        await publish(mosquitto, topics.global_model, schemas.pack(forged), retain=True)
        agent = Agent(AgentSettings(broker=mosquitto.url, job=job, agent_id="dev", task="noop",
                                    task_options={"shapes": SHAPES}, max_rounds=1,
                                    verify_key=str(tmp_path / "global-signing.pub")))
        run = asyncio.create_task(agent.run())
        # the retained slot holds the forgery; another agent's update makes the aggregator publish v1
        await publish(mosquitto, topics.update("h"), schemas.pack(update(job, "h", 0, moved(g0.weights, 0.1, 1))))
        assert await asyncio.wait_for(run, 60) == 0
        g2 = await w.version(2)
    assert agent.refused == {"unsigned": 1}
    assert g2.info["base_versions"] == [1]  # the agent trained from the signed v1, not from v10**9


async def test_agents_decode_a_global_off_their_event_loop(mosquitto: BrokerProcess, job: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A global model of many tensors takes ~0.2 s per 20,000 to decode: the agent decodes it in a worker
    thread, so its event loop (keepalives, acks, status) never waits on a global's size."""
    on_loop: list[str] = []  # the agent's decodes on the event loop's thread
    in_workers = 0
    real_unpack = schemas.unpack

    def spy(payload, cls, **kw):
        nonlocal in_workers
        if cls is GlobalModel:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if threading.current_thread() is not threading.main_thread():
                in_workers += 1
            elif caller == "edge_agent.agent":
                on_loop.append(caller)
        return real_unpack(payload, cls, **kw)

    monkeypatch.setattr(schemas, "unpack", spy)
    async with Watcher(mosquitto, job) as w, running(settings(mosquitto, job, quorum=1)):
        await w.version(0)
        agent = Agent(AgentSettings(broker=mosquitto.url, job=job, agent_id="dev", task="noop",
                                    task_options={"shapes": SHAPES}, max_rounds=1))
        assert await asyncio.wait_for(agent.run(), 60) == 0
        await w.version(1)
    assert in_workers >= 1 and on_loop == []  # v0 (and v1 if it came first) decoded in a worker


def test_agent_refuses_a_global_of_the_wrong_shape_or_job() -> None:
    agent = Agent(AgentSettings(task="noop", task_options={"shapes": SHAPES}))
    weights = agent.task.initial_weights()
    assert agent._refusal(GlobalModel(job="default", version=1, policy="init", weights=weights)) is None
    wrong = {**weights, "t0": torch.zeros(3)}
    assert agent._refusal(GlobalModel(job="default", version=1, policy="init", weights=wrong))[0] == "shape_mismatch"
    assert agent._refusal(GlobalModel(job="other", version=1, policy="init", weights=weights))[0] == "wrong_job"


@pytest.fixture
def two_jobs(tmp_path: Path, job: str):
    require_mosquitto()
    conf = tmp_path / "secrets"
    users = gen_credentials(conf, agents=2, job=job)
    users.update(gen_credentials(conf, agents=1, job=f"{job}-b", prefix="b-agent-", append=True))
    gen_tls(conf / "tls")
    with start_broker(kind="mosquitto", secure_dir=conf, data_dir=tmp_path / "data") as b:
        yield b, users


def creds(users: dict, name: str) -> dict:
    return {"username": name, "password": users[name]}


async def test_secure_broker_no_session_takeover(two_jobs, job: str) -> None:
    b, users = two_jobs
    s = settings(b, job, quorum=1, **creds(users, f"aggregator-{job}"))
    topics = Topics(job)
    async with Watcher(b, job, **creds(users, f"operator-{job}")) as w, running(s) as agg:
        g0 = await w.version(0)
        import aiomqtt

        async with aiomqtt.Client(b.host, b.port, identifier=s.identifier, clean_session=True,
                                  **creds(users, "agent-0")) as thief:
            await thief.publish(topics.update("agent-0"), schemas.pack(update(job, "agent-0", 0,
                                                                              moved(g0.weights, 0.1, 0))), qos=1)
            g1 = await w.version(1)
        assert g1.contributors == ["agent-0"]
        assert agg.reconnects == 0  # the aggregator's session was never taken over


async def test_secure_broker_no_publishing_into_another_job(two_jobs, job: str) -> None:
    b, users = two_jobs
    other = f"{job}-b"
    s = settings(b, other, quorum=1, **creds(users, f"aggregator-{other}"))
    topics = Topics(other)
    async with Watcher(b, other, **creds(users, f"operator-{other}")) as w, running(s):
        g0 = await w.version(0)
        async with client(b, "a0", **creds(users, "agent-0")) as a0:  # an agent of the first job
            await a0.publish(topics.update("agent-0"), schemas.pack(update(other, "agent-0", 0, g0.weights)), qos=1)
        async with client(b, "b0", **creds(users, "b-agent-0")) as b0:
            await b0.publish(topics.update("b-agent-0"), schemas.pack(update(other, "b-agent-0", 0,
                                                                              moved(g0.weights, 0.1, 1))), qos=1)
        g1 = await w.version(1)
        assert g1.contributors == ["b-agent-0"]
        await w.until(lambda: w.status.version == 1, 10, "status v1")
        assert w.status.accepted == 1 and not w.status.rejected


def test_share_cap_default_and_settings_bounds() -> None:
    assert AggregatorSettings(task="noop", quorum=3).share_cap == pytest.approx(2 / 3)
    assert AggregatorSettings(task="noop", quorum=1).share_cap == 1.0
    with pytest.raises(ValueError, match="--task or --init"):
        AggregatorSettings()
    with pytest.raises(ValueError):
        schemas.PolicySpec(name="fedwb-sinkhorn", reg=1e6)
    assert math.isclose(AggregatorSettings(task="noop", quorum=10, max_share=0.5).share_cap, 0.5)
