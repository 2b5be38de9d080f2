"""Communication cost on emulated links: round time and bytes per round vs agents, flat vs two-level.

    python -m bench.network --json [--agents 1,10,30] [--rounds 5] [--params 200000]
                                   [--rtt-ms 50] [--mbit 10] [--loss 0.01] [--sites 2] [--quorum sync,async]
                                   [--systems fedwb,flower] [--layout flat,two-level]

Every wide-area link is a small TCP proxy on loopback that gives each direction a rate
(token bucket, ``--mbit``), a one-way delay (``--rtt-ms`` / 2) and the cost of packet loss
(``--loss``). This kernel has no ``netem``; a proxy cannot drop packets inside a TCP stream,
so loss is charged as TCP pays it on a lightly loaded link: a piece of ``PIECE`` bytes holds
``ceil(len / 1460)`` segments, and with probability ``1 - (1 - loss) ** segments`` it is
delivered one retransmission timeout later (``max(200 ms, 2 x RTT)``), with everything
behind it waiting (in-order delivery). Counted bytes are MQTT's, above TCP.

Layouts (light agents: one asyncio MQTT client each, weights plus noise, as in bench.load):

* **flat** — every agent reaches the central mosquitto over its own emulated link; the
  aggregator sits beside the broker.
* **two-level** — agents reach their site broker on the site's LAN (not emulated); each site
  broker is bridged to the center by mosquitto over one emulated uplink; a site aggregator
  per site sends one partial per central version.

* **flower** (``--systems ...,flower``) — Flower 1.42's Deployment Engine doing the same FedAvg
  (bench.vs_flower's app: one float32 tensor of ``--params``, each client returns it plus
  noise): every SuperNode dials the SuperLink through its own emulated link, as the flat
  layout's agents do; synchronous (Flower's FedAvg waits for every node). Flower lives in
  ``.venv-flower``, created on first use as bench.vs_flower does.

``sync``: quorum = every agent (flat) / every agent of a site and every site (two-level);
``async``: half of them. Round time is the median gap between consecutive global versions
(the aggregator's records); bytes per round are the bytes crossing emulated links (both
directions) divided by the versions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import emit, machine, progress
from bench.load import _aggregator, _drive, raise_fd_limit
from broker import Bridge, start_broker
from fedwb import executable

PIECE = 16 * 1024  # bytes paced and delayed together
SEGMENT = 1460


@dataclass
class Link:
    """One emulated wide-area link (shared by every connection through its proxy)."""

    rate: float  # bytes per second, each direction
    delay: float  # one-way seconds
    loss: float
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    free_at: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    stalls: int = 0

    def departure(self, direction: str, size: int, now: float) -> float:
        """When a piece of ``size`` bytes sent now arrives: serialization, propagation, a lost segment's RTO."""
        start = max(now, self.free_at[direction])
        self.free_at[direction] = start + size / self.rate
        arrive = self.free_at[direction] + self.delay
        segments = math.ceil(size / SEGMENT)
        if self.loss > 0 and self.rng.random() < 1 - (1 - self.loss) ** segments:
            self.stalls += 1
            arrive += max(0.2, 4 * self.delay)
        self.bytes[direction] += size
        return arrive


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, direction: str) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        last = 0.0
        while (item := await queue.get()) is not None:
            at, data = item
            at = max(at, last)  # in order: nothing overtakes a stalled piece
            last = at
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the emulated link's timing, not synchronization
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(PIECE):
            queue.put_nowait((link.departure(direction, len(data), time.monotonic()), data))
        queue.put_nowait(None)
        await sender
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the other side went away: so does this direction
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()


class LinkProxy:
    """``127.0.0.1:port`` -> ``target`` through one ``Link`` (up: towards the target)."""

    def __init__(self, target: tuple[str, int], link: Link) -> None:
        self.target, self.link = target, link
        self.server: asyncio.base_events.Server | None = None
        self.host, self.port = "127.0.0.1", 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> LinkProxy:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            tr, tw = await asyncio.open_connection(*self.target)
            await asyncio.gather(_pump(r, tw, self.link, "up"), _pump(tr, w, self.link, "down"))
        except (OSError, asyncio.CancelledError):
            w.close()
        finally:
            self.tasks.discard(asyncio.current_task())

    async def aclose(self) -> None:
        """Stop listening and end every connection through the link."""
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def round_times(state: Path) -> list[float]:
    """Gaps between consecutive global versions, from an aggregator's saved history."""
    hist = json.loads((state / "state.json").read_text())["history"]
    stamps = [h["created_at"] for h in hist if not h.get("partial")]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _link(args: argparse.Namespace, seed: int) -> Link:
    return Link(rate=args.mbit * 1e6 / 8, delay=args.rtt_ms / 2000, loss=args.loss, rng=random.Random(seed))


def _cell(layout: str, quorum: str, n: int, links: list[Link], times: list[float], versions: int,
          wall: float) -> dict:
    """One table row: round time from the gaps between versions, bytes over the emulated links per version."""
    up, down = sum(ln.bytes["up"] for ln in links), sum(ln.bytes["down"] for ln in links)
    return {"layout": layout, "quorum": quorum, "agents": n, "versions": versions, "wall_seconds": round(wall, 2),
            "round_seconds_median": round(statistics.median(times), 3) if times else None,
            "wan_bytes_per_round": round((up + down) / max(1, versions)), "wan_up_bytes": up, "wan_down_bytes": down,
            "loss_stalls": sum(ln.stalls for ln in links)}


def _summary(layout: str, quorum: str, n: int, links: list[Link], state: Path, wall: float, sent: list) -> dict:
    times = round_times(state)  # fused versions: the gaps are between them
    return {**_cell(layout, quorum, n, links, times, len(times) + 1, wall), "updates_sent": len(sent)}


async def run_flat(args: argparse.Namespace, n: int, quorum: str) -> dict:
    job = f"net-{uuid.uuid4().hex[:6]}"
    state = Path(tempfile.mkdtemp(prefix="fedwb-net-"))
    q = n if quorum == "sync" else max(1, n // 2)
    with start_broker(kind="mosquitto") as b:
        links = [_link(args, i) for i in range(n)]
        proxies = [await LinkProxy((b.host, b.port), ln).start() for ln in links]
        aggs = {"center": _aggregator(executable(), b.url, job, state, q, args.rounds, args.params)}
        wall, sent, _ = await _drive(aggs, "center", [(p.host, p.port) for p in proxies], job, args.timeout)
        for p in proxies:
            await p.aclose()
    return _summary("flat", quorum, n, links, state, wall, sent)


async def run_two_level(args: argparse.Namespace, n: int, quorum: str) -> dict:
    job = f"net-{uuid.uuid4().hex[:6]}"
    root = Path(tempfile.mkdtemp(prefix="fedwb-net2-"))
    sites = max(1, min(args.sites, n))
    per_site = [n // sites + (1 if i < n % sites else 0) for i in range(sites)]
    site_q = [m if quorum == "sync" else max(1, m // 2) for m in per_site]
    fedwb = executable()
    with ExitStack() as stack:
        center = stack.enter_context(start_broker(kind="mosquitto", data_dir=root / "broker-center"))
        links = [_link(args, 1000 + i) for i in range(sites)]
        proxies = [await LinkProxy((center.host, center.port), ln).start() for ln in links]
        site_brokers = [stack.enter_context(start_broker(
            kind="mosquitto", data_dir=root / f"broker-s{i}",
            bridge=Bridge(f"mqtt://{p.host}:{p.port}", job, f"site-{i}"))) for i, p in enumerate(proxies)]
        aggs = {"center": _aggregator(fedwb, center.url, job, root / "center",
                                      sites if quorum == "sync" else max(1, sites // 2), args.rounds, args.params)}
        for i, sb in enumerate(site_brokers):
            aggs[f"site-{i}"] = _aggregator(fedwb, sb.url, job, root / f"site-{i}", site_q[i], 10 * args.rounds,
                                            args.params, "--upstream", "bridge", "--site", f"site-{i}")
        agents = [(sb.host, sb.port) for sb, m in zip(site_brokers, per_site, strict=True) for _ in range(m)]
        wall, sent, _ = await _drive(aggs, "center", agents, job, args.timeout)
        for p in proxies:
            await p.aclose()
    out = _summary("two-level", quorum, n, links, root / "center", wall, sent)
    out["sites"] = sites
    return out


async def run_flower(args: argparse.Namespace, n: int) -> dict:
    """Flower's FedAvg over ``n`` SuperNodes, each through its own emulated link to the SuperLink."""
    from bench.vs_flower import flower
    from sim.runner import Processes

    env = flower.find_or_create()
    loop = asyncio.get_running_loop()
    links = [_link(args, i) for i in range(n)]
    proxies: list[LinkProxy] = []

    def route(i: int, port: int) -> str:  # called from flower.run's thread; the proxies live on this loop
        proxy = asyncio.run_coroutine_threadsafe(LinkProxy(("127.0.0.1", port), links[i]).start(), loop).result(30)
        proxies.append(proxy)
        return f"{proxy.host}:{proxy.port}"

    work = Path(tempfile.mkdtemp(prefix="fedwb-net-flower-"))
    procs = Processes(work)
    t0 = time.monotonic()
    try:
        rows = await asyncio.to_thread(flower.run, env, procs, lambda pid, role: None, work, n, args.params,
                                       args.rounds, 0.001, args.timeout, route)
    finally:
        await asyncio.to_thread(procs.stop)
        for p in proxies:
            await p.aclose()
    done = [r["replies_at"] for r in rows]
    times = [b - a for a, b in zip(done, done[1:], strict=False)]
    return {**_cell("flower", "sync", n, links, times, len(rows), time.monotonic() - t0),
            "flwr_version": env.version, "logs": str(work)}


async def run(args: argparse.Namespace) -> dict:
    raise_fd_limit(4096)
    out: dict = {"benchmark": "network", "machine": machine(), "rounds": args.rounds, "params": args.params,
                 "link": {"rtt_ms": args.rtt_ms, "mbit": args.mbit, "loss": args.loss}, "cells": []}
    systems = args.systems.split(",")
    for n in [int(x) for x in args.agents.split(",")]:
        plan = [(layout, quorum) for layout in args.layout.split(",") for quorum in args.quorum.split(",")
                if "fedwb" in systems] + ([("flower", "sync")] if "flower" in systems else [])
        for layout, quorum in plan:
            progress(f"network: {n} agents, {layout}, {quorum} quorum")
            if layout == "flower":
                try:
                    cell = await run_flower(args, n)
                except (RuntimeError, TimeoutError, OSError) as exc:  # Flower where it runs: the rest goes on
                    cell = {"layout": "flower", "quorum": "sync", "agents": n, "error": str(exc).splitlines()[0]}
                    progress(f"  flower: {cell['error']}")
                    out["cells"].append(cell)
                    continue
            else:
                cell = await (run_flat(args, n, quorum) if layout == "flat" else run_two_level(args, n, quorum))
            progress(f"  round {cell['round_seconds_median']} s, {cell['wan_bytes_per_round'] / 1e6:.2f} MB "
                     f"over the WAN per round, {cell['versions']} versions")
            out["cells"].append(cell)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default="1,10,30", help="agent counts, comma-separated")
    ap.add_argument("--layout", default="flat,two-level")
    ap.add_argument("--quorum", default="sync,async")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--params", type=int, default=200_000, help="float32 parameters (200k: the MNIST MLP's size)")
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--mbit", type=float, default=10.0, help="each link's rate per direction")
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--systems", default="fedwb,flower",
                    help="fedwb and/or flower (Flower's FedAvg over the same links; installed into .venv-flower "
                         "on first use, skipped with its reason where it cannot run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    emit(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
