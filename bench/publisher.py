"""A publisher process for the load benchmarks, started with ``subprocess`` (never forked).

    python -m bench.publisher HOST PORT JOB INDEX COUNT PARAMS BASE

Packs ``COUNT`` updates of one ``PARAMS``-element tensor for agents ``p{INDEX}-{i % 50}`` (before
connecting, so it spends no CPU on encoding while the receiver is timed), connects, prints
``ready``, waits for a line on stdin, publishes them at QoS 1 as fast as it can, then waits
for stdin to close before it exits: a Python process with torch loaded takes ~0.1 s of CPU
to exit, and four of them exiting inside the timed window stalled the receiver for 200 ms.

Why not ``multiprocessing`` with fork: a forked child shares the measured process's pages
copy-on-write, so every page that process writes afterwards takes a page fault, even freed
heap it reuses. In ``bench.ingest`` that was 66-100 minor faults per 400 KB update in the
aggregator, a cost no deployed aggregator pays (its agents are other processes, often other
machines). The stdin barrier makes all publishers start together, as forked ones did.
Each publisher sets ``schemas.heap.keep_heap()``, as ``fedwb agent`` does, in every phase: forked
publishers inherited it from the aggregator phases only (the bench sets it before them), so
those phases had cheaper publishers than the plain-subscriber phases they are compared with.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

import aiomqtt
import torch

import schemas
from schemas import ModelUpdate, Topics
from schemas.heap import keep_heap


def payloads(job: str, idx: int, count: int, params: int, base: int) -> list[tuple[str, bytes]]:
    """(topic, packed update) for each of ``count`` updates of publisher ``idx``."""
    w = {"t0": torch.randn(params)}
    out = []
    for i in range(count):
        agent = f"p{idx}-{i % 50}"
        out.append((Topics(job).update(agent),
                    schemas.pack(ModelUpdate(job=job, agent_id=agent, base_version=base, num_samples=1, weights=w))))
    return out


async def publish(host: str, port: int, job: str, idx: int, count: int, params: int, base: int) -> None:
    """Connect, say ``ready``, wait for the go line, publish everything at QoS 1, wait for stdin's end."""
    msgs = payloads(job, idx, count, params, base)
    async with aiomqtt.Client(host, port, identifier=f"bench-pub-{idx}-{uuid.uuid4().hex[:6]}",
                              max_inflight_messages=100) as c:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for topic, payload in msgs:
            await c.publish(topic, payload, qos=1)
    await asyncio.to_thread(sys.stdin.read)


class Publishers:
    """``n`` publisher processes splitting ``messages`` updates; ``await start()`` returns once all
    are connected and have been told to go."""

    def __init__(self, host: str, port: int, job: str, n: int, messages: int, params: int, base: int = 0) -> None:
        per = messages // n
        self.procs = [subprocess.Popen([sys.executable, "-m", "bench.publisher", host, str(port), job, str(i),
                                        str(per), str(params), str(base)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for i in range(n)]

    async def start(self, timeout: float = 120.0) -> Publishers:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), max(0.1, deadline - time.monotonic()))
            if line.strip() != "ready":
                self.kill()
                raise RuntimeError(f"a bench publisher exited before connecting (exit code {p.poll()})")
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return self

    async def join(self, timeout: float = 60.0) -> None:
        """Let every publisher exit (once the timed part is over) and wait; one that fails or hangs is an error."""
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            try:
                rc = await asyncio.to_thread(p.wait, timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"a bench publisher still ran {timeout:.0f} s after the others were done") from None
            if rc != 0:
                raise RuntimeError(f"a bench publisher exited with code {rc}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> None:
    host, port, job, idx, count, params, base = (argv if argv is not None else sys.argv[1:])
    keep_heap()  # as `fedwb agent` does
    asyncio.run(publish(host, int(port), job, int(idx), int(count), int(params), int(base)))


if __name__ == "__main__":
    main()
