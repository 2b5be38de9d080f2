"""Receiving big PUBLISH packets without paho's three copies of the payload.

paho-mqtt 2.x splits an incoming PUBLISH with three ``struct.unpack`` calls whose formats
end in ``{n}s``; each returns a fresh ``bytes`` of the rest of the packet, so a 400 KB update
is copied three times (plus allocated and page-faulted three times) before anyone sees it:
about 0.65 ms of the 0.8 ms a plain subscriber spends per such message on this machine
(``python -m bench.ingest``). ``fast_publish(client)`` gives one aiomqtt client a decoder that
reads the MQTT 3.1.1 header fields through a ``memoryview`` and copies the payload once.

Before that decoder, paho *reads* a big packet as ``packet += sock.recv(rest)`` in a loop: every
call allocates a fresh buffer of the whole rest (a 400 KB update arrives in 5-6 reads on
loopback) and every ``+=`` grows the packet again (~300 µs per 400 KB update in the aggregator
while its queue grew without bound; once ``schemas.backlog`` bounds it, no gain was measurable on
loopback, so this is kept for never allocating per read, not for a figure). ``fast_publish``
reads the body of a PUBLISH of ``DIRECT_READ`` bytes or more with ``recv_into`` into one buffer
of the exact size, kept for the next packet up to ``KEEP_BYTES``, then paho's own code handles
the packet as before. Header bytes, small packets, and sockets without ``recv_into``
(websockets) keep paho's reader. With ``views=True`` the buffer is the packet's own (never
reused) and the payload a read-only ``memoryview`` of it: no copy at all after the socket's.

Scope, so the shortcut can never change what a message means: QoS 0 and 1 on MQTT 3.1.1,
which is what our clients use; anything else (QoS 2, MQTT 5 properties, a packet too short
for its own header or with an empty topic) goes to paho's own decoder, which also reports
malformed packets as it always did. The handler and reader use paho's private attributes in
``_NEEDED``; they are installed only where those exist and paho's major version is 2
(``installed`` says whether they were).
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from paho.mqtt.client import (
    MQTT_ERR_AGAIN,
    MQTT_ERR_CONN_LOST,
    MQTT_ERR_SUCCESS,
    MQTT_LOG_ERR,
    PUBLISH,
    MQTTMessage,
    MQTTv311,
    time_func,
)

from schemas.paho_patch import override, patchable

_NEEDED = ("_in_packet", "_handle_on_message", "_send_puback", "_manual_ack", "_protocol", "_handle_publish",
           "_packet_read", "_sock_recv", "_easy_log", "_msgtime_mutex", "_call_socket_register_write")
DIRECT_READ = 64 * 1024  # PUBLISH bodies this long or longer are read straight into one buffer
KEEP_BYTES = 64 * 1024 * 1024  # the receive buffer is kept for the next packet up to this size
READS_PER_CALL = 100  # as paho: a huge packet yields to the event loop every this many reads


def split_publish(header: int, packet: bytes | bytearray | memoryview,
                  copy: bool = True) -> tuple[bytes, int, int, bytes | memoryview] | None:
    """(topic, qos, packet id, payload) of an MQTT 3.1.1 PUBLISH body, or None to leave it to paho.

    ``header`` is the fixed header's first byte, ``packet`` what follows the remaining length:
    a 2-byte topic length, the topic, a 2-byte packet id when QoS > 0, then the payload
    (copied once; with ``copy=False`` a read-only view of ``packet``, which must then never be
    written again).
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
    return bytes(view[2:end]), qos, mid, (bytes(view[body:]) if copy else view[body:].toreadonly())


def _handle_publish(self: Any) -> Any:
    """paho ``Client._handle_publish`` for QoS 0/1 on MQTT 3.1.1, through ``split_publish``."""
    header = self._in_packet["command"]
    packet = self._in_packet["packet"]
    parts = split_publish(header, packet, not self._fedwb_views) if self._protocol == MQTTv311 else None
    if parts is None:
        if isinstance(packet, memoryview):  # read by _packet_read below; paho's decoder wants its own bytearray
            self._in_packet["packet"] = bytearray(packet)
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


def _direct(self: Any) -> bool:
    """Whether the packet being read is a PUBLISH body for ``_read_body`` (started, or about to start)."""
    ip = self._in_packet
    if "fedwb_view" in ip:
        return True
    return bool(ip["have_remaining"]) and ip["to_process"] >= DIRECT_READ and not ip["packet"] \
        and ip["command"] & 0xF0 == PUBLISH and hasattr(self._sock, "recv_into")


def _sock_recv(self: Any, bufsize: int) -> bytes:
    """paho ``Client._sock_recv``, except that it leaves a big PUBLISH body to ``_read_body``."""
    if bufsize >= DIRECT_READ and _direct(self):
        raise BlockingIOError  # paho's reader stops here (MQTT_ERR_AGAIN) with the header read
    return self._fedwb_paho_sock_recv(bufsize)


def _packet_read(self: Any) -> Any:
    """paho ``Client._packet_read``; a PUBLISH body of ``DIRECT_READ`` bytes or more goes to ``_read_body``."""
    if not _direct(self):
        rc = self._fedwb_paho_packet_read()
        if rc != MQTT_ERR_AGAIN or not _direct(self):
            return rc
    return _read_body(self)


def _read_body(self: Any) -> Any:
    """Read the rest of a PUBLISH body with ``recv_into`` into one buffer, then let paho handle it.

    State between calls (the socket ran dry) lives in paho's ``_in_packet`` (``fedwb_view``,
    ``fedwb_filled``), which paho replaces after every packet and on every reconnect."""
    ip = self._in_packet
    if "fedwb_view" not in ip:
        size = ip["remaining_length"]
        buf = None if self._fedwb_views else getattr(self, "_fedwb_rx", None)
        if buf is None or len(buf) < size:
            buf = bytearray(size)
            if size <= KEEP_BYTES and not self._fedwb_views:  # views point into it: never reused then
                self._fedwb_rx = buf
        ip["fedwb_view"], ip["fedwb_filled"] = memoryview(buf)[:size], 0
    view, filled = ip["fedwb_view"], ip["fedwb_filled"]
    for _ in range(READS_PER_CALL):
        if filled == len(view):
            break
        try:
            got = self._sock.recv_into(view[filled:])
        except (BlockingIOError, ssl.SSLWantReadError):
            ip["fedwb_filled"] = filled
            return MQTT_ERR_AGAIN
        except ssl.SSLWantWriteError:
            ip["fedwb_filled"] = filled
            self._call_socket_register_write()
            return MQTT_ERR_AGAIN
        except (OSError, AttributeError) as err:  # AttributeError: the socket went away under us
            self._easy_log(MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTT_ERR_CONN_LOST
        if got == 0:
            return MQTT_ERR_CONN_LOST
        filled += got
        ip["to_process"] -= got
        with self._msgtime_mutex:
            self._last_bytes_received = time_func()
    ip["fedwb_filled"] = filled
    if filled < len(view):
        return MQTT_ERR_AGAIN
    ip["packet"] = view
    return self._fedwb_paho_packet_read()  # nothing left to read: paho handles the packet and resets


def fast_publish(client: Any, views: bool = False) -> bool:
    """Give this aiomqtt client (its paho client) the one-copy PUBLISH reader and decoder; whether they
    were installed.

    ``views``: QoS 0/1 payloads arrive as read-only ``memoryview``s of a buffer that belongs to
    that one packet, not as ``bytes`` — no copy at all after the socket's, for a consumer that
    takes any bytes-like payload (the aggregator's update path). Default: ``bytes``, copied once."""
    paho_client = patchable(client, _NEEDED)
    if paho_client is None:
        return False
    paho_client._fedwb_views = views
    override(paho_client, "_handle_publish", _handle_publish)
    override(paho_client, "_sock_recv", _sock_recv)
    override(paho_client, "_packet_read", _packet_read)
    return True


def installed(client: Any) -> bool:
    """Whether ``fast_publish`` is in force on this aiomqtt client."""
    return hasattr(getattr(client, "_client", None), "_fedwb_paho_handle_publish")
