"""Test helpers that talk to a real broker: scripted agents and a watcher of retained topics."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import aiomqtt
import torch

import schemas
from broker import BrokerProcess
from schemas import AggregatorStatus, GlobalModel, ModelUpdate, Topics, WireError


def client(b: BrokerProcess, name: str = "test", **kw) -> aiomqtt.Client:
    return aiomqtt.Client(b.host, b.port, identifier=f"{name}-{uuid.uuid4().hex[:8]}", **kw)


def update(job: str, agent: str, base: int, weights: dict[str, torch.Tensor], n: int = 10) -> ModelUpdate:
    return ModelUpdate(job=job, agent_id=agent, base_version=base, num_samples=n, weights=weights)


async def publish(b: BrokerProcess, topic: str, payload: bytes, retain: bool = False) -> None:
    async with client(b, "pub") as c:
        await c.publish(topic, payload, qos=1, retain=retain)


class Watcher:
    """Collects GlobalModel and AggregatorStatus messages of a job; wait on conditions."""

    def __init__(self, b: BrokerProcess, job: str, **client_kw) -> None:
        self.b, self.topics, self.client_kw = b, Topics(job), client_kw
        self.globals: dict[int, GlobalModel] = {}
        self.statuses: list[AggregatorStatus] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    async def _run(self) -> None:
        while True:  # survive broker restarts
            try:
                await self._session()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    async def _session(self) -> None:
        async with client(self.b, "watch", **self.client_kw) as c:
            await c.subscribe([(self.topics.global_model, 1), (self.topics.aggregator_status, 1)])
            self._ready.set()
            async for m in c.messages:
                try:
                    if str(m.topic) == self.topics.global_model:
                        g = schemas.unpack(bytes(m.payload), GlobalModel)
                        self.globals[g.version] = g
                    else:
                        self.statuses.append(schemas.unpack(bytes(m.payload), AggregatorStatus))
                except WireError:
                    continue
                async with self._changed:
                    self._changed.notify_all()

    async def until(self, cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(cond)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; versions "
                                 f"{sorted(self.globals)}, last status "
                                 f"{self.statuses[-1].model_dump() if self.statuses else None}") from None

    async def version(self, v: int, timeout: float = 30.0) -> GlobalModel:
        await self.until(lambda: v in self.globals, timeout, f"global version {v}")
        return self.globals[v]

    @property
    def status(self) -> AggregatorStatus:
        return self.statuses[-1]
