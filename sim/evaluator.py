"""Evaluates every global version beside the aggregator (never on its fusion path).

Subscribes to ``fedwb/J/global``; each new version is evaluated with the task in a
worker thread and handed to ``on_record`` (the simulator writes ``rounds.jsonl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiomqtt

import schemas
from edge_agent.tasks import get_task
from schemas import AggregatorStatus, BrokerAddress, GlobalModel, Topics, WireError
from schemas.connection import credentials_refused, outage

log = logging.getLogger("fedwb.evaluate")
WARN_EVERY_S = 30.0  # an unreachable broker is logged at most this often


def headline(metrics: dict[str, float]) -> tuple[str, float | None]:
    """The metric that summarizes a version: accuracy (mnist), mean return (cartpole), else a plugin
    task's first metric (in the order its ``evaluate`` returns them)."""
    for key in ("accuracy", "mean_return", "mean_abs_weight"):
        if key in metrics:
            return key, metrics[key]
    return next(iter(metrics.items()), ("", None))


def training_metrics(agent_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The agents' own training figures, averaged over this version's contributors.

    For cartpole this includes the paper's metric: the length of each agent's last
    epsilon-greedy training episode (``last_episode_return``) and its 50-episode moving
    average (``episode_return_ma50``), averaged over agents.
    """
    out: dict[str, float] = {}
    for key in ("last_episode_return", "episode_return_ma50", "episode_return", "td_loss", "train_seconds"):
        values = [m[key] for m in agent_metrics.values() if isinstance(m.get(key), (int, float))]
        if values:
            out[key] = sum(values) / len(values)
    return out


class Evaluator:
    """Evaluate each global version of ``job`` once, in version order, newest first when behind."""

    def __init__(self, broker: str, job: str, task: str, task_options: dict[str, Any],
                 on_record: Callable[[dict[str, Any]], None], *, started: float | None = None,
                 seed: int = 0) -> None:
        self.address = BrokerAddress.parse(broker)
        self.topics = Topics(job)
        self.task = get_task(task, seed=seed, **task_options)
        self.on_record = on_record
        self.started = started or time.time()
        self.status: AggregatorStatus | None = None
        self.evaluated: dict[int, dict[str, Any]] = {}
        self._queue: asyncio.Queue[tuple[GlobalModel, float]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self.fatal: str | None = None  # why it gave up (the broker refused its first connection)
        self.changed = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _listen(self) -> None:
        ever_connected, warned_at = False, 0.0
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(**self.address.client_kwargs()) as c:
                    ever_connected = True
                    await c.subscribe([(self.topics.global_model, 1), (self.topics.aggregator_status, 1)])
                    async for m in c.messages:
                        with contextlib.suppress(WireError):
                            if str(m.topic) == self.topics.global_model:
                                g = schemas.unpack(bytes(m.payload), GlobalModel)
                                if g.version not in self.evaluated:
                                    await self._queue.put((g, time.time()))
                            else:
                                self.status = schemas.unpack(bytes(m.payload), AggregatorStatus)
                                self.changed.set()
            except aiomqtt.MqttError as exc:
                self.fatal = credentials_refused(exc, ever_connected, self.address)
                if self.fatal is not None:  # wrong credentials, not an outage
                    self._stop.set()
                    return
                if time.monotonic() - warned_at > WARN_EVERY_S:  # said, not in silence; not every 0.5 s either
                    warned_at = time.monotonic()
                    log.warning("evaluator: %s; retrying", outage(exc, ever_connected, self.address))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.5)

    async def _work(self) -> None:
        while True:
            g, arrived = await self._queue.get()
            if g.version in self.evaluated:
                continue
            metrics = await asyncio.to_thread(self.task.evaluate, g.weights)
            info = g.info
            record = {
                "round": g.version, "version": g.version, "policy": g.policy, "method": g.method,
                "contributors": g.contributors, "n_contributors": len(g.contributors),
                "staleness": info.get("staleness", []), "quorum_wait_seconds": info.get("quorum_wait_seconds"),
                "fusion_seconds": info.get("fusion_seconds"), "reason": info.get("reason"),
                "dispersion": info.get("dispersion"),  # only computed when a hybrid policy may switch on it
                "sinkhorn_iterations": info.get("report", {}).get("sinkhorn_iterations"),
                "sinkhorn_error": info.get("report", {}).get("sinkhorn_error"),
                "wall_seconds": round(arrived - self.started, 3), "eval": metrics,
                "training": training_metrics(info.get("agent_metrics", {})),
                "fusion_report": info.get("report"),
            }
            self.evaluated[g.version] = record
            self.on_record(record)
            self.changed.set()
            key, value = headline(metrics)
            log.info("v%d %s: %s=%s", g.version, g.method, key, value)

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen())
        worker = asyncio.create_task(self._work())
        await self._stop.wait()
        listener.cancel()
        worker.cancel()
        for t in (listener, worker):
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await t
