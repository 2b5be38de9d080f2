"""Operator side of the control topic: send a PolicyCommand, read the aggregator status."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiomqtt

import schemas
from schemas import AggregatorStatus, BrokerAddress, CommandAck, PolicyCommand, PolicySpec, Topics, WireError


def _client(url: str, **creds: str | None) -> aiomqtt.Client:
    addr = BrokerAddress.parse(url, **creds)
    return aiomqtt.Client(**addr.client_kwargs(), identifier=f"fedwb-operator-{uuid.uuid4().hex[:8]}")


class NoAggregator(RuntimeError):
    """The job has no running aggregator (no retained status, or it says offline/stopped)."""


ALIVE = ("starting", "running", "fusing")


async def send_policy(url: str, job: str, spec: PolicySpec, wait: float, *, check_alive: float = 5.0,
                      **creds: str | None) -> CommandAck | None:
    """Publish ``spec`` as a retained PolicyCommand; the aggregator's ack, or None on timeout.

    First reads the job's retained aggregator status (``NoAggregator`` when there is none
    within ``check_alive`` seconds or it says offline/stopped: nothing is published); when
    no ack comes within ``wait``, the retained command is cleared so it cannot apply later
    by surprise.
    """
    topics = Topics(job)
    cmd = PolicyCommand(job=job, policy=spec)
    async with _client(url, **creds) as client:
        await client.subscribe(topics.aggregator_status, qos=1)
        status = await _first_status(client, check_alive)
        if status is None or status.state not in ALIVE:
            state = "no retained status" if status is None else f"its status says {status.state}"
            raise NoAggregator(f"job {job} has no running aggregator ({state}); nothing was published")
        await client.publish(topics.control, schemas.pack(cmd), qos=1, retain=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    try:
                        st = schemas.unpack(bytes(message.payload), AggregatorStatus)
                    except WireError:
                        continue
                    if st.last_command is not None and st.last_command.command_id == cmd.command_id:
                        return st.last_command
        await client.publish(topics.control, b"", qos=1, retain=True)  # nothing acked: leave no command behind
    return None


async def _first_status(client: aiomqtt.Client, wait: float) -> AggregatorStatus | None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            async for message in client.messages:
                with contextlib.suppress(WireError):
                    return schemas.unpack(bytes(message.payload), AggregatorStatus)
    return None


async def read_status(url: str, job: str, wait: float, **creds: str | None) -> AggregatorStatus | None:
    """The retained AggregatorStatus of ``job``, or None when none arrives within ``wait``."""
    topics = Topics(job)
    async with _client(url, **creds) as client:
        await client.subscribe(topics.aggregator_status, qos=1)
        return await _first_status(client, wait)
