"""bench.ingest's shared-subscription workers (issue 17, item 3) on a real mosquitto: every update is
admitted exactly once across the worker processes, and mosquitto spreads them over all members."""

from __future__ import annotations

import socket

import psutil
import pytest

from bench.ingest import workers_rate
from broker import BrokerProcess

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.mark.parametrize("workers", [1, 2])
async def test_shared_subscription_workers_admit_every_update_once(mosquitto: BrokerProcess, workers: int) -> None:
    out = await workers_rate(mosquitto.url, mosquitto.host, mosquitto.port, publishers=2, messages=60, params=1000,
                             workers=workers)
    assert out["accepted"] == 60
    assert len(out["per_worker"]) == workers and sum(out["per_worker"]) == 60
    assert all(n > 0 for n in out["per_worker"])  # a shared subscription feeds every member
    assert out["updates_per_s"] > 0
    left = [p for p in psutil.Process().children(recursive=True) if p.pid != mosquitto.proc.pid]
    assert not left, [p.cmdline() for p in left]  # workers, publishers, no resource tracker


async def test_a_publisher_that_cannot_connect_is_a_clear_error() -> None:
    """bench.publisher's processes are started with subprocess (not forked from the measured process); one
    that exits before it connects fails start() with its exit code instead of hanging the bench."""
    from bench.publisher import Publishers

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pubs = Publishers("127.0.0.1", port, "bench-noconn", 1, 2, 10)
    with pytest.raises(RuntimeError, match="exited before connecting"):
        await pubs.start(timeout=60)
    assert all(p.poll() is not None for p in pubs.procs)
