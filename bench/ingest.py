"""Ingest benchmark: how fast the aggregator admits updates, against a plain subscriber.

    python -m bench.ingest --json [--publishers 4] [--messages 400] [--params 100000]

Phase 1: P publisher processes (``bench.publisher``: started with ``subprocess``, not
forked, so the measured process pays no copy-on-write faults; they start together) send
``messages`` packed 100k-parameter updates as fast as they can through mosquitto on
loopback to a plain aiomqtt subscriber (receive only); then
again to a plain subscriber with the aggregator's one-copy PUBLISH decoder
(``schemas.receive``), so the report separates that decoder's gain from the rest.
Phase 2: the same stream to the real aggregator (decode, validate, buffer; durable inbox
on and off), which never reaches quorum; its accepted count comes from its status. The
in-memory run is repeated (``ratio_warm``): the first aggregator of the process grows the
heap for the 200 agents' buffered updates, as a service's first round does; the second
reuses it, as every later round does. ``ratio`` stays the first one's. It runs
with ``schemas.heap.keep_heap()`` set, as ``fedwb aggregator`` does (the plain phases run
before, with glibc's defaults; ``FEDWB_KEEP_HEAP=0`` leaves them for both).
Phase 2b (``--workers N``): the same stream to 1, then N aggregator *processes* that share the
update topic through an MQTT shared subscription (``$share/GROUP/fedwb/J/update/+``; mosquitto
hands each message to one member, round robin), so N decoders run in parallel: whether more
processes beat one on this machine (issue 17, item 3).
Phase 3: latency from the quorum-completing update's publish to the global model's
arrival at a subscriber, for a 1M-parameter model, fedavg and fedwb (median, p95).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
import uuid

import aiomqtt
import torch

import schemas
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from bench.common import emit, machine, progress
from bench.publisher import Publishers
from broker import start_broker
from schemas import GlobalModel, ModelUpdate, PolicySpec, Topics
from schemas.heap import keep_heap
from schemas.receive import fast_publish


async def plain_rate(host: str, port: int, publishers: int, messages: int, params: int,
                     fast: bool = False) -> tuple[float, float]:
    """Messages/s a plain subscriber receives, and this process's CPU µs per message while it does
    (``fast``: with the aggregator's one-copy PUBLISH decoder, ``schemas.receive``)."""
    job = "bench-plain-fast" if fast else "bench-plain"
    total = (messages // publishers) * publishers
    c = aiomqtt.Client(host, port, identifier=f"{job}-sub")
    if fast:
        fast_publish(c)
    async with c:
        await c.subscribe(Topics(job).updates, qos=1)
        procs = await Publishers(host, port, job, publishers, messages, params).start()
        got, first, cpu0 = 0, None, 0.0
        async for _ in c.messages:
            got += 1
            if first is None:
                first, cpu0 = time.perf_counter(), time.process_time()
            if got == total:
                break
        rate = (total - 1) / (time.perf_counter() - first)
        cpu = (time.process_time() - cpu0) / (total - 1) * 1e6
    await procs.join()
    return rate, cpu


async def aggregator_rate(url: str, host: str, port: int, publishers: int, messages: int, params: int,
                          durable: bool) -> tuple[float, float]:
    """Updates/s the aggregator admits, and this process's (its) CPU µs per update while it does."""
    job = f"bench-agg-{uuid.uuid4().hex[:6]}"
    total = (messages // publishers) * publishers
    state = tempfile.mkdtemp(prefix="fedwb-bench-ingest-") if durable else None
    try:
        return await _aggregator_rate(url, host, port, publishers, messages, params, job, total, state)
    finally:
        if state is not None:  # the durable inbox: ~80 MB of updates per run
            shutil.rmtree(state, ignore_errors=True)


async def _aggregator_rate(url: str, host: str, port: int, publishers: int, messages: int, params: int, job: str,
                           total: int, state: str | None) -> tuple[float, float]:
    s = AggregatorSettings(broker=url, job=job, task="noop", task_options={"shapes": [[params]]},
                           quorum=100_000, status_interval=0.2, state_dir=state, device="cpu")
    agg = Aggregator(s)
    task = asyncio.create_task(agg.run())
    while agg._client is None:
        await asyncio.sleep(0.05)
    # the publishers need the model shape the aggregator built: one tensor "t0" of `params`
    procs = await Publishers(host, port, job, publishers, messages, params).start()
    first, cpu0 = None, 0.0
    while agg.counters.accepted + sum(agg.counters.rejected.values()) < total:
        if agg.counters.accepted and first is None:
            first, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.sleep(0.005)
    rate = (agg.counters.accepted - 1) / (time.perf_counter() - first)
    cpu = (time.process_time() - cpu0) / (agg.counters.accepted - 1) * 1e6
    if agg.counters.rejected:
        progress(f"  rejected: {agg.counters.rejected}")
    agg.stop()
    await task
    await procs.join()
    return rate, cpu


class _SharedWorker(Aggregator):
    """An aggregator that reads its job's updates through shared subscription ``group`` (bench only)."""

    def __init__(self, settings: AggregatorSettings, group: str | None) -> None:
        super().__init__(settings)
        self.group = group

    def _subscriptions(self) -> list[tuple[str, int]]:
        subs = super()._subscriptions()
        if self.group is None:
            return subs
        return [(f"$share/{self.group}/{t}" if t == self.topics.updates else t, q) for t, q in subs]


def _worker(url: str, job: str, idx: int, params: int, group: str | None, accepted, first, last, ready,
            stop) -> None:
    """One aggregator process; publishes its accepted count and first/last accept times (monotonic)."""
    async def go() -> None:
        s = AggregatorSettings(broker=url, job=job, task="noop", task_options={"shapes": [[params]]},
                               quorum=100_000, status_interval=5, device="cpu",
                               client_id=f"fedwb-bench-worker-{job}-{idx}")
        agg = _SharedWorker(s, group)
        task = asyncio.create_task(agg.run())
        while agg._client is None:
            await asyncio.sleep(0.01)
        ready.release()
        while not stop.is_set():
            n = agg.counters.accepted
            if n and not first[idx]:
                first[idx] = time.monotonic()
            if n != accepted[idx]:
                accepted[idx], last[idx] = n, time.monotonic()
            await asyncio.sleep(0.002)
        agg.stop()
        await task

    torch.set_num_threads(1)
    asyncio.run(go())


async def workers_rate(url: str, host: str, port: int, publishers: int, messages: int, params: int,
                       workers: int) -> dict:
    """Updates/s admitted by ``workers`` aggregator processes (1: a plain subscription, no ``$share``)."""
    job = f"bench-w{workers}-{uuid.uuid4().hex[:6]}"
    total = (messages // publishers) * publishers
    # fork: a spawn context's semaphores start a resource-tracker process that outlives the run. (The forked
    # workers share this process's pages copy-on-write, so each fault-copies what it writes; see bench.publisher.)
    ctx = mp.get_context("fork")
    accepted, first, last = ctx.Array("i", workers), ctx.Array("d", workers), ctx.Array("d", workers)
    ready, stop = ctx.Semaphore(0), ctx.Event()
    group = "bench" if workers > 1 else None
    procs = [ctx.Process(target=_worker, args=(url, job, i, params, group, accepted, first, last, ready, stop))
             for i in range(workers)]
    for p in procs:
        p.start()
    for _ in range(workers):
        if not await asyncio.to_thread(ready.acquire, True, 60):
            stop.set()
            raise RuntimeError("an aggregator worker did not connect within 60 s")
    pubs = await Publishers(host, port, job, publishers, messages, params).start()
    deadline = time.monotonic() + 120
    while sum(accepted) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    got, spans = sum(accepted), [(first[i], last[i]) for i in range(workers) if accepted[i]]
    stop.set()
    for p in procs:
        await asyncio.to_thread(p.join, 30)
    await pubs.join(30)
    if not spans:
        raise RuntimeError(f"{workers} aggregator worker(s) admitted nothing in 120 s")
    start, end = min(f for f, _ in spans), max(e for _, e in spans)
    return {"workers": workers, "accepted": got, "per_worker": list(accepted),
            "updates_per_s": (got - 1) / (end - start) if end > start else None}


async def latency(url: str, host: str, port: int, method: str, rounds: int, params: int) -> dict:
    job = f"bench-lat-{method}-{uuid.uuid4().hex[:6]}"
    s = AggregatorSettings(broker=url, job=job, task="noop", task_options={"shapes": [[1000, params // 1000]]},
                           quorum=3, status_interval=5, device="cpu", policy=PolicySpec(name=method))
    agg = Aggregator(s)
    task = asyncio.create_task(agg.run())
    topics = Topics(job)
    lat = []
    async with aiomqtt.Client(host, port, identifier=f"lat-sub-{job}") as sub, \
            aiomqtt.Client(host, port, identifier=f"lat-pub-{job}") as pub:
        await sub.subscribe(topics.global_model, qos=1)
        msgs = sub.messages
        g = schemas.unpack(bytes((await anext(msgs)).payload), GlobalModel)
        for _ in range(rounds):
            payloads = [schemas.pack(ModelUpdate(job=job, agent_id=f"a{i}", base_version=g.version, num_samples=1,
                                                 weights={k: v + 0.01 * i for k, v in g.weights.items()}))
                        for i in range(3)]
            for p in payloads[:2]:
                await pub.publish(topics.update("a" + str(payloads.index(p))), p, qos=1)
            t0 = time.perf_counter()
            await pub.publish(topics.update("a2"), payloads[2], qos=1)
            while True:
                g = schemas.unpack(bytes((await anext(msgs)).payload), GlobalModel)
                if g.version > agg.version - 1 and g.contributors:
                    break
            lat.append(time.perf_counter() - t0)
    agg.stop()
    await task
    lat.sort()
    return {"method": method, "params": params, "rounds": rounds, "median_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))]}


async def run(args: argparse.Namespace) -> dict:
    with start_broker(kind="mosquitto") as b:
        progress("phase 1: plain subscriber")
        plain, plain_cpu = await plain_rate(b.host, b.port, args.publishers, args.messages, args.params)
        progress(f"  {plain:.0f} msg/s, {plain_cpu:.0f} CPU µs per message")
        plain_fast, plain_fast_cpu = await plain_rate(b.host, b.port, args.publishers, args.messages, args.params,
                                                      fast=True)
        progress(f"  with the aggregator's one-copy decoder: {plain_fast:.0f} msg/s, {plain_fast_cpu:.0f} CPU µs")
        progress("phase 2: aggregator (no state dir, then durable inbox)")
        kept = keep_heap()  # as `fedwb aggregator` runs (run_service), after the plain phases kept glibc's defaults
        agg_mem, agg_cpu = await aggregator_rate(b.url, b.host, b.port, args.publishers, args.messages,
                                                 args.params, False)
        progress(f"  {agg_mem:.0f} updates/s, {agg_cpu:.0f} CPU µs per update")
        # again, in the same process: the first run grows the heap for 200 agents' buffered updates (an
        # aggregator's first round); this one reuses it, as every later round of a running service does
        warm_mem, warm_cpu = await aggregator_rate(b.url, b.host, b.port, args.publishers, args.messages,
                                                   args.params, False)
        progress(f"  {warm_mem:.0f} updates/s, {warm_cpu:.0f} CPU µs per update (a second aggregator, warm heap)")
        agg_disk, disk_cpu = await aggregator_rate(b.url, b.host, b.port, args.publishers, args.messages,
                                                   args.params, True)
        progress(f"  {agg_disk:.0f} updates/s, {disk_cpu:.0f} CPU µs per update (durable)")
        workers = []
        if args.workers > 1:
            progress(f"phase 2b: 1 aggregator process, then {args.workers} behind a shared subscription")
            for n in (1, args.workers):
                workers.append(await workers_rate(b.url, b.host, b.port, args.publishers, args.messages,
                                                  args.params, n))
                progress(f"  {n} process(es): {workers[-1]['updates_per_s']:.0f} updates/s "
                         f"(per worker {workers[-1]['per_worker']})")
        progress("phase 3: latency")
        lat = [await latency(b.url, b.host, b.port, m, args.latency_rounds, 1_000_000) for m in ("fedavg", "fedwb")]
    return {"benchmark": "ingest", "machine": machine(), "publishers": args.publishers,
            "messages": args.messages, "params": args.params,
            "payload_bytes": len(schemas.pack(ModelUpdate(job="j", agent_id="a", base_version=0, num_samples=1,
                                                          weights={"t0": torch.zeros(args.params)}))),
            "plain_subscriber_msgs_per_s": plain, "aggregator_updates_per_s": agg_mem,
            "aggregator_durable_updates_per_s": agg_disk, "ratio": agg_mem / plain,
            "ratio_durable": agg_disk / plain, "latency": lat, "aggregator_keep_heap": kept,
            "aggregator_warm_updates_per_s": warm_mem, "ratio_warm": warm_mem / plain,
            "aggregator_warm_cpu_us_per_update": warm_cpu,
            # the same plain subscriber with the aggregator's PUBLISH decoder (schemas.receive): how much of the
            # ratio is that decoder rather than the aggregator's own work
            "plain_fast_decode_msgs_per_s": plain_fast, "plain_fast_decode_cpu_us_per_msg": plain_fast_cpu,
            "ratio_vs_plain_fast_decode": agg_mem / plain_fast,
            # CPU per message of the receiving process: less noisy than rates on a saturated 2-core box
            "plain_cpu_us_per_msg": plain_cpu, "aggregator_cpu_us_per_update": agg_cpu,
            "aggregator_durable_cpu_us_per_update": disk_cpu, "cpu_ratio": plain_cpu / agg_cpu,
            **({"workers": workers, "workers_speedup": workers[1]["updates_per_s"] / workers[0]["updates_per_s"]}
               if workers else {})}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--publishers", type=int, default=4)
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--latency-rounds", type=int, default=10)
    p.add_argument("--workers", type=int, default=1,
                   help="also compare 1 aggregator process with N behind a shared subscription (N > 1)")
    args = p.parse_args(argv)
    emit(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
