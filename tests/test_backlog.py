"""The bounded incoming backlog: a slow consumer holds a bounded amount, nothing is lost, nothing deadlocks."""

from __future__ import annotations

import asyncio
import os
import time

import aiomqtt

from schemas.backlog import Backlog, bound_backlog
from tests.mqtt_helpers import client

KB = 1024


class Watched(Backlog):
    """A Backlog that records the most it held and signals its first pause."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.most = 0
        self.first_pause = asyncio.Event()

    def _put(self, item) -> None:
        super()._put(item)
        self.most = max(self.most, self.bytes)

    def _pause(self) -> None:
        super()._pause()
        if self.paused:
            self.first_pause.set()


def watched(c: aiomqtt.Client, max_bytes: int) -> Watched:
    c._queue = Watched(c, max_bytes=max_bytes)
    return c._queue


async def _through(b, name: str, limit: int, count: int, handle, wait_for_pause: bool = False) -> Watched:
    """Publish ``count`` messages of 100 KB to a subscriber whose queue is bounded at ``limit`` bytes, then
    consume them all, calling ``await handle(i, sub, queue)`` on the i-th; they must all arrive, in order."""
    payloads = [os.urandom(100 * KB) for _ in range(count)]
    sub = client(b, name)
    queue = watched(sub, limit)
    async with sub, client(b, "pub") as pub:
        await sub.subscribe(f"{name}/#", qos=1)
        for i, p in enumerate(payloads):
            await pub.publish(f"{name}/{i}", p, qos=1)
        got = []
        async with asyncio.timeout(60):
            if wait_for_pause:
                await queue.first_pause.wait()
            async for m in sub.messages:
                got.append(bytes(m.payload))
                await handle(len(got) - 1, sub, queue)
                if len(got) == len(payloads):
                    break
    assert got == payloads
    return queue


def test_a_slow_consumer_holds_a_bounded_backlog_and_loses_nothing(mosquitto) -> None:
    """60 messages of 100 KB to a subscriber that acknowledges on arrival (the broker sends all it has) and
    handles each in a few ms: it never holds much more than its 1 MB bound, and gets all 60, in order."""

    async def handle(i: int, sub, queue) -> None:
        await asyncio.sleep(0.003)  # the consumer's work, not synchronisation

    queue = asyncio.run(_through(mosquitto, "slow", 1024 * KB, 60, handle))
    assert queue.pauses >= 1 and queue.first_pause.is_set()
    assert queue.most <= 1024 * KB + 101 * KB  # the bound, plus the one packet that crossed it
    assert queue.bytes == 0 and not queue.paused


def test_a_consumer_that_waits_on_the_reader_is_not_deadlocked(mosquitto) -> None:
    """The reader is paused (the queue is over its bound) while the consumer awaits the PUBACK of its own QoS 1
    publish, which only the reader can deliver: the stall is detected, the reader resumes, the publish
    completes, and every message still arrives."""

    async def handle(i: int, sub, queue) -> None:
        if i == 0:
            await sub.publish("wait-reply", b"x", qos=1)  # needs the reader for its PUBACK

    queue = asyncio.run(_through(mosquitto, "wait", 250 * KB, 10, handle, wait_for_pause=True))
    assert queue.stalls >= 1


def test_work_that_needs_no_reader_keeps_the_bound(mosquitto) -> None:
    """A consumer busy for 0.5 s in a thread (a big decode, a disk write) inside ``working()``: no stall is
    declared, so the queue stays within its bound while 40 more messages wait in the broker."""

    async def handle(i: int, sub, queue) -> None:
        if i == 0:
            with queue.working():
                await asyncio.to_thread(time.sleep, 0.5)  # the work itself, needing no reader

    queue = asyncio.run(_through(mosquitto, "busy", 300 * KB, 40, handle))
    assert queue.stalls == 0 and queue.pauses >= 1
    assert queue.most <= 300 * KB + 101 * KB


def test_without_a_socket_the_queue_only_counts() -> None:
    """Before connecting (or on a loop without a selector) nothing can be paused: the queue still takes every
    message and counts what it holds; bound_backlog is idempotent and refuses objects without a queue."""

    class Msg:
        def __init__(self, payload) -> None:
            self.payload = payload

    async def go() -> None:
        c = aiomqtt.Client("127.0.0.1", 1, identifier="never-connected")
        q = bound_backlog(c, max_bytes=10)
        assert q is c._queue and bound_backlog(c) is q
        for p in (b"x" * 100, memoryview(b"y" * 50), "not bytes", None):
            q.put_nowait(Msg(p))
        assert q.qsize() == 4 and q.bytes == 150 and not q.paused
        assert q.get_nowait().payload == b"x" * 100 and q.bytes == 50 and q.taken == 1
        assert bound_backlog(object()) is None

    asyncio.run(go())


def test_no_pause_outlasts_max_pause(mosquitto, monkeypatch) -> None:
    """A consumer that works (inside ``working()``) longer than MAX_PAUSE_S: the reader is put back now and
    then so the keepalive sees bytes, and each time it pauses again at the next packet over the bound."""
    from schemas import backlog

    monkeypatch.setattr(backlog, "MAX_PAUSE_S", 0.2)

    async def handle(i: int, sub, queue) -> None:
        if i == 0:
            with queue.working():
                await asyncio.to_thread(time.sleep, 1.0)

    queue = asyncio.run(_through(mosquitto, "keep", 300 * KB, 30, handle))
    assert queue.stalls == 0 and queue.pauses >= 3  # paused, read one more after each 0.2 s, paused again
    assert queue.most <= 300 * KB + 8 * 101 * KB  # at most one packet per 0.2 s beyond the bound


def test_the_aggregators_backlog_shows_in_its_metrics(mosquitto, job: str, monkeypatch) -> None:
    """An aggregator whose backlog bound (300 KB here) is crossed by 40 updates of 400 KB: every update is
    accepted, and /metrics reports the pauses, nothing held at the end, and the reader not paused."""
    import functools
    import urllib.request

    import schemas
    from aggregator import service
    from broker import free_port
    from schemas import Topics
    from schemas import backlog as bl
    from tests.mqtt_helpers import Watcher, update
    from tests.test_aggregator import running, settings

    monkeypatch.setattr(service, "bound_backlog", functools.partial(bl.bound_backlog, max_bytes=300 * KB))
    port = free_port()
    s = settings(mosquitto, job, task_options={"shapes": [[100_000]]}, quorum=1000, metrics_port=port)

    async def go() -> str:
        async with Watcher(mosquitto, job) as w, running(s):
            g = await w.version(0)
            payloads = [schemas.pack(update(job, f"a{i}", 0, {k: v + i for k, v in g.weights.items()}))
                        for i in range(40)]
            async with client(mosquitto, "pub") as pub:
                for i, p in enumerate(payloads):
                    await pub.publish(Topics(job).update(f"a{i}"), p, qos=1)
            await w.until(lambda: w.statuses and w.status.accepted == 40, 60, "40 accepted")
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())

    text = asyncio.run(go())
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("fedwb_incoming_")}
    assert values["fedwb_incoming_pauses"] >= 1
    assert values["fedwb_incoming_bytes"] == 0 and values["fedwb_incoming_messages"] == 0
    assert values["fedwb_incoming_paused"] == 0 and "fedwb_incoming_stalls" in values
