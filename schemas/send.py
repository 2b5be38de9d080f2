"""Sending big packets without paho copying the rest of the packet on every partial write.

paho-mqtt 2.x writes a queued packet with ``sock.send(packet[pos:])``: when the socket takes
only part of it, the next write slices the rest again, and each slice of a ``bytearray`` is a
fresh copy (new memory, page faults). A 4 MB update that leaves in four writes is copied
4 + 3 + 2 + 1 MB; one 256 MB packet leaving 2.5 MB at a time would be copied ~13 GB.
``fast_send(client)`` hands paho, for packets of ``VIEW_FROM`` bytes or more, a wrapper whose
slices are ``memoryview``s of the packet, so each write reads the packet in place. That slice is
the only thing paho does with a queued packet besides ``len``.

Scope: TCP and TLS sockets (both take a ``memoryview``); on the websockets transport paho frames
each write itself, so packets go unwrapped. Uses paho's private ``_packet_queue`` and
``_transport``; installed only where they exist and paho's major version is 2.
"""

from __future__ import annotations

from typing import Any

from schemas.paho_patch import override, patchable

VIEW_FROM = 64 * 1024  # packets this long or longer are written through views
_NEEDED = ("_packet_queue", "_packet_write", "_transport", "_out_packet")


class Unsent:
    """A queued outgoing packet whose slices are read-only views of it, not copies."""

    __slots__ = ("_view",)

    def __init__(self, packet: bytes | bytearray) -> None:
        self._view = memoryview(packet).toreadonly()

    def __len__(self) -> int:
        return len(self._view)

    def __getitem__(self, key: slice | int) -> memoryview | int:
        return self._view[key]

    def tobytes(self) -> bytes:
        return self._view.tobytes()


def _packet_queue(self: Any, command: int, packet: bytes | bytearray, mid: int, qos: int, info: Any = None) -> Any:
    """paho ``Client._packet_queue``, with a big packet wrapped in ``Unsent``."""
    if len(packet) >= VIEW_FROM and self._transport != "websockets":
        packet = Unsent(packet)
    return self._fedwb_paho_packet_queue(command, packet, mid, qos, info)


def fast_send(client: Any) -> bool:
    """Give this aiomqtt client (its paho client) writes without copies; whether they were installed."""
    paho_client = patchable(client, _NEEDED)
    if paho_client is None:
        return False
    override(paho_client, "_packet_queue", _packet_queue)
    return True
