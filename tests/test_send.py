"""Writes without copies: big packets leave through views of themselves and arrive unchanged."""

from __future__ import annotations

import asyncio
import os

import aiomqtt

from schemas import send
from schemas.send import Unsent, fast_send
from tests.mqtt_helpers import client


def test_big_packets_leave_through_views_and_arrive_unchanged(mosquitto) -> None:
    """QoS 0 and 1, small and big (a 20 MB one leaves in many partial writes): a stock subscriber gets exactly
    what was published, in order, and every write of a big packet was a view, never a copied slice."""
    payloads = [os.urandom(n) for n in (20 * 2**20, 100, 300_000, send.VIEW_FROM - 20, 3 * 2**20)]

    async def go() -> tuple[list[bytes], list[str]]:
        pub = client(mosquitto, "pub")
        assert fast_send(pub) and fast_send(pub)  # idempotent
        writes: list[tuple[str, int]] = []
        real = pub._client._sock_send
        pub._client._sock_send = lambda buf: writes.append((type(buf).__name__, len(buf))) or real(buf)
        got = []
        async with client(mosquitto, "sub") as sub, pub:
            await sub.subscribe("send/#", qos=1)
            for i, p in enumerate(payloads):
                await pub.publish(f"send/{i}", p, qos=i % 2)
            async with asyncio.timeout(60):
                async for m in sub.messages:
                    got.append(bytes(m.payload))
                    if len(got) == len(payloads):
                        break
        return got, writes

    got, writes = asyncio.run(go())
    assert got == payloads
    big = [kind for kind, n in writes if n >= send.VIEW_FROM]
    assert big and set(big) == {"memoryview"}
    assert len([n for _, n in writes if n >= 2**20]) > 2  # the 20 MB packet took several partial writes


def test_unsent_slices_are_read_only_views() -> None:
    data = bytearray(b"abcdef")
    u = Unsent(data)
    assert len(u) == 6 and u[2:].tobytes() == b"cdef" and u.tobytes() == b"abcdef"
    assert isinstance(u[1:], memoryview) and u[1:].readonly
    assert not fast_send(object())

    async def go() -> None:  # an aiomqtt client needs a running loop to be made
        assert fast_send(aiomqtt.Client("127.0.0.1", 1, identifier="never-connected"))

    asyncio.run(go())
