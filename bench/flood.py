"""A garbage flood against a live job: are honest updates lost, how long is fusion delayed?

    python -m bench.flood --json [--messages 20000] [--flooders 4] [--size 32768] [--rounds 5]

mosquitto with the project's config, the aggregator in this process (quorum 3), three honest
agents that answer every global version, and ``--flooders`` clients publishing ``--messages``
random payloads of ``--size`` bytes (QoS 1, 100 in flight each) on their update topics while
the honest rounds run. Reports each round's latency (honest updates sent -> next version
published), how many garbage messages the aggregator counted (the rest the broker dropped),
and how many honest updates were accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from bench.common import emit, ensure_project_python, machine


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import schemas
    from aggregator.settings import AggregatorSettings
    from broker import start_broker
    from schemas import Topics
    from tests.mqtt_helpers import Watcher, client, update
    from tests.test_aggregator import running

    with start_broker(kind="mosquitto") as b:
        job, topics = "flood", Topics("flood")
        s = AggregatorSettings(broker=b.url, job=job, task="noop", task_options={"shapes": [[100, 100]]}, quorum=3,
                               status_interval=0.5, device="cpu")
        async with Watcher(b, job) as w, running(s):
            await w.version(0)
            garbage = os.urandom(args.size)
            share = args.messages // args.flooders

            async def flooder(k: int) -> None:
                async with client(b, f"evil{k}", max_queued_outgoing_messages=None) as c:
                    for start in range(0, share, 100):
                        await asyncio.gather(*[c.publish(topics.update(f"evil{k}"), garbage, qos=1)
                                               for _ in range(min(100, share - start))])

            async def honest() -> list[float]:
                latencies = []
                for v in range(1, args.rounds + 1):
                    g = await w.version(v - 1, 120)
                    t0 = time.perf_counter()
                    async with client(b, "honest") as c:
                        for i in range(3):
                            u = update(job, f"h{i}", v - 1, {k: x + 0.01 for k, x in g.weights.items()})
                            await c.publish(topics.update(f"h{i}"), schemas.pack(u), qos=1)
                    await w.version(v, 120)
                    latencies.append(round(time.perf_counter() - t0, 3))
                return latencies

            t0 = time.perf_counter()
            flood = asyncio.gather(*[flooder(k) for k in range(args.flooders)])
            latencies = await honest()
            await flood
            flood_seconds = time.perf_counter() - t0
            total = share * args.flooders
            try:  # the status is periodic: wait for one that has seen every garbage message and honest update
                await w.until(lambda: sum(w.status.rejected.values()) >= total
                              and w.status.accepted >= 3 * args.rounds, 60, "every message counted")
            except AssertionError:
                pass  # the broker dropped some: reported below
            st = w.status
    return {"garbage_sent": total, "garbage_counted": sum(st.rejected.values()), "rejected": st.rejected,
            "honest_sent": 3 * args.rounds, "honest_accepted": st.accepted, "round_latency_s": latencies,
            "max_round_latency_s": max(latencies), "flood_seconds": round(flood_seconds, 2),
            "flood_mb": round(total * args.size / 1e6, 1), "machine": machine()}


def main(argv: list[str] | None = None) -> None:
    ensure_project_python("bench.flood")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--flooders", type=int, default=4)
    p.add_argument("--size", type=int, default=32 * 1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="One line of JSON.")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    emit(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
