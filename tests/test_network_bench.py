"""bench.network's emulated link: rate, delay and loss charged as documented, bytes intact."""

from __future__ import annotations

import argparse
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


async def test_flower_nodes_dial_the_superlink_through_their_links() -> None:
    from bench.vs_flower import flower

    try:
        flower.find_or_create(create=False)
    except RuntimeError:
        pytest.skip(f"flwr {flower.FLWR_VERSION} not installed (the bench installs it into .venv-flower on demand)")
    from bench.network import run_flower

    args = argparse.Namespace(mbit=100.0, rtt_ms=2.0, loss=0.0, params=1000, rounds=2, timeout=180.0)
    cell = await run_flower(args, 2)
    assert cell["versions"] == 2 and cell["round_seconds_median"] > 0
    model = 4 * 1000  # float32: every round, each node's link carries the model down and its reply up
    assert cell["wan_down_bytes"] >= 2 * 2 * model and cell["wan_up_bytes"] >= 2 * 2 * model
