"""bench.network's emulated link: rate, delay and loss charged as documented, bytes intact."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from bench.network import Link, LinkProxy


def test_a_link_charges_serialization_delay_and_lost_segments() -> None:
    link = Link(rate=1_000_000, delay=0.025, loss=0.0)
    assert link.departure("up", 100_000, 0.0) == pytest.approx(0.1 + 0.025)  # 100 kB at 1 MB/s, then 25 ms
    assert link.departure("up", 100_000, 0.0) == pytest.approx(0.2 + 0.025)  # queued behind the first
    assert link.departure("down", 10_000, 0.0) == pytest.approx(0.01 + 0.025)  # the other direction is free
    lossy = Link(rate=1e9, delay=0.025, loss=0.01, rng=random.Random(1))
    stalls = [lossy.departure("up", 1460 * 10, 0.0) > 0.1 for _ in range(2000)]
    assert 0.07 < sum(stalls) / len(stalls) < 0.12  # 1 - 0.99^10 = 9.6 % of 10-segment pieces pay an RTO
    assert lossy.bytes["up"] == 2000 * 14600 and lossy.stalls == sum(stalls)


async def test_the_proxy_forwards_every_byte_after_the_link_delay() -> None:
    received = bytearray()
    done = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            received.extend(data)
            if len(received) >= 300_000:
                done.set()
        w.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    link = Link(rate=10e6 / 8, delay=0.05, loss=0.0)
    proxy = await LinkProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), link).start()
    payload = bytes(range(256)) * 1172  # 300,032 bytes
    t0 = time.monotonic()
    _, w = await asyncio.open_connection(proxy.host, proxy.port)
    w.write(payload)
    await w.drain()
    await asyncio.wait_for(done.wait(), 10)
    elapsed = time.monotonic() - t0
    w.close()
    await proxy.aclose()
    server.close()
    assert bytes(received) == payload and link.bytes["up"] == len(payload)
    assert elapsed >= 0.05 + len(payload) / link.rate * 0.95  # 240 ms at 10 Mbit/s plus 50 ms one way
