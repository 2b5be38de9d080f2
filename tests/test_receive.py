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


async def _roundtrip(b, payloads: list[tuple[str, bytes, int, bool]],
                     fast: bool | str) -> list[tuple[str, bytes, int, bool]]:
    """Publish ``payloads`` to a subscriber (stock, ``fast``, or ``"views"``); what it got, in order. The
    payloads are compared only once all have arrived: a reused receive buffer would show."""
    got: list = []
    sub = client(b, "sub")
    assert fast_publish(sub, views=fast == "views") if fast else True
    async with client(b, "pub") as pub:
        await pub.publish("fast/retained", b"kept", qos=1, retain=True)
    async with sub, client(b, "pub") as pub:
        await sub.subscribe("fast/#", qos=2)  # the retained message arrives first, with its flag
        for topic, payload, qos, _ in payloads:
            await pub.publish(topic, payload, qos=qos)
        async with asyncio.timeout(30):
            async for m in sub.messages:
                got.append((str(m.topic), m.payload, m.qos, m.retain))
                if len(got) == len(payloads) + 1:
                    break
    if fast == "views":
        assert all(isinstance(p, memoryview) and p.readonly for _, p, q, _ in got if q < 2)
    return [(t, bytes(p), q, r) for t, p, q, r in got]


@pytest.mark.parametrize("mode", [True, "views"])
def test_messages_through_mosquitto_are_unchanged(mosquitto, monkeypatch: pytest.MonkeyPatch, mode) -> None:
    """QoS 0, 1 and 2 (paho's path), an empty payload, big ones of several sizes read straight into one buffer
    (bigger, smaller, bigger again: the kept buffer is reused; a big QoS 2 one goes to paho's decoder from that
    buffer), a long UTF-8 topic: the fast client gets what a stock one gets, in order."""
    payloads = [("fast/a", b"zero", 0, False), ("fast/b", b"", 1, False),
                ("fast/ü" + "x" * 500, b"\x00" * 7, 1, False), ("fast/big", os.urandom(3 * 2**20), 1, False),
                ("fast/mid", os.urandom(200_000), 1, False), ("fast/big0", os.urandom(1_500_000), 0, False),
                ("fast/two", b"qos2", 2, False), ("fast/big2", os.urandom(300_000), 2, False),
                ("fast/edge", os.urandom(receive.DIRECT_READ - 12), 1, False), ("fast/z", b"end", 1, False)]
    calls, direct = [], []
    real, real_body = receive.split_publish, receive._read_body
    monkeypatch.setattr(receive, "split_publish", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(receive, "_read_body", lambda c: direct.append(c._in_packet["remaining_length"])
                        or real_body(c))
    fast = asyncio.run(_roundtrip(mosquitto, payloads, mode))
    assert len(calls) >= len(payloads)  # the fast path decoded them (the QoS 2 ones it handed to paho)
    assert {n for n in direct} >= {len(p) + len(t.encode()) + 4 for t, p, q, _ in payloads
                                   if len(p) > receive.DIRECT_READ and q}  # the big ones were read directly
    n = len(calls)
    stock = asyncio.run(_roundtrip(mosquitto, payloads, False))
    assert len(calls) == n  # a stock client never calls it
    assert sorted(fast) == sorted(stock)  # QoS 2 completes a handshake first: MQTT orders it per QoS only

    def in_order(got: list) -> list:
        return [(t, p, q) for t, p, q, _ in got if q < 2]

    assert in_order(fast) == in_order(stock)
    assert fast[0] == ("fast/retained", b"kept", 1, True)
    assert in_order(fast[1:]) == in_order(payloads)
    assert sorted(fast[1:]) == sorted(payloads)
    assert not any(r for *_, r in fast[1:])
