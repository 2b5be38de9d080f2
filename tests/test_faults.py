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


def test_a_model_over_one_mqtt_packet_is_one_clear_error_when_chunking_is_off(tmp_path: Path) -> None:
    s = AggregatorSettings(job="j", task="noop", task_options={"shapes": [[68_000_000]]}, device="cpu",
                           chunk_bytes=0)
    with pytest.raises(ValueError, match=r"is 272,000,000 bytes: over MQTT's limit of 268,435,455 bytes per packet, "
                                         r"and chunked transfer is off \(--chunk-mib 0\)"):
        Aggregator(s).prepare()
