"""One update tries to take the model: the attacker's share and how far v1 moves, bounds off vs the defaults.

    python -m bench.hijack --json

mosquitto, the aggregator in this process (quorum 3, noop task), two honest updates (deltas of
std 0.1 per weight) and one well-formed attacker update with ``num_samples = 10**15`` and a
delta of +1 on every weight. Reported for the influence bounds off (``--clip-factor 0
--max-share 1``) and at their defaults: the attacker's weight share, the distance of v1 to the
attacker and to the honest FedAvg, and how far v1 moved from v0 (L2 over all weights).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.common import emit, ensure_project_python, machine


async def scenario(b: Any, job: str, **bounds: Any) -> dict[str, Any]:
    import torch

    import schemas
    from aggregator.fusion import fuse
    from aggregator.fusion.robust import delta_norm
    from aggregator.settings import AggregatorSettings
    from schemas import Topics
    from tests.mqtt_helpers import Watcher, publish, update
    from tests.test_aggregator import running

    s = AggregatorSettings(broker=b.url, job=job, task="noop", task_options={"shapes": [[20, 10], [10]]}, quorum=3,
                           status_interval=0.2, device="cpu", **bounds)
    topics = Topics(job)
    async with Watcher(b, job) as w, running(s):
        g0 = await w.version(0)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        honest = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in g0.weights.items()} for g in gens]
        for i, h in enumerate(honest):
            await publish(b, topics.update(f"h{i}"), schemas.pack(update(job, f"h{i}", 0, h)))
        evil = {k: v + 1.0 for k, v in g0.weights.items()}
        await publish(b, topics.update("x"), schemas.pack(update(job, "x", 0, evil, n=10**15)))
        g1 = await w.version(1)
    share = dict(zip(g1.info["contributors"], g1.info["weights"], strict=True))["x"]
    return {"attacker_share": share, "distance_to_attacker": delta_norm(g1.weights, evil),
            "distance_to_honest_fedavg": delta_norm(g1.weights, fuse(honest, [1, 1])),
            "v1_moved": delta_norm(g1.weights, g0.weights),
            "honest_steps": [delta_norm(h, g0.weights) for h in honest], "defense": g1.info.get("defense")}


async def run() -> dict[str, Any]:
    from broker import start_broker

    with start_broker(kind="auto") as b:
        off = await scenario(b, "hijack-off", clip_factor=0.0, max_share=1.0)
        on = await scenario(b, "hijack-on")
    return {"bounds_off": off, "defaults": on, "machine": machine()}


def main(argv: list[str] | None = None) -> None:
    ensure_project_python("bench.hijack")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="One line of JSON.")
    args = p.parse_args(argv)
    emit(asyncio.run(run()), args.json)


if __name__ == "__main__":
    main()
