"""Load test: many light agents against the real aggregator through mosquitto on loopback.

    python -m bench.load --json [--agents 200] [--rounds 50] [--quorum 100] [--params 1000]

Light agents (one asyncio MQTT client each, in this process) answer every global model
with its weights plus noise. The aggregator runs as its own process with a state
directory. At the end the run checks, from the aggregator's own records, that every
accepted update is in exactly one fusion or still buffered (zero lost), and reports
updates/s and the aggregator's memory over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt
import psutil
import torch

import schemas
from bench.common import emit, machine, progress
from broker import start_broker
from fedwb import executable
from schemas import AggregatorStatus, GlobalModel, ModelUpdate, Topics, WireError


async def light_agent(host: str, port: int, job: str, name: str, done: asyncio.Event, sent: list[str]) -> None:
    topics = Topics(job)
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    async with aiomqtt.Client(host, port, identifier=f"load-{name}-{uuid.uuid4().hex[:4]}") as c:
        await c.subscribe(topics.global_model, qos=1)
        last = -1
        async for m in c.messages:
            if done.is_set():
                return
            try:
                g = schemas.unpack(bytes(m.payload), GlobalModel)
            except WireError:
                continue
            if g.version <= last:
                continue
            last = g.version
            w = {k: v + 0.001 * torch.randn(v.shape, generator=gen) for k, v in g.weights.items()}
            u = ModelUpdate(job=job, agent_id=name, base_version=g.version, num_samples=1, weights=w)
            sent.append(u.update_id)
            await c.publish(topics.update(name), schemas.pack(u), qos=1)


async def run(args: argparse.Namespace) -> dict:
    job = f"load-{uuid.uuid4().hex[:6]}"
    state = Path(tempfile.mkdtemp(prefix="fedwb-load-"))
    fedwb = executable()
    with start_broker(kind="mosquitto") as b:
        agg = subprocess.Popen(
            [fedwb, "aggregator", "--broker", b.url, "--job", job, "--task", "noop", "--task-option",
             f"shapes=[[{args.params}]]", "--quorum", str(args.quorum), "--max-staleness", "1000",
             "--policy", "fedavg", "--state-dir", str(state), "--max-rounds", str(args.rounds), "--device", "cpu",
             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = psutil.Process(agg.pid)
        done = asyncio.Event()
        sent: list[str] = []
        t0 = time.perf_counter()
        agents = [asyncio.create_task(light_agent(b.host, b.port, job, f"la{i}", done, sent))
                  for i in range(args.agents)]
        rss = []
        while agg.poll() is None and time.perf_counter() - t0 < args.timeout:
            try:
                rss.append((round(time.perf_counter() - t0, 1), proc.memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                break
            await asyncio.sleep(0.5)  # sampling period, not synchronization
        wall = time.perf_counter() - t0
        done.set()
        for t in agents:
            t.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        if agg.poll() is None:
            agg.terminate()
        agg.wait(30)
        status = None
        async with aiomqtt.Client(b.host, b.port) as c:
            await c.subscribe(Topics(job).aggregator_status, qos=1)
            async with asyncio.timeout(5):
                async for m in c.messages:
                    status = schemas.unpack(bytes(m.payload), AggregatorStatus)
                    break
    st = json.loads((state / "state.json").read_text())
    fused_ids = [uid for h in st["history"] for uid in h["update_ids"]]
    inbox = {p.stem for p in (state / "inbox").glob("*.msgpack")}
    counters = st["counters"]
    lost = len(set(st["seen_ids"]) - set(fused_ids) - inbox)  # accepted ids neither fused nor buffered
    return {"benchmark": "load", "machine": machine(), "agents": args.agents, "rounds": args.rounds,
            "quorum": args.quorum, "params": args.params, "versions": st["version"], "wall_seconds": wall,
            "updates_sent": len(sent), "accepted": counters["accepted"], "replaced": counters["replaced"],
            "stale": counters["stale"], "duplicate": counters["duplicate"], "rejected": counters["rejected"],
            "fused_updates": len(fused_ids), "fused_twice": len(fused_ids) - len(set(fused_ids)),
            "buffered_at_end": len(inbox), "lost": lost,
            "accepted_updates_per_s": counters["accepted"] / wall,
            "aggregator_rss_mib": {"first": rss[0][1] if rss else None, "max": max(r for _, r in rss) if rss else None,
                                   "last": rss[-1][1] if rss else None, "samples": rss[:: max(1, len(rss) // 20)]},
            "status_exit": status.state if status else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--quorum", type=int, default=100)
    p.add_argument("--params", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    progress(f"{result['versions']} versions, {result['accepted']} accepted, lost {result['lost']}, "
             f"max RSS {result['aggregator_rss_mib']['max']:.0f} MiB")
    emit(result, args.json)


if __name__ == "__main__":
    main()
