"""``fedwb demo``: the smallest real end-to-end run (replaced by the simulator later)."""

from __future__ import annotations

import asyncio
import time

import torch
import typer

import schemas
from schemas import GlobalModel, ModelUpdate, Topics


def demo() -> None:
    """Start a broker, publish three agent updates, fuse them by FedAvg and FedWB, report."""
    import aiomqtt

    from aggregator.fusion import fuse_with_report
    from broker import start_broker

    async def run(url_host: str, port: int) -> None:
        topics = Topics("demo")
        base = torch.randn(200, 100)
        async with aiomqtt.Client(url_host, port, identifier="demo-aggregator") as agg, \
                aiomqtt.Client(url_host, port, identifier="demo-agents") as agents:
            await agg.subscribe(topics.updates, qos=1)
            for i in range(3):
                w = {"w": base + 0.1 * torch.randn_like(base)}
                msg = ModelUpdate(job="demo", agent_id=f"agent-{i}", base_version=0,
                                  num_samples=100 * (i + 1), weights=w)
                await agents.publish(topics.update(f"agent-{i}"), schemas.pack(msg), qos=1)
            got: list[ModelUpdate] = []
            async with asyncio.timeout(30):
                async for m in agg.messages:
                    got.append(schemas.unpack(m.payload, ModelUpdate))
                    if len(got) == 3:
                        break
            models = [u.weights for u in got]
            weights = [u.num_samples for u in got]
            for version, method in enumerate(("fedavg", "fedwb", "fedwb-sinkhorn"), start=1):
                fused, rep = fuse_with_report(models, weights, method, warn=False)
                gm = GlobalModel(job="demo", version=version, policy=method, weights=fused,
                                 contributors=[u.agent_id for u in got], info=rep.as_dict())
                await agg.publish(topics.global_model, schemas.pack(gm), qos=1, retain=True)
                dist = float((fused["w"] - base).norm() / base.norm())
                typer.echo(f"  v{version} {method:15s} fused in {rep.seconds * 1000:7.1f} ms, "
                           f"relative distance to the common model {dist:.3f}")

    t0 = time.perf_counter()
    with start_broker() as b:
        typer.echo(f"fedwb demo: broker ({b.kind}) on {b.url}; 3 agents publish 20k-weight updates")
        asyncio.run(run(b.host, b.port))
    typer.echo(f"done in {time.perf_counter() - t0:.1f}s")
