"""Load test: many light agents against the real aggregator through mosquitto on loopback.

    python -m bench.load --json [--agents 200] [--rounds 50] [--quorum N] [--params 1000]
                                [--layout flat,two-level] [--sites 4]

Light agents (one asyncio MQTT client each, in this process) answer every global model
with its weights plus noise. The aggregator runs as its own process with a state
directory. At the end the run checks, from the aggregator's own records, that every
accepted update is in exactly one fusion or still buffered (zero lost), and reports
updates/s and the aggregator's memory over time. The two-level layout runs ``--sites``
site brokers bridged to a central one (mosquitto's bridges), a site aggregator per site
(``--upstream bridge``) and the central aggregator, with the agents spread over the sites;
its losses are summed over every aggregator's records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import aiomqtt
import psutil
import torch

import schemas
from bench.common import emit, machine, progress
from broker import Bridge, start_broker
from fedwb import executable
from schemas import GlobalModel, ModelUpdate, Topics, WireError


def raise_fd_limit(need: int) -> None:
    """Raise this process's open-file limit (inherited by the brokers it starts) to ``need`` where allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


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


def _aggregator(fedwb: str, url: str, job: str, state: Path, quorum: int, rounds: int, params: int,
                *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [fedwb, "aggregator", "--broker", url, "--job", job, "--task", "noop", "--task-option",
         f"shapes=[[{params}]]", "--quorum", str(quorum), "--max-staleness", "1000", "--policy", "fedavg",
         "--state-dir", str(state), "--max-rounds", str(rounds), "--device", "cpu", "--log-level", "WARNING",
         *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _records(state: Path) -> dict:
    """From an aggregator's own state dir (saved at its clean stop): accepted ids neither fused nor still
    buffered are lost, except those the aggregator replaced by a newer update of the same agent (counted)."""
    st = json.loads((state / "state.json").read_text())
    fused_ids = [uid for h in st["history"] for uid in h["update_ids"]]
    inbox = {p.stem for p in (state / "inbox").glob("*.msgpack")}
    c = st["counters"]
    return {"versions": st["version"], "accepted": c["accepted"], "replaced": c["replaced"], "stale": c["stale"],
            "duplicate": c["duplicate"], "rejected": c["rejected"], "fused_updates": len(fused_ids),
            "fused_twice": len(fused_ids) - len(set(fused_ids)), "buffered_at_end": len(inbox),
            "lost": max(0, len(set(st["seen_ids"]) - set(fused_ids) - inbox) - c["replaced"])}


async def _drive(aggs: dict[str, subprocess.Popen], center: str, agents: list[tuple[str, int]], job: str,
                 timeout: float) -> tuple[float, list[str], dict[str, list[tuple[float, float]]]]:
    """Run the light agents until the center aggregator exits; RSS of every aggregator over time."""
    procs = {name: psutil.Process(p.pid) for name, p in aggs.items()}
    done = asyncio.Event()
    sent: list[str] = []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(light_agent(host, port, job, f"la{i}", done, sent))
             for i, (host, port) in enumerate(agents)]
    rss: dict[str, list[tuple[float, float]]] = {name: [] for name in aggs}
    while aggs[center].poll() is None and time.perf_counter() - t0 < timeout:
        for name, proc in procs.items():
            try:
                rss[name].append((round(time.perf_counter() - t0, 1), proc.memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                pass
        await asyncio.sleep(0.5)  # sampling period, not synchronization
    wall = time.perf_counter() - t0
    done.set()
    for t in tasks:
        t.cancel()
    # a cancelled client's disconnect can hang with many clients on one broker: never wait for it forever
    await asyncio.wait(tasks, timeout=15)
    for p in aggs.values():
        if p.poll() is None:
            p.terminate()
    for p in aggs.values():
        try:
            await asyncio.to_thread(p.wait, 30)  # off the loop: the proxies of bench.network still run on it
        except subprocess.TimeoutExpired:
            p.kill()
    return wall, sent, rss


def _rss_summary(samples: list[tuple[float, float]]) -> dict:
    vals = [r for _, r in samples]
    return {"first": vals[0] if vals else None, "max": max(vals) if vals else None, "last": vals[-1] if vals else None}


async def run_flat(args: argparse.Namespace) -> dict:
    """One aggregator behind one mosquitto, every agent on it."""
    job = f"load-{uuid.uuid4().hex[:6]}"
    state = Path(tempfile.mkdtemp(prefix="fedwb-load-"))
    quorum = args.quorum or max(1, args.agents // 2)
    with start_broker(kind="mosquitto") as b:
        aggs = {"center": _aggregator(executable(), b.url, job, state, quorum, args.rounds, args.params)}
        wall, sent, rss = await _drive(aggs, "center", [(b.host, b.port)] * args.agents, job, args.timeout)
    rec = _records(state)
    return {"layout": "flat", "agents": args.agents, "quorum": quorum, "wall_seconds": wall,
            "updates_sent": len(sent), **rec, "accepted_updates_per_s": rec["accepted"] / wall,
            "aggregator_rss_mib": _rss_summary(rss["center"]),
            "rss_samples": rss["center"][:: max(1, len(rss["center"]) // 20)]}


async def run_two_level(args: argparse.Namespace) -> dict:
    """``--sites`` site brokers bridged to a central one (mosquitto bridges); a site aggregator per site
    sends one partial per central version; the center fuses the partials (quorum: every site)."""
    job = f"load-{uuid.uuid4().hex[:6]}"
    root = Path(tempfile.mkdtemp(prefix="fedwb-load2-"))
    per_site = [args.agents // args.sites + (1 if i < args.agents % args.sites else 0) for i in range(args.sites)]
    site_quorum = [max(1, (args.quorum * n // args.agents) if args.quorum else n // 2) for n in per_site]
    fedwb = executable()
    with ExitStack() as stack:
        center = stack.enter_context(start_broker(kind="mosquitto", data_dir=root / "broker-center"))
        sites = [stack.enter_context(start_broker(kind="mosquitto", data_dir=root / f"broker-s{i}",
                                                  bridge=Bridge(center.url, job, f"site-{i}")))
                 for i in range(args.sites)]
        aggs = {"center": _aggregator(fedwb, center.url, job, root / "center", args.sites, args.rounds, args.params)}
        for i, sb in enumerate(sites):  # a site runs until the center stops; its own round count is not the job's
            aggs[f"site-{i}"] = _aggregator(fedwb, sb.url, job, root / f"site-{i}", site_quorum[i], 10 * args.rounds,
                                            args.params, "--upstream", "bridge", "--site", f"site-{i}")
        agents = [(sb.host, sb.port) for sb, n in zip(sites, per_site, strict=True) for _ in range(n)]
        wall, sent, rss = await _drive(aggs, "center", agents, job, args.timeout)
    center_rec = _records(root / "center")
    site_recs = [_records(root / f"site-{i}") for i in range(args.sites)]
    return {"layout": "two-level", "agents": args.agents, "sites": args.sites, "site_quorum": site_quorum,
            "wall_seconds": wall, "updates_sent": len(sent), "versions": center_rec["versions"],
            "accepted": sum(r["accepted"] for r in site_recs), "replaced": sum(r["replaced"] for r in site_recs),
            "lost": sum(r["lost"] for r in site_recs) + center_rec["lost"],
            "fused_twice": sum(r["fused_twice"] for r in site_recs) + center_rec["fused_twice"],
            "accepted_updates_per_s": sum(r["accepted"] for r in site_recs) / wall,
            "center": center_rec, "sites_records": site_recs,
            "aggregator_rss_mib": {name: _rss_summary(samples) for name, samples in rss.items()}}


async def run(args: argparse.Namespace) -> dict:
    out: dict = {"benchmark": "load", "machine": machine(), "rounds": args.rounds, "params": args.params}
    for layout in args.layout.split(","):
        progress(f"layout {layout}: {args.agents} agents, {args.rounds} rounds")
        out[layout.replace("-", "_")] = await (run_flat(args) if layout == "flat" else run_two_level(args))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--quorum", type=int, default=0, help="flat quorum (default: half the agents); sites get their "
                   "share of it, the center waits for every site")
    p.add_argument("--layout", default="flat,two-level", help="flat, two-level, or both (comma-separated)")
    p.add_argument("--sites", type=int, default=4, help="site brokers in the two-level layout")
    p.add_argument("--params", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    if any(layout not in ("flat", "two-level") for layout in args.layout.split(",")):
        p.error(f"--layout {args.layout!r}: use flat, two-level or flat,two-level")
    raise_fd_limit(4 * args.agents + 256)
    result = asyncio.run(run(args))
    for layout in ("flat", "two_level"):
        if layout in result:
            r = result[layout]
            progress(f"{layout}: {r['versions']} versions, {r['accepted']} accepted, lost {r['lost']}, "
                     f"{r['wall_seconds']:.0f} s")
    emit(result, args.json)


if __name__ == "__main__":
    main()
