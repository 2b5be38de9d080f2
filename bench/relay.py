"""The wire's floor: a plain aiomqtt relay through the broker, and raw loopback TCP.

    python -m bench.relay echo --host H --port P --prefix T --id I
    python -m bench.relay publish --host H --port P --prefix T --clients N --params P --rounds R --out F

A round of the relay is the least any MQTT federation must do: one publisher sends the
global payload (``4 * params`` bytes of float32) on ``T/global`` with QoS 1, each of the
N echo processes sends the bytes straight back on ``T/reply/I``, and the publisher
averages the N replies with numpy, ``w <- (1/N) * sum_i w_i``, which becomes the next
round's payload. No schema, no validation, no state. The publisher writes one JSON
line per round to ``F``: when it sent, when the last reply arrived and when the
average was ready.

``raw_loopback_seconds(nbytes)`` is the bandwidth floor: the time to push ``nbytes``
through one TCP connection on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

import aiomqtt
import numpy as np

STOP = b"stop"


async def echo(host: str, port: int, prefix: str, ident: int) -> None:
    """Send every payload on ``prefix/global`` back on ``prefix/reply/ident`` until ``stop``."""
    async with aiomqtt.Client(host, port, identifier=f"{prefix}-echo-{ident}") as c:
        await c.subscribe(f"{prefix}/global", qos=1)
        await c.publish(f"{prefix}/hello/{ident}", b"ready", qos=1, retain=True)  # retained: order-free start
        async for m in c.messages:
            payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
            if payload == STOP:
                return
            await c.publish(f"{prefix}/reply/{ident}", payload, qos=1)


async def publish(host: str, port: int, prefix: str, clients: int, params: int, rounds: int,
                  out: str, timeout: float) -> None:
    """Run ``rounds`` relay rounds against ``clients`` echo processes, one JSON line per round."""
    rng = np.random.default_rng(0)
    w = (0.1 * rng.standard_normal(params)).astype(np.float32)
    async with aiomqtt.Client(host, port, identifier=f"{prefix}-publisher") as c:
        await c.subscribe(f"{prefix}/hello/+", qos=1)
        await c.subscribe(f"{prefix}/reply/+", qos=1)
        async with asyncio.timeout(timeout):
            ready: set[str] = set()
            while len(ready) < clients:
                m = await anext(c.messages)
                if m.topic.matches(f"{prefix}/hello/+"):
                    ready.add(str(m.topic))
            with open(out, "a") as f:
                for r in range(1, rounds + 1):
                    sent_at = time.time()
                    await c.publish(f"{prefix}/global", w.tobytes(), qos=1)
                    replies: dict[str, np.ndarray] = {}
                    while len(replies) < clients:
                        m = await anext(c.messages)
                        if m.topic.matches(f"{prefix}/reply/+"):
                            replies[str(m.topic)] = np.frombuffer(m.payload, dtype=np.float32)
                    replies_at = time.time()
                    acc = np.zeros(params, dtype=np.float32)
                    for v in replies.values():
                        acc += v
                    w = acc / np.float32(clients)
                    f.write(json.dumps({"event": "round", "round": r, "sent_at": sent_at, "replies_at": replies_at,
                                        "aggregated_at": time.time(), "replies": len(replies)}) + "\n")
                    f.flush()
        await c.publish(f"{prefix}/global", STOP, qos=1)


def _sink(srv: socket.socket, nbytes: int, chunk: int, received: list[int]) -> None:
    """Accept one connection and read until ``nbytes`` arrived (or the peer closed)."""
    conn, _ = srv.accept()
    buf = bytearray(chunk)
    with conn:
        while received[0] < nbytes:
            n = conn.recv_into(buf)
            if n == 0:
                break
            received[0] += n


def raw_loopback_seconds(nbytes: int, repeats: int = 3, chunk: int = 4 << 20) -> float:
    """Median seconds to send ``nbytes`` over one TCP connection on 127.0.0.1 and read them."""
    times = []
    block = memoryview(bytearray(chunk))
    for _ in range(repeats):
        with socket.create_server(("127.0.0.1", 0)) as srv:
            received = [0]
            t = threading.Thread(target=_sink, args=(srv, nbytes, chunk, received), daemon=True)
            t.start()
            with socket.create_connection(srv.getsockname()) as s:
                t0 = time.perf_counter()
                left = nbytes
                while left > 0:
                    n = min(left, chunk)
                    s.sendall(block[:n])
                    left -= n
                t.join(60)
                times.append(time.perf_counter() - t0)
            if received[0] != nbytes:
                raise RuntimeError(f"loopback sink got {received[0]} of {nbytes} bytes")
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("echo", "publish"):
        s = sub.add_parser(role)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--prefix", required=True)
        if role == "echo":
            s.add_argument("--id", type=int, required=True)
        else:
            s.add_argument("--clients", type=int, required=True)
            s.add_argument("--params", type=int, required=True)
            s.add_argument("--rounds", type=int, required=True)
            s.add_argument("--out", required=True)
            s.add_argument("--timeout", type=float, default=300)
    a = p.parse_args(argv)
    if a.role == "echo":
        asyncio.run(echo(a.host, a.port, a.prefix, a.id))
    else:
        asyncio.run(publish(a.host, a.port, a.prefix, a.clients, a.params, a.rounds, a.out, a.timeout))


if __name__ == "__main__":
    main()
