"""Receiving big PUBLISH packets without paho's three copies of the payload.

paho-mqtt 2.x splits an incoming PUBLISH with three ``struct.unpack`` calls whose formats
end in ``{n}s``; each returns a fresh ``bytes`` of the rest of the packet, so a 400 KB update
is copied three times (plus allocated and page-faulted three times) before anyone sees it:
about 0.65 ms of the 0.8 ms a plain subscriber spends per such message on this machine
(``python -m bench.ingest``). ``fast_publish(client)`` gives one aiomqtt client a decoder that
reads the MQTT 3.1.1 header fields through a ``memoryview`` and copies the payload once.

Scope, so the shortcut can never change what a message means: QoS 0 and 1 on MQTT 3.1.1,
which is what our clients use; anything else (QoS 2, MQTT 5 properties, a packet too short
for its own header or with an empty topic) goes to paho's own decoder, which also reports
malformed packets as it always did. The handler uses paho's private ``_in_packet``,
``_handle_on_message``, ``_send_puback`` and ``_manual_ack``; it is installed only where they
exist and paho's major version is 2 (``installed`` says whether it was).
"""

from __future__ import annotations

import time
import types
from typing import Any

import paho.mqtt
from paho.mqtt.client import MQTT_ERR_SUCCESS, MQTTMessage, MQTTv311

_NEEDED = ("_in_packet", "_handle_on_message", "_send_puback", "_manual_ack", "_protocol", "_handle_publish")


def _paho_supported() -> bool:
    return str(getattr(paho.mqtt, "__version__", "0")).split(".")[0] == "2"


def split_publish(header: int, packet: bytes | bytearray) -> tuple[bytes, int, int, bytes] | None:
    """(topic, qos, packet id, payload) of an MQTT 3.1.1 PUBLISH body, or None to leave it to paho.

    ``header`` is the fixed header's first byte, ``packet`` what follows the remaining length:
    a 2-byte topic length, the topic, a 2-byte packet id when QoS > 0, then the payload
    (copied once).
    """
    qos = (header >> 1) & 0x03
    if qos > 1 or len(packet) < 2:
        return None
    view = memoryview(packet)
    end = 2 + int.from_bytes(view[:2], "big")
    body = end + (2 if qos else 0)
    if end == 2 or body > len(packet):
        return None
    mid = int.from_bytes(view[end:body], "big") if qos else 0
    return bytes(view[2:end]), qos, mid, bytes(view[body:])


def _handle_publish(self: Any) -> Any:
    """paho ``Client._handle_publish`` for QoS 0/1 on MQTT 3.1.1, through ``split_publish``."""
    header = self._in_packet["command"]
    parts = split_publish(header, self._in_packet["packet"]) if self._protocol == MQTTv311 else None
    if parts is None:
        return self._fedwb_paho_handle_publish()
    topic, qos, mid, payload = parts
    message = MQTTMessage(mid=mid, topic=topic)
    message.dup = bool(header & 0x08)
    message.qos = qos
    message.retain = bool(header & 0x01)
    message.payload = payload
    message.timestamp = time.monotonic()
    self._handle_on_message(message)
    if qos == 1 and not self._manual_ack:
        return self._send_puback(mid)
    return MQTT_ERR_SUCCESS


def fast_publish(client: Any) -> bool:
    """Give this aiomqtt client (its paho client) the one-copy PUBLISH decoder; whether it was installed."""
    paho_client = getattr(client, "_client", None)
    if paho_client is None or not _paho_supported() or not all(hasattr(paho_client, n) for n in _NEEDED):
        return False
    if not hasattr(paho_client, "_fedwb_paho_handle_publish"):
        paho_client._fedwb_paho_handle_publish = paho_client._handle_publish
        paho_client._handle_publish = types.MethodType(_handle_publish, paho_client)
    return True


def installed(client: Any) -> bool:
    """Whether ``fast_publish`` is in force on this aiomqtt client."""
    return hasattr(getattr(client, "_client", None), "_fedwb_paho_handle_publish")
