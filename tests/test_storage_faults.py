"""A state dir that cannot be written (disk full) on a real mosquitto: the aggregator stays up, confirms
nothing it could not store (so the agent's resend is taken once there is room), and a fusion whose
checkpoint fails is retried after a back-off instead of in a loop."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

import schemas
from aggregator.checkpoint import Checkpoint
from broker import BrokerProcess
from schemas import Topics, UpdateAck
from tests.mqtt_helpers import Watcher, client, publish, update
from tests.test_aggregator import running, settings, weights_like

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]


def _full(*_args: object, **_kw: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


async def test_an_update_the_inbox_cannot_store_is_not_confirmed_and_its_resend_is_taken(
        mosquitto: BrokerProcess, job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(mosquitto, job, quorum=5, state_dir=str(tmp_path / "st"))
    acks: list[UpdateAck] = []
    async with client(mosquitto, "acks") as c, Watcher(mosquitto, job) as w, running(s) as agg:
        await c.subscribe(Topics(job).ack("a0"), qos=1)

        async def collect() -> None:
            async for m in c.messages:
                acks.append(schemas.unpack(bytes(m.payload), UpdateAck))

        reader = asyncio.create_task(collect())
        g = await w.version(0)
        u = update(job, "a0", 0, weights_like(g, 0.1))
        payload = schemas.pack(u)
        with monkeypatch.context() as m:
            m.setattr(Checkpoint, "inbox_put", _full)
            await publish(mosquitto, Topics(job).update("a0"), payload)
            await w.until(lambda: agg.counters.rejected.get("storage") == 1, 15, "the unstored update counted")
        assert len(agg.buffer) == 0 and agg.counters.accepted == 0
        inbox = tmp_path / "st" / "inbox"
        assert (list(inbox.iterdir()) if inbox.exists() else []) == []  # no partial entry left behind
        assert not acks  # nothing confirmed: the agent keeps it and resends
        await publish(mosquitto, Topics(job).update("a0"), payload)  # the resend, with room again
        await w.until(lambda: agg.counters.accepted == 1, 15, "the resend accepted")
        async with asyncio.timeout(15):
            while not acks:
                await asyncio.sleep(0.05)
        reader.cancel()
        assert [(a.update_id, a.outcome) for a in acks] == [(u.update_id, "accepted")]
        assert (tmp_path / "st" / "inbox" / f"{u.update_id}.msgpack").exists()


async def test_a_fusion_whose_checkpoint_fails_backs_off_and_keeps_its_updates(
        mosquitto: BrokerProcess, job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(mosquitto, job, quorum=2, state_dir=str(tmp_path / "st"))
    async with Watcher(mosquitto, job) as w, running(s) as agg:
        g = await w.version(0)
        saves = []
        real_save = Checkpoint.save

        def failing_save(self: Checkpoint, version: int, *args: object) -> None:
            saves.append(version)
            if len(saves) <= 2:
                _full()
            real_save(self, version, *args)

        monkeypatch.setattr(Checkpoint, "save", failing_save)
        for i in range(2):
            await publish(mosquitto, Topics(job).update(f"a{i}"),
                          schemas.pack(update(job, f"a{i}", 0, weights_like(g, 0.1 * (i + 1)))))
        await w.until(lambda: any(st.fusion_failures == 1 for st in w.statuses), 15,
                      "a status that reports the first failed fusion")
        failing = next(st for st in w.statuses if st.fusion_failures == 1)
        assert failing.last_fusion_error == "OSError: [Errno 28] No space left on device" and failing.version == 0
        await asyncio.sleep(0.5)  # not synchronization: a window in which a retry loop would have run many times
        assert len(saves) == 1 and len(agg.buffer) == 2 and agg.version == 0
        g1 = await w.version(1, 20)  # retried after 1 s, then 2 s: the third try saves
        assert len(saves) == 3 and agg.fusion_failures == 2
        await w.until(lambda: any(st.version == 1 for st in w.statuses), 15, "the status of v1")
        fused = next(st for st in w.statuses if st.version == 1)
        assert fused.fusion_failures == 2 and fused.last_fusion_error is None  # recovered: nothing failing now
        assert sorted(g1.contributors) == ["a0", "a1"]


def test_the_inbox_is_read_one_payload_at_a_time(tmp_path: Path) -> None:
    """A restart with a long backlog holds one stored payload in memory at a time: an entry is read when
    the iteration reaches it (one dropped meanwhile is skipped), and ``inbox()`` still lists them all."""
    cp = Checkpoint(tmp_path)
    for i, uid in enumerate(("first", "second", "third")):
        cp.inbox_put(uid, bytes([i]) * 10)
        os.utime(cp.dir / "inbox" / f"{uid}.msgpack", (1000 + i, 1000 + i))
    assert [uid for uid, _ in cp.inbox()] == ["first", "second", "third"]
    entries = cp.inbox_entries()
    assert next(entries) == ("first", b"\x00" * 10)
    cp.inbox_drop(["second"])  # the service drops replaced updates while it restores
    assert list(entries) == [("third", b"\x02" * 10)]
