"""A bounded incoming backlog: while the consumer is behind, an aiomqtt client stops reading its socket.

aiomqtt reads every PUBLISH the broker sends into an unbounded ``asyncio.Queue``. The broker is meant
to keep at most ``max_inflight_messages`` (20 in our config) unacknowledged QoS 1 messages in flight
per client, and the aggregator acknowledges a message only once it has been handled — yet with
mosquitto 2.0.11, 4 publishers and 400 KB updates, 530 messages (200 MB) piled up in the aggregator's
queue (``python -m bench.ingest``; the broker holds to 20 when the client never acknowledges, not
while acknowledgements flow). Each queued message is fresh memory: about 100 page faults per
update, 200 of the ~580 µs of CPU the aggregator spent per update, and a resident size that grows
with the backlog instead of staying flat.

``bound_backlog(client)`` swaps in a queue that counts what it holds (messages and payload bytes).
Over ``max_bytes`` or ``max_messages`` it removes the client's socket reader from the event loop;
TCP back-pressure then leaves the backlog in the broker, which queues (and persists) it for us.
Below half of both limits the reader is put back. Nothing is dropped: the queue never refuses a
message, the socket is only read later.

Stalls: a consumer may wait for something only the reader can deliver (the PUBACK of its own
QoS 1 publish). A paused reader whose queue has not moved for ``stall_s`` is put back and left on
until the consumer takes a message again — never a deadlock, at worst the unbounded behaviour
above while the consumer is stuck. Work that needs nothing from the reader (a big decode or a
disk write in a thread) runs inside ``with queue.working():``, which no stall interrupts: the
bound holds through it. No pause lasts longer than ``MAX_PAUSE_S`` (then one more packet is read),
so the socket is never left unread long enough for the keepalive to drop the connection (paho
gives up after two keepalive intervals without a byte).

The reader is the one aiomqtt registered (read back from the asyncio selector loop's key for the
socket), so its error handling is aiomqtt's own; on a loop without a selector (uvloop) or before
the socket is registered, the queue only counts and never pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

MAX_BYTES = 16 * 1024 * 1024  # 40 updates of 100k float32 parameters; one big model at a time
MAX_MESSAGES = 1000  # control commands and acks are small: bounds the count as well
STALL_S = 0.05
MAX_PAUSE_S = 10.0  # the longest one pause lasts (our keepalives are 30 s)


def _size(message: Any) -> int:
    payload = getattr(message, "payload", None)
    return len(payload) if isinstance(payload, bytes | bytearray | memoryview) else 0


class Backlog(asyncio.Queue):
    """An unbounded queue that pauses its client's socket reader while it holds too much."""

    def __init__(self, client: Any, max_bytes: int = MAX_BYTES, max_messages: int = MAX_MESSAGES,
                 stall_s: float = STALL_S) -> None:
        super().__init__()
        self._mqtt = client
        self.max_bytes, self.max_messages, self.stall_s = max_bytes, max_messages, stall_s
        self.bytes = 0  # payload bytes held
        self.taken = 0  # messages handed to the consumer so far
        self.pauses = 0  # times the reader was removed
        self.stalls = 0  # times it was put back because the consumer did not move
        self._reader: tuple[Any, int, Any, tuple] | None = None  # (socket, fd, callback, args) while paused
        self._stalled = False
        self._working = 0
        self._paused_at = 0.0
        self._watch: asyncio.TimerHandle | None = None

    @property
    def paused(self) -> bool:
        return self._reader is not None

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """The consumer is busy with work that needs nothing from the reader: a pause during it is not a stall."""
        self._working += 1
        try:
            yield
        finally:
            self._working -= 1

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.bytes += _size(item)
        if self._reader is None and not self._stalled and (
                self.bytes > self.max_bytes or self.qsize() > self.max_messages):
            self._pause()

    def _get(self) -> Any:
        item = super()._get()
        self.bytes -= _size(item)
        self.taken += 1
        self._stalled = False
        if self._reader is not None and self.bytes <= self.max_bytes // 2 and self.qsize() <= self.max_messages // 2:
            self._resume()
        return item

    def _loop_and_socket(self) -> tuple[Any, Any]:
        loop = getattr(self._mqtt, "_loop", None)
        return loop, getattr(getattr(self._mqtt, "_client", None), "_sock", None)

    def _pause(self) -> None:
        loop, sock = self._loop_and_socket()
        selector = getattr(loop, "_selector", None)
        if sock is None or selector is None:
            return
        try:
            fd = sock.fileno()
            handle = selector.get_key(fd).data[0]
        except (KeyError, ValueError, OSError, AttributeError, IndexError, TypeError):
            return
        if handle is None or handle.cancelled():
            return
        self._reader = (sock, fd, handle._callback, handle._args)
        loop.remove_reader(fd)
        self._paused_at = loop.time()
        self.pauses += 1
        self._watch = loop.call_later(self.stall_s, self._check, self.taken)

    def _check(self, taken: int) -> None:
        """While paused: put the reader back if the consumer took nothing since the last check."""
        self._watch = None
        if self._reader is None:
            return
        loop, _ = self._loop_and_socket()
        if loop.time() - self._paused_at > MAX_PAUSE_S:
            self._resume()  # read now and then whatever the consumer does: the keepalive needs bytes
            return
        if self.taken == taken and not self._working:
            self.stalls += 1
            self._stalled = True
            self._resume()
            return
        self._watch = loop.call_later(self.stall_s, self._check, self.taken)

    def _resume(self) -> None:
        sock, fd, callback, args = self._reader
        self._reader = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        loop, current = self._loop_and_socket()
        if current is not sock:  # the connection is gone: aiomqtt registers a new socket's reader itself
            return
        try:
            if sock.fileno() != fd:
                return
            loop.add_reader(fd, callback, *args)
            if getattr(sock, "pending", None) is not None and sock.pending() > 0:
                loop.call_soon(callback, *args)  # TLS already decrypted it: the socket will not signal it again
        except (OSError, ValueError):
            return


def bound_backlog(client: Any, max_bytes: int = MAX_BYTES, max_messages: int = MAX_MESSAGES,
                  stall_s: float = STALL_S) -> Backlog | None:
    """Give an aiomqtt client (before it connects) a ``Backlog`` queue; None where it has no queue."""
    old = getattr(client, "_queue", None)
    if not isinstance(old, asyncio.Queue):
        return None
    if isinstance(old, Backlog):
        return old
    queue = Backlog(client, max_bytes, max_messages, stall_s)
    while not old.empty():  # nothing arrives before connecting; kept anyway
        queue.put_nowait(old.get_nowait())
    client._queue = queue
    return queue
