"""Models larger than one MQTT packet (issue 16): manifest + checksummed chunks, end to end.

The integration tests shrink the thresholds (chunk everything over 1 KiB, 4 KiB chunks)
so a small model takes the chunked path on a real mosquitto in seconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker import BrokerProcess
from edge_agent.agent import Agent, AgentSettings
from schemas import ModelUpdate, Topics, WireError
from schemas.chunks import (
    CHUNK,
    MANIFEST,
    FileStore,
    FileWeights,
    MemoryStore,
    Outgoing,
    Reassembly,
    build_message,
    pack_manifest,
    peek_kind,
    unpack_chunk,
    unpack_manifest,
)
from tests.mqtt_helpers import client, update
from tests.test_aggregator import running
from tests.test_faults import wait_for

pytestmark = pytest.mark.timeout(180)
SHAPES = [[300, 100], [100], [7]]
SMALL = {"chunk_bytes": 4096, "chunk_above": 1024}


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 100, generator=g), "b": torch.randn(100, generator=g),
            "n": torch.arange(7), "e": torch.empty(0, 3), "d": torch.randn(5, dtype=torch.float64, generator=g)}


def roundtrip(msg: ModelUpdate, chunk: int, store_for) -> ModelUpdate:
    out = Outgoing(msg, msg.update_id, chunk)
    payloads = list(out.payloads())
    manifest = unpack_manifest(payloads[0], max_bytes=1 << 30)
    r = Reassembly(manifest, store_for(manifest.total_bytes))
    for p in reversed(payloads[1:]):  # any order
        _, index, data = unpack_chunk(p)
        assert r.add(index, data)
    assert r.complete
    return build_message(ModelUpdate, manifest, r.weights())


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(min_value=1024, max_value=200_000))
def test_any_chunk_size_reassembles_the_same_message(chunk: int) -> None:
    msg = update("j", "a", 3, model(), n=7)
    back = roundtrip(msg, chunk, MemoryStore)
    assert back.update_id == msg.update_id and back.num_samples == 7 and back.base_version == 3
    assert set(back.weights) == set(msg.weights)
    for k, t in msg.weights.items():
        assert back.weights[k].dtype == t.dtype and torch.equal(back.weights[k], t)


def test_a_file_store_reads_one_tensor_per_access(tmp_path: Path) -> None:
    msg = update("j", "a", 0, model())
    back = roundtrip(msg, 5000, lambda n: FileStore(tmp_path / "x.data", n))
    assert isinstance(back.weights, FileWeights)
    assert back.weights.meta("w") == ((300, 100), torch.float32)
    assert (tmp_path / "x.data").stat().st_size == back.weights.nbytes
    assert torch.equal(back.weights["w"], msg.weights["w"]) and back.weights["w"] is not back.weights["w"]


def test_kinds_are_told_apart_without_decoding() -> None:
    msg = update("j", "a", 0, model())
    out = Outgoing(msg, msg.update_id, 50_000)
    first, second = list(out.payloads())[:2]
    assert peek_kind(first) == MANIFEST and peek_kind(second) == CHUNK
    assert peek_kind(schemas.pack(msg)) is None and peek_kind(b"\x00garbage garbage") is None


def test_chunks_that_do_not_belong_are_refused() -> None:
    msg = update("j", "a", 0, model())
    out = Outgoing(msg, msg.update_id, 10_000)
    manifest = unpack_manifest(out.manifest_payload(), max_bytes=1 << 30)
    r = Reassembly(manifest, MemoryStore(manifest.total_bytes))
    _, index, data = unpack_chunk(next(out.chunk_payloads()))
    with pytest.raises(WireError, match="does not match its digest"):
        r.add(index, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(WireError, match="chunk 99 of a"):
        r.add(99, data)
    assert r.add(index, data) and not r.add(index, data)  # a repeat is ignored
    assert not r.complete


def test_bad_manifests_are_one_line_errors() -> None:
    msg = update("j", "a", 0, model())
    m = Outgoing(msg, msg.update_id, 10_000).manifest
    with pytest.raises(WireError, match="exceeds the limit of 1,000 bytes"):
        unpack_manifest(pack_manifest(m), max_bytes=1000)
    bad = m.model_copy(update={"digests": m.digests[:-1]})
    with pytest.raises(WireError, match="digests for"):
        unpack_manifest(pack_manifest(bad), max_bytes=1 << 30)
    shifted = m.model_copy(update={"tensors": [t.model_copy(update={"offset": t.offset + 4}) for t in m.tensors]})
    with pytest.raises(WireError, match="bad dtype, shape or offset"):
        unpack_manifest(pack_manifest(shifted), max_bytes=1 << 30)
    tiny = Outgoing(msg, msg.update_id, 100).manifest  # thousands of tiny chunks: refused
    with pytest.raises(WireError, match="chunk size 100 is below the minimum of 1024 bytes"):
        unpack_manifest(pack_manifest(tiny), max_bytes=1 << 30)
    with pytest.raises(WireError, match="expected a ChunkManifest"):
        unpack_manifest(schemas.pack(msg), max_bytes=1 << 30)


def test_nan_in_a_chunked_update_is_named() -> None:
    w = model()
    w["b"][3] = float("nan")
    msg = update("j", "a", 0, w)
    out = Outgoing(msg, msg.update_id, 10_000)
    manifest = unpack_manifest(out.manifest_payload(), max_bytes=1 << 30)
    r = Reassembly(manifest, MemoryStore(manifest.total_bytes))
    for p in out.chunk_payloads():
        r.add(*unpack_chunk(p)[1:])
    with pytest.raises(WireError, match=r"weights\['b'\] contains NaN"):
        r.weights()


# ------------------------------------------------------------------ on a real broker


def agg(b: BrokerProcess, job: str, state: Path | None, **kw) -> AggregatorSettings:
    base = dict(broker=b.url, job=job, task="noop", task_options={"shapes": SHAPES}, quorum=3, status_interval=0.2,
                device="cpu", state_dir=str(state) if state else None, **SMALL)
    base.update(kw)
    return AggregatorSettings(**base)


def agent(b: BrokerProcess, job: str, name: str, rounds: int) -> Agent:
    return Agent(AgentSettings(broker=b.url, job=job, agent_id=name, task="noop", task_options={"shapes": SHAPES},
                               max_rounds=rounds, seed=hash(name) % 1000, exit_wait=60, **SMALL))


async def test_three_agents_federate_a_chunked_model(mosquitto: BrokerProcess, job: str) -> None:
    """Updates and global models both travel in chunks; agents train from the chunked globals."""
    async with running(agg(mosquitto, job, None, max_rounds=2)) as a:
        agents = [agent(mosquitto, job, f"dev{i}", 2) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*(x.run() for x in agents)), 120)
        await wait_for(lambda: a.version >= 2, 60, "two chunked rounds fused")
        assert a.counters.accepted == 6 and not a.counters.rejected
        assert [h["n_contributors"] if "n_contributors" in h else len(h["contributors"]) for h in a.history] == [3, 3]
        assert all(x.verdicts.get("accepted", 0) + x.verdicts.get("replaced", 0) == 2 for x in agents)
        assert all(x.trained_from == 1 for x in agents)  # round 2 started from the chunked v1
        v1 = agents[0].latest
        assert v1 is not None and v1.version >= 1
        spool = a.transfers.spool
    assert not spool.exists() or not any(spool.iterdir())  # spooled updates go once fused
    async with client(mosquitto, "late") as c:  # a late subscriber: the retained manifest, then retained chunks
        await c.subscribe(Topics(job).global_model, qos=1)
        async with asyncio.timeout(10):
            async for m in c.messages:
                manifest = unpack_manifest(bytes(m.payload), max_bytes=1 << 30)
                break
        assert manifest.envelope["version"] == 2 and manifest.n_chunks() > 5


async def test_a_chunked_update_is_checked_before_its_bytes_resumes_and_survives_a_restart(
        mosquitto: BrokerProcess, job: str, tmp_path: Path) -> None:
    topics = Topics(job)
    s = agg(mosquitto, job, tmp_path / "state", quorum=2)
    async with running(s) as a:
        await wait_for(lambda: a._client is not None, 15, "the aggregator connected")
        ref = {k: v.clone() for k, v in a.weights.items()}
        wrong = update(job, "dev0", 0, {**ref, "t0": torch.zeros(30, 10)})
        good = update(job, "dev1", 0, {k: v + 1 for k, v in ref.items()})
        async with client(mosquitto, "dev") as c:
            # wrong shapes: rejected from the manifest alone; its chunks are dropped unread
            for p in Outgoing(wrong, wrong.update_id, 4096).payloads():
                await c.publish(topics.update("dev0"), p, qos=1)
            await wait_for(lambda: a.counters.rejected.get("shape_mismatch") == 1, 15, "the manifest rejected")
            # half a transfer, then the whole one again (a resend after a reconnect): one update, accepted once
            out = Outgoing(good, good.update_id, 4096)
            payloads = list(out.payloads())
            for p in payloads[: len(payloads) // 2]:
                await c.publish(topics.update("dev1"), p, qos=1)
            corrupt = unpack_chunk(payloads[-1])
            await c.publish(topics.update("dev1"), schemas.chunks.pack_chunk(corrupt[0], corrupt[1], b"x" * len(
                corrupt[2])), qos=1)
            await wait_for(lambda: a.counters.rejected.get("bad_chunk") == 1, 15, "the corrupt chunk refused")
            assert a.counters.accepted == 0
            for p in payloads:
                await c.publish(topics.update("dev1"), p, qos=1)
            await wait_for(lambda: a.counters.accepted == 1, 15, "the chunked update accepted")
        assert a.counters.duplicate == 0 and a.version == 0 and len(a.buffer) == 1
        inbox = sorted(p.name for p in (tmp_path / "state" / "inbox").iterdir())
        assert inbox == [f"{good.update_id}.data", f"{good.update_id}.manifest"]
    async with running(s) as b:  # restart: the chunked update comes back from the inbox
        await wait_for(lambda: b._client is not None, 15, "the aggregator connected again")
        assert len(b.buffer) == 1 and b.counters.accepted == 1
        other = update(job, "dev2", 0, {k: v - 1 for k, v in ref.items()})
        async with client(mosquitto, "dev2") as c:
            for p in Outgoing(other, other.update_id, 4096).payloads():
                await c.publish(topics.update("dev2"), p, qos=1)
        await wait_for(lambda: b.version == 1, 30, "the restored and the new update fused")
        for k, v in ref.items():  # FedAvg of +1 and -1 around the reference (integers: the newest's)
            if v.is_floating_point():
                torch.testing.assert_close(b.weights[k], v, rtol=0, atol=1e-6)
    assert not any((tmp_path / "state" / "inbox").iterdir())


def test_the_aggregator_settings_bound_chunk_sizes() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be 0"):
        AggregatorSettings(task="noop", chunk_bytes=300 * 1024 * 1024)
    with pytest.raises(ValueError, match="chunk_above"):  # a model between 256 MiB and it could never be sent
        AggregatorSettings(task="noop", chunk_above=300 * 1024 * 1024)
    assert Aggregator(AggregatorSettings(task="noop", chunk_bytes=0)).s.chunk_bytes == 0


def test_a_manifest_of_millions_of_tensors_is_refused_before_validation() -> None:
    import time

    import msgpack

    from schemas.chunks import MANIFEST as KIND

    body = {"kind": KIND, "schema_version": 1, "of": "ModelUpdate", "transfer_id": "x", "envelope": {},
            "tensors": [{"name": f"t{i}", "dtype": "float32", "shape": [1], "offset": 4 * i} for i in range(2_000_000)],
            "total_bytes": 8_000_000, "chunk_bytes": 1 << 20, "digests": ["0" * 64] * 8}
    payload = msgpack.packb(body)
    t0 = time.perf_counter()
    with pytest.raises(WireError, match="weights has 2000000 tensors, more than the limit of 100000"):
        unpack_manifest(payload, max_bytes=1 << 30)
    with pytest.raises(WireError, match="the global model has 3"):
        unpack_manifest(payload, max_bytes=1 << 30, tensors=3, max_tensors=10**7)
    assert time.perf_counter() - t0 < 5  # two msgpack parses, no per-entry validation


def test_open_transfers_are_bounded_in_count_and_bytes(tmp_path: Path) -> None:
    from aggregator.transfers import Transfers

    msg = update("j", "a", 0, model())
    m = Outgoing(msg, msg.update_id, 10_000).manifest
    t = Transfers(tmp_path, max_open=2, timeout=60, max_bytes=3 * m.total_bytes)
    assert t.start("a", m, b"") == "opened" and t.start("a", m, b"") == "resumed"
    other = m.model_copy(update={"transfer_id": "other"})
    t.start("b", other, b"")
    with pytest.raises(WireError, match="2 chunked transfers are open, the limit is 2"):
        t.start("c", m.model_copy(update={"transfer_id": "third"}), b"")
    t.max_open = 10
    big = m.model_copy(update={"transfer_id": "big", "total_bytes": 2 * m.total_bytes})
    with pytest.raises(WireError, match="spool limit"):
        t.start("d", big, b"")
    assert t.expire(now=time_after(120)) == ["a", "b"] and not any(tmp_path.iterdir())


def time_after(seconds: float) -> float:
    import time

    return time.monotonic() + seconds
