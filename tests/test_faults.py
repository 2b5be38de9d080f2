"""Hard faults (issue 16): a broker crash, a restart after replacements, hostile envelopes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgpack
import pytest
import torch

import schemas
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker import BrokerProcess
from edge_agent.agent import Agent, AgentSettings
from schemas import GlobalModel, ModelUpdate, Topics, WireError
from tests.mqtt_helpers import Watcher, client, update
from tests.test_aggregator import running

pytestmark = pytest.mark.timeout(180)
SHAPES = [[20, 10], [10]]


def agg_settings(b: BrokerProcess, job: str, state: Path, **kw) -> AggregatorSettings:
    base = dict(broker=b.url, job=job, task="noop", task_options={"shapes": SHAPES}, quorum=1,
                status_interval=0.2, device="cpu", state_dir=str(state))
    base.update(kw)
    return AggregatorSettings(**base)


async def wait_for(cond, timeout: float, what: str) -> None:
    """Poll a plain attribute of an in-process object (no event to wait on) with a deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def retained_version(b: BrokerProcess, job: str) -> int:
    async with client(b, "late") as c:
        await c.subscribe(Topics(job).global_model, qos=1)
        async with asyncio.timeout(15):
            async for m in c.messages:
                return schemas.unpack(bytes(m.payload), GlobalModel).version
    raise AssertionError("no retained global model")


async def test_broker_crash_while_aggregator_is_down_loses_no_confirmed_update(
        mosquitto: BrokerProcess, job: str, tmp_path: Path) -> None:
    s = agg_settings(mosquitto, job, tmp_path / "state")
    async with running(s):  # version 0 retained; the persistent session exists, then the aggregator leaves
        await asyncio.wait_for(retained_version(mosquitto, job), 15)
    agent = Agent(AgentSettings(broker=mosquitto.url, job=job, agent_id="dev", task="noop",
                                task_options={"shapes": SHAPES}, max_rounds=1, exit_wait=120))
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: agent.unconfirmed is not None, 30, "the update published (PUBACK) to the broker")
    await asyncio.to_thread(mosquitto.kill)  # kill -9 before mosquitto's autosave: its queue is gone
    await asyncio.to_thread(mosquitto.restart)
    async with Watcher(mosquitto, job) as w, running(s) as agg:
        g1 = await w.version(1, 60)  # the agent resent after reconnecting; nothing was lost
        assert await asyncio.wait_for(run, 60) == 0
        assert g1.contributors == ["dev"] and agent.resends >= 1 and agent.verdicts == {"accepted": 1}
        await asyncio.to_thread(mosquitto.kill)  # and again: the retained v1 may not have been saved
        await asyncio.to_thread(mosquitto.restart)
        await w.until(lambda: agg.reconnects >= 1, 30, "the aggregator reconnected")
        await wait_for(lambda: agg.published_version == agg.version, 30, "republished after the reconnect")
        assert await retained_version(mosquitto, job) == agg.version == 1


def test_restart_drops_updates_that_were_replaced(tmp_path: Path) -> None:
    """A crash between storing a replacement and dropping the replaced file left both in the inbox;
    the restart must not fuse the replaced one (it did, after its replacement)."""
    s = AggregatorSettings(job="j", task="noop", task_options={"shapes": SHAPES}, quorum=5, device="cpu",
                           state_dir=str(tmp_path))
    first = Aggregator(s)
    first.prepare()
    old = update("j", "a", 0, {k: v + 1 for k, v in first.weights.items()})
    new = update("j", "a", 0, {k: v + 2 for k, v in first.weights.items()})
    other = update("j", "b", 0, {k: v + 3 for k, v in first.weights.items()})
    for u in (old, new, other):  # oldest first, as they arrived
        first.checkpoint.inbox_put(u.update_id, schemas.pack(u))
        time.sleep(0.01)  # distinct mtimes: the inbox is replayed in arrival order
    again = Aggregator(s)
    again.prepare()
    assert {a: b.update.update_id for a, b in again.buffer.items.items()} == {"a": new.update_id,
                                                                               "b": other.update_id}
    assert sorted(uid for uid, _ in again.checkpoint.inbox()) == sorted([new.update_id, other.update_id])
    assert again.counters.accepted == 3  # accepted after the last checkpoint: counted from the inbox


def test_millions_of_tiny_tensors_are_refused_from_the_header() -> None:
    body = msgpack.unpackb(schemas.pack(update("j", "a", 0, {"w": torch.zeros(2)})), raw=False)
    tiny = {"dtype": "float32", "shape": [1], "data": b"\0\0\0\0"}
    body["weights"] = {f"t{i}": tiny for i in range(300_000)}
    payload = msgpack.packb(body, use_bin_type=True)
    assert schemas.tensor_count(payload) == 300_000
    with pytest.raises(WireError, match="more than the limit"):
        schemas.unpack(payload, ModelUpdate)
    with pytest.raises(WireError, match="tensor count"):
        schemas.unpack(payload, ModelUpdate, tensors=2, max_tensors=10**6)


def _bloated(where: str) -> bytes:
    """A ModelUpdate of one small tensor with ~3 MB of tiny objects (or one long string) outside it."""
    body = msgpack.unpackb(schemas.pack(update("j", "a", 0, {"w": torch.zeros(2)})), raw=False)
    tensor = body["weights"]["w"]
    if where == "metrics":
        body["metrics"] = {f"m{i}": 1.0 for i in range(300_000)}
    elif where == "agent_id":
        body["agent_id"] = "a" * 3_000_000
    elif where == "extra field":
        body["notes"] = [[0] * 8 for _ in range(300_000)]
    elif where == "tensor entry":
        tensor.update({f"x{i}": 0 for i in range(300_000)})
    elif where == "shape":
        tensor["shape"] = [1] * 3_000_000
    elif where == "tensor name":
        body["weights"] = {"w" * 3_000_000: tensor}
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("where", ["metrics", "agent_id", "extra field", "tensor entry", "shape", "tensor name"])
def test_millions_of_tiny_objects_outside_the_tensors_are_refused_from_the_headers(where: str) -> None:
    """The sibling of millions of tiny tensors: the bytes outside tensor data are capped per message
    class before anything is decoded, wherever they sit."""
    payload = _bloated(where)
    for limit in (None, 1):  # the reference model's tensor count given or not
        with pytest.raises(WireError, match=r"ModelUpdate has [\d,]+ bytes outside its tensor data, over the cap"):
            schemas.unpack(payload, ModelUpdate, tensors=limit)
    with pytest.raises(WireError, match="outside its tensor data"):
        schemas.unpack(b"\x81" + msgpack.packb("policy") + msgpack.packb(["x"] * 100_000), schemas.PolicyCommand)


def test_what_a_real_model_carries_outside_its_tensors_is_under_the_caps() -> None:
    """No false alarms: 64 metrics with 64-character names, 300 tensors with long names, and a
    global model whose info holds 2,000 contributors' metrics all decode."""
    names = {f"encoder.layer.{i}.attention.self.query.weight.{'x' * 150}": torch.zeros(3) for i in range(300)}
    metrics = {f"{i:02d}" + "m" * 62: 0.5 for i in range(64)}
    big = ModelUpdate(job="j", agent_id="a" * 128, base_version=0, num_samples=1, weights=names, metrics=metrics)
    u = schemas.unpack(schemas.pack(big), ModelUpdate, tensors=300)
    assert len(u.weights) == 300 and len(u.metrics) == 64
    info = {"agent_metrics": {f"agent-{i}": metrics for i in range(2_000)}, "contributors": [f"agent-{i}" for i in
                                                                                           range(2_000)]}
    g = GlobalModel(job="j", version=3, policy="fedavg", weights={"w": torch.zeros(4)}, info=info)
    assert len(schemas.unpack(schemas.pack(g), GlobalModel).info["agent_metrics"]) == 2_000


def test_a_manifest_with_a_bloated_envelope_or_too_many_digests_is_refused_from_its_headers() -> None:
    from schemas.chunks import MAX_CHUNKS, Outgoing, unpack_manifest

    u = update("j", "a", 0, {"w": torch.zeros(1000)})
    body = msgpack.unpackb(next(iter(Outgoing(u, u.update_id, 1024).payloads())), raw=False)
    assert unpack_manifest(msgpack.packb(body), max_bytes=1 << 30).of == "ModelUpdate"
    bloated = {**body, "envelope": {**body["envelope"], "metrics": {f"m{i}": 1.0 for i in range(300_000)}}}
    with pytest.raises(WireError, match="over the cap of"):
        unpack_manifest(msgpack.packb(bloated), max_bytes=1 << 30)
    with pytest.raises(WireError, match="chunk digests, more than the limit"):
        unpack_manifest(msgpack.packb({**body, "digests": [""] * (MAX_CHUNKS + 1)}), max_bytes=1 << 30)


async def test_a_bloated_update_and_command_are_counted_and_the_round_still_fuses(
        mosquitto: BrokerProcess, job: str, tmp_path: Path) -> None:
    """On a real broker: the running aggregator refuses both from their headers, counts each once, and
    fuses the honest update that follows."""
    s = agg_settings(mosquitto, job, tmp_path / "state")
    topics = Topics(job)
    async with Watcher(mosquitto, job) as w, running(s) as agg:
        g0 = await w.version(0)
        body = msgpack.unpackb(schemas.pack(update(job, "a", 0, {k: v + 1 for k, v in g0.weights.items()})),
                               raw=False)
        async with client(mosquitto, "attacker") as c:
            await c.publish(topics.update("a"), msgpack.packb({**body, "metrics": {f"m{i}": 1.0 for i in
                                                                                   range(300_000)}}), qos=1)
            await c.publish(topics.control, b"\x81" + msgpack.packb("policy") + msgpack.packb(["x"] * 300_000),
                            qos=1)
            await c.publish(topics.update("a"), msgpack.packb(body), qos=1)
        g1 = await w.version(1)
        assert g1.contributors == ["a"]
        assert agg.counters.rejected.get("metadata_size") == 1 and agg.counters.rejected.get("bad_command") == 1
        assert "outside its tensor data" in agg.last_command.reason


def test_a_model_over_one_mqtt_packet_is_one_clear_error_when_chunking_is_off(tmp_path: Path) -> None:
    s = AggregatorSettings(job="j", task="noop", task_options={"shapes": [[68_000_000]]}, device="cpu",
                           chunk_bytes=0)
    with pytest.raises(ValueError, match=r"is 272,000,000 bytes: over MQTT's limit of 268,435,455 bytes per packet, "
                                         r"and chunked transfer is off \(--chunk-mib 0\)"):
        Aggregator(s).prepare()


async def test_a_stream_of_well_formed_commands_is_not_a_stream_of_statuses(
        mosquitto: BrokerProcess, job: str, tmp_path: Path) -> None:
    """Commands for this job and for another, 301 of them: the aggregator answers with at most one status per
    COMMAND_STATUS_S (plus its periodic one), and the last command's answer is the one that stays."""
    from aggregator.service import COMMAND_STATUS_S
    from schemas import PolicyCommand, PolicySpec

    s = agg_settings(mosquitto, job, tmp_path / "state", status_interval=5.0)
    async with Watcher(mosquitto, job) as w, running(s):
        await w.version(0)
        before, t0 = len(w.statuses), time.monotonic()
        async with client(mosquitto, "operator") as c:
            for i in range(300):
                cmd = PolicyCommand(job=job if i % 2 else "other-job", policy=PolicySpec(name="fedavg"),
                                    command_id=f"c{i}")
                await c.publish(Topics(job).control, schemas.pack(cmd), qos=1)
            last = PolicyCommand(job=job, policy=PolicySpec(name="fedwb"), command_id="last")
            await c.publish(Topics(job).control, schemas.pack(last), qos=1)
        await w.until(lambda: w.status.last_command is not None and w.status.last_command.command_id == "last",
                      15, "the last command's answer")
        elapsed = time.monotonic() - t0
        published = len(w.statuses) - before  # every status the broker delivered to a subscriber
        assert published <= elapsed / COMMAND_STATUS_S + elapsed / 5.0 + 3, (published, elapsed)
        assert w.status.last_command.accepted and w.status.pending_policy.name == "fedwb"
