"""The one-copy PUBLISH decoder: the same messages as paho's own, on a real mosquitto."""

from __future__ import annotations

import asyncio
import os

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion

from schemas import receive
from schemas.receive import fast_publish, installed, split_publish
from tests.mqtt_helpers import client


def publish_body(topic: bytes, qos: int, mid: int, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH body: what follows the fixed header and remaining length."""
    return len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + payload


@settings(max_examples=200, deadline=None)
@given(topic=st.binary(min_size=1, max_size=300), qos=st.integers(0, 1), mid=st.integers(1, 65535),
       payload=st.binary(max_size=2000), flags=st.integers(0, 0x09))
def test_split_equals_paho_decode(topic: bytes, qos: int, mid: int, payload: bytes, flags: int) -> None:
    header = 0x30 | (qos << 1) | (flags & 0x09)
    body = publish_body(topic, qos, mid, payload)
    ref = _packet.decode_publish(header, bytearray(body), MQTTProtocolVersion.MQTTv311)
    got = split_publish(header, bytearray(body))
    assert got == (ref.topic, ref.qos, ref.mid, ref.payload)
    assert isinstance(got[3], bytes)


@pytest.mark.parametrize(("header", "body"), [
    (0x34, publish_body(b"t", 2, 7, b"x")),  # QoS 2: paho's own handshake
    (0x30, b""), (0x30, b"\x00"),  # shorter than the topic length
    (0x30, b"\x00\x00payload"),  # empty topic: paho reports it malformed
    (0x30, b"\x00\x09abc"),  # topic length past the end
    (0x32, b"\x00\x01t\x00"),  # QoS 1 without a whole packet id
    (0x36, publish_body(b"t", 1, 7, b"x")),  # QoS 3 is not a QoS
])
def test_split_leaves_the_rest_to_paho(header: int, body: bytes) -> None:
    assert split_publish(header, bytearray(body)) is None


def test_installed_once_on_a_paho_client() -> None:
    async def go() -> None:
        c = aiomqtt.Client("127.0.0.1", 1, identifier="stub")  # never connected
        assert fast_publish(c) and installed(c)
        first = c._client._handle_publish
        assert fast_publish(c) and c._client._handle_publish is first  # idempotent
        assert not fast_publish(object()) and not installed(object())

    asyncio.run(go())


async def _roundtrip(b, payloads: list[tuple[str, bytes, int, bool]], fast: bool) -> list[tuple[str, bytes, int, bool]]:
    got: list[tuple[str, bytes, int, bool]] = []
    sub = client(b, "sub")
    assert fast_publish(sub) if fast else True
    async with client(b, "pub") as pub:
        await pub.publish("fast/retained", b"kept", qos=1, retain=True)
    async with sub, client(b, "pub") as pub:
        await sub.subscribe("fast/#", qos=2)  # the retained message arrives first, with its flag
        for topic, payload, qos, _ in payloads:
            await pub.publish(topic, payload, qos=qos)
        async with asyncio.timeout(30):
            async for m in sub.messages:
                got.append((str(m.topic), bytes(m.payload), m.qos, m.retain))
                if len(got) == len(payloads) + 1:
                    break
    return got


def test_messages_through_mosquitto_are_unchanged(mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    """QoS 0, 1 and 2 (paho's path), an empty payload, a 3 MB one, a long UTF-8 topic: the fast client gets
    what a stock one gets, in order."""
    payloads = [("fast/a", b"zero", 0, False), ("fast/b", b"", 1, False),
                ("fast/ü" + "x" * 500, b"\x00" * 7, 1, False), ("fast/big", os.urandom(3 * 2**20), 1, False),
                ("fast/two", b"qos2", 2, False), ("fast/z", b"end", 1, False)]
    calls = []
    real = receive.split_publish
    monkeypatch.setattr(receive, "split_publish", lambda *a: calls.append(a[0]) or real(*a))
    fast = asyncio.run(_roundtrip(mosquitto, payloads, True))
    assert len(calls) >= len(payloads)  # the fast path decoded them (the QoS 2 one it handed to paho)
    n = len(calls)
    stock = asyncio.run(_roundtrip(mosquitto, payloads, False))
    assert len(calls) == n  # a stock client never calls it
    assert fast == stock
    assert fast[0] == ("fast/retained", b"kept", 1, True)
    assert [(t, p, q) for t, p, q, _ in fast[1:]] == [(t, p, q) for t, p, q, _ in payloads]
    assert not any(r for *_, r in fast[1:])
