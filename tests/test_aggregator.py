"""The aggregator service against a real mosquitto: quorum, deadline, bad input, policy, restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import schemas
from aggregator.buffer import UpdateBuffer
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker import BrokerProcess
from fedwb import executable
from schemas import PolicyCommand, PolicySpec, Topics
from tests.mqtt_helpers import Watcher, publish, update

pytestmark = pytest.mark.timeout(180)
SHAPES = [[20, 10], [10]]


def settings(b: BrokerProcess, job: str, **kw) -> AggregatorSettings:
    """These tests check the fusion arithmetic: the default influence bounds are off unless asked for
    (tests/test_trust.py tests them)."""
    base = dict(broker=b.url, job=job, task="noop", task_options={"shapes": SHAPES}, quorum=3,
                status_interval=0.2, device="cpu", clip_factor=0.0, max_share=1.0)
    base.update(kw)
    return AggregatorSettings(**base)


@contextlib.asynccontextmanager
async def running(s: AggregatorSettings):
    agg = Aggregator(s)
    task = asyncio.create_task(agg.run())
    try:
        yield agg
    finally:
        agg.stop()
        await asyncio.wait_for(task, 30)


def weights_like(g: schemas.GlobalModel, delta: float) -> dict[str, torch.Tensor]:
    return {k: v + delta for k, v in g.weights.items()}


async def send(b: BrokerProcess, job: str, agent: str, base: int, w: dict, n: int = 10) -> schemas.ModelUpdate:
    u = update(job, agent, base, w, n)
    await publish(b, Topics(job).update(agent), schemas.pack(u))
    return u


async def test_hybrid_schedule_and_bad_input_counted(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, policy=PolicySpec(name="hybrid", switch_after=2, wb_method="fedwb"))
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        g = await w.version(0)
        assert g.policy == "init"
        agents = [f"a{i}" for i in range(5)]
        for rnd in range(3):
            base = max(w.globals)
            for i, a in enumerate(agents[rnd: rnd + 3]):
                await send(mosquitto, job, a, base, weights_like(w.globals[base], 0.01 * (i + 1)))
                if i == 0:  # garbage and NaN in between
                    await publish(mosquitto, topics.update(a), os.urandom(64))
                    nan = {k: torch.full_like(v, math.nan) for k, v in w.globals[base].weights.items()}
                    await publish(mosquitto, topics.update(a), schemas.pack(update(job, a, base, nan)))
            await w.version(rnd + 1)
        assert [w.globals[v].policy for v in (1, 2, 3)] == ["fedwb", "fedwb", "fedavg"]
        assert w.globals[3].contributors == ["a2", "a3", "a4"]
        await w.until(lambda: w.status.version == 3 and w.status.rejected.get("non_finite") == 3, 10, "counts")
        st = w.status
        assert st.rejected["not_msgpack"] == 3 and st.accepted == 9
        assert st.last_choice == "fedavg"


async def test_fedavg_value_duplicate_stale_and_shape(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=2, max_staleness=0, staleness_alpha=0.0)
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        u = await send(mosquitto, job, "a", 0, weights_like(g0, 1.0), n=1)
        await publish(mosquitto, topics.update("a"), schemas.pack(u))  # QoS 1 redelivery
        wrong = {k: torch.zeros(3) for k in g0.weights}
        await send(mosquitto, job, "b", 0, wrong)
        await send(mosquitto, job, "b", 0, weights_like(g0, 4.0), n=3)
        g1 = await w.version(1)
        for k in g0.weights:  # (1*(w+1) + 3*(w+4)) / 4 = w + 3.25
            assert torch.allclose(g1.weights[k], g0.weights[k] + 3.25, atol=1e-5)
        await send(mosquitto, job, "c", 0, weights_like(g0, 1.0))  # base 0 at version 1: stale
        await send(mosquitto, job, "d", 5, weights_like(g0, 1.0))  # from the future
        await w.until(lambda: w.status.stale == 1 and w.status.rejected.get("from_future") == 1, 10, "stale")
        st = w.status
        assert st.duplicate == 1 and st.rejected["shape_mismatch"] == 1 and st.version == 1


async def test_deadline_fuses_with_min_updates(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=5, min_updates=2, deadline=0.5)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        await send(mosquitto, job, "a", 0, weights_like(g0, 1.0))
        await w.until(lambda: w.status.buffer_fill == 1, 10, "one buffered")
        await asyncio.sleep(0.8)  # let the deadline pass with one update: nothing is fused
        assert 1 not in w.globals
        await send(mosquitto, job, "b", 0, weights_like(g0, 1.0))
        g1 = await w.version(1, 10)
        assert sorted(g1.contributors) == ["a", "b"]
        assert g1.info["quorum_wait_seconds"] >= 0.5


async def test_policy_command_at_runtime(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=1, policy=PolicySpec(name="fedwb"))
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        await send(mosquitto, job, "a", 0, weights_like(g0, 0.1))
        assert (await w.version(1)).policy == "fedwb"
        cmd = PolicyCommand(job=job, policy=PolicySpec(name="fedavg"))
        await publish(mosquitto, topics.control, schemas.pack(cmd), retain=True)
        await w.until(lambda: w.status.last_command is not None
                      and w.status.last_command.command_id == cmd.command_id, 10, "ack")
        assert w.status.last_command.accepted and w.status.pending_policy.name == "fedavg"
        await publish(mosquitto, topics.control, b"\x93not a command", retain=True)
        await w.until(lambda: w.status.last_command.command_id == "?", 10, "rejection")
        assert not w.status.last_command.accepted and w.status.rejected["bad_command"] == 1
        await send(mosquitto, job, "a", 1, weights_like(w.globals[1], 0.1))
        g2 = await w.version(2)
        assert g2.policy == "fedavg" and g2.method == "fedavg"
        await w.until(lambda: w.status.version == 2 and w.status.policy.name == "fedavg", 10, "status v2")
        ack = w.status.last_command  # the valid command was applied, the bad one never
        assert ack.command_id == cmd.command_id and ack.applied_at_version == 2


async def test_status_keeps_flowing_during_a_big_fusion(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=2, task_options={"shapes": [[1000, 1000]]},
                 policy=PolicySpec(name="fedwb-sinkhorn", reg=1.0, max_iter=150, stop_threshold=1e-12))
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        await send(mosquitto, job, "a", 0, weights_like(g0, 0.01))
        await send(mosquitto, job, "b", 0, weights_like(g0, 0.02))
        await w.until(lambda: w.status.state == "fusing", 20, "fusing")
        await send(mosquitto, job, "c", 0, weights_like(g0, 0.03))  # arrives during the fusion
        await w.until(lambda: w.status.state == "fusing" and w.status.buffer_fill == 1, 20, "buffered while fusing")
        fusing_statuses = sum(1 for st in w.statuses if st.state == "fusing")
        assert fusing_statuses >= 2
        g1 = await w.version(1, 120)  # 1M parameters, K = 2, 150 iterations: seconds; minutes on a busy box
        assert sorted(g1.contributors) == ["a", "b"]
        await w.until(lambda: w.status.version == 1 and w.status.buffer_fill == 1, 10, "c kept for next round")


def test_buffer_weights_follow_staleness() -> None:
    buf = UpdateBuffer("j", max_staleness=5, staleness_alpha=1.0)
    ref = {"w": torch.zeros(2)}
    for agent, base, n in (("a", 4, 10), ("b", 2, 10), ("c", 4, 30)):
        adm = buf.admit(update("j", agent, base, {"w": torch.ones(2)}, n), agent, 4, ref, now=float(base))
        assert adm.kept
    rnd = buf.take(4)
    assert [u.agent_id for u in rnd.updates] == ["b", "a", "c"]  # arrival order
    assert rnd.staleness == [2, 0, 0]
    assert rnd.weights == pytest.approx([10 / 3, 10.0, 30.0])  # n_k (1 + tau_k)^-1


def _spawn(b: BrokerProcess, job: str, state_dir: Path, log: Path) -> subprocess.Popen:
    fedwb = executable()
    cmd = [fedwb, "aggregator", "--broker", b.url, "--job", job, "--task", "noop",
           "--task-option", "shapes=[[20, 10], [10]]", "--quorum", "2", "--policy", "fedavg",
           "--state-dir", str(state_dir), "--device", "cpu"]
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


async def test_kill_9_and_restart_loses_nothing(mosquitto: BrokerProcess, job: str, tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "agg.log"
    proc = _spawn(mosquitto, job, state, log)
    try:
        async with Watcher(mosquitto, job) as w:
            g0 = await w.version(0, 60)
            await send(mosquitto, job, "a", 0, weights_like(g0, 1.0))
            await send(mosquitto, job, "b", 0, weights_like(g0, 1.0))
            g1 = await w.version(1)
            await send(mosquitto, job, "a", 1, weights_like(g1, 2.0))  # buffered, not yet fused
            await w.until(lambda: w.status.buffer_fill == 1, 10, "one buffered")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            await send(mosquitto, job, "b", 1, weights_like(g1, 4.0))  # sent while it is down
            proc = _spawn(mosquitto, job, state, log)
            g2 = await w.version(2, 60)
        assert sorted(g2.contributors) == ["a", "b"]
        for k in g1.weights:
            assert torch.allclose(g2.weights[k], g1.weights[k] + 3.0, atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]


async def test_cli_policy_set_and_show(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=1)
    fedwb = executable()
    async with Watcher(mosquitto, job) as w, running(s):
        await w.version(0)
        out = await asyncio.to_thread(subprocess.run, [fedwb, "policy", "set", "--broker", mosquitto.url,
                                                       "--job", job, "hybrid", "--switch-after", "2"],
                                      capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "accepted" in out.stdout, out.stdout + out.stderr
        bad = await asyncio.to_thread(subprocess.run, [fedwb, "policy", "set", "--broker", mosquitto.url,
                                                       "--job", job, "hybrid"],
                                      capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "switch_after" in bad.stderr + bad.stdout
        show = await asyncio.to_thread(subprocess.run, [fedwb, "policy", "show", "--broker", mosquitto.url,
                                                        "--job", job], capture_output=True, text=True, timeout=60)
        assert show.returncode == 0 and "pending: hybrid" in show.stdout, show.stdout + show.stderr
        robust = await asyncio.to_thread(subprocess.run, [fedwb, "policy", "set", "--broker", mosquitto.url,
                                                          "--job", job, "trimmed-mean", "--trim-ratio", "0.3"],
                                         capture_output=True, text=True, timeout=60)
        assert robust.returncode == 0, robust.stdout + robust.stderr
        show = await asyncio.to_thread(subprocess.run, [fedwb, "policy", "show", "--broker", mosquitto.url,
                                                        "--job", job, "--json"], capture_output=True, text=True,
                                       timeout=60)
        pending = json.loads(show.stdout)["pending_policy"]
        assert (pending["name"], pending["trim_ratio"]) == ("trimmed-mean", 0.3)




def test_rate_limit_and_norm_bound_are_counted_reasons() -> None:
    ref = {"w": torch.zeros(4)}
    buf = UpdateBuffer("j", rate_limit=2, max_update_norm=1.0)
    outcomes = [buf.admit(update("j", "a", 0, {"w": torch.full((4,), 0.1)}), "a", 0, ref, now=0.0)
                for _ in range(3)]
    assert [o.reason for o in outcomes] == ["", "", "rate_limited"]
    far = buf.admit(update("j", "b", 0, {"w": torch.full((4,), 1.0)}), "b", 0, ref, now=0.0)
    assert far.reason == "norm_bound" and "2 > 1" in far.detail


async def test_rate_limit_counts_each_update_once(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=10, rate_limit=2)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        for delta in (0.1, 0.2, 0.3):
            await send(mosquitto, job, "a", 0, weights_like(g0, delta))
        await w.until(lambda: w.status.accepted + sum(w.status.rejected.values()) == 3, 10, "three counted")
        assert w.status.accepted == 2 and w.status.rejected == {"rate_limited": 1}


async def test_server_learning_rate_moves_part_way(mosquitto: BrokerProcess, job: str) -> None:
    s = settings(mosquitto, job, quorum=1, server_lr=0.5)
    async with Watcher(mosquitto, job) as w, running(s):
        g0 = await w.version(0)
        await send(mosquitto, job, "a", 0, weights_like(g0, 2.0))
        g1 = await w.version(1)
    for k in g0.weights:  # W0 + 0.5 (W0 + 2 - W0)
        assert torch.allclose(g1.weights[k], g0.weights[k] + 1.0, atol=1e-6)
    assert g1.info["server_lr"] == 0.5


async def test_a_clean_stop_saves_the_records(mosquitto: BrokerProcess, job: str, tmp_path) -> None:
    """SIGTERM after updates were admitted: state.json counts them and lists the buffered one (no stale records)."""
    import json

    s = settings(mosquitto, job, quorum=3, state_dir=str(tmp_path / "st"))
    async with Watcher(mosquitto, job) as w, running(s) as agg:
        g0 = await w.version(0)
        for agent in ("a1", "a2"):
            await send(mosquitto, job, agent, 0, weights_like(g0, 0.1))
        await w.until(lambda: len(agg.buffer) == 2, what="two buffered updates")
    st = json.loads((tmp_path / "st" / "state.json").read_text())
    assert st["counters"]["accepted"] == 2 and len(st["buffered_ids"]) == 2
    assert set(st["buffered_ids"]) <= set(st["seen_ids"]) and st["version"] == 0


def test_the_entropic_kernels_compile_at_start_only_when_the_policy_will_use_them() -> None:
    from aggregator.fusion import sinkhorn_fast

    def uses(spec: PolicySpec, device: str = "cpu") -> bool:
        agg = Aggregator(AggregatorSettings(broker="mqtt://127.0.0.1:1", job="warm", task="noop", device=device,
                                            policy=spec))
        return agg._uses_compiled_solver()

    assert uses(PolicySpec(name="fedwb-sinkhorn")) and uses(PolicySpec(name="hybrid", switch_after=3))
    assert not uses(PolicySpec(name="fedavg")) and not uses(PolicySpec(name="hybrid", switch_after=0))
    assert not uses(PolicySpec(name="fedwb-sinkhorn", solver="log"))
    assert not uses(PolicySpec(name="hybrid", switch_after=3, wb_method="fedwb-neurons"))
    assert sinkhorn_fast.warm_up() >= 0.0
