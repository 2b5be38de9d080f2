"""The embedded pure-Python broker (amqtt), used when mosquitto is not installed.

Run as ``python -m broker.embedded --port P``; prints ``READY <url>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import warnings

from fedwb.lifeline import watch_parent


def broker_config(host: str, port: int) -> dict:
    """amqtt configuration: one TCP listener, anonymous access, no $SYS topics."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(host: str, port: int, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or forever)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))
    await broker.start()
    if ready is not None:
        ready.set()
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    watch_parent()  # started by start_broker: end with that process, even after its SIGKILL
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)

    async def run() -> None:
        ready, stop = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(serve(args.host, args.port, ready, stop))
        await ready.wait()
        print(f"READY mqtt://{args.host}:{args.port}", flush=True)
        await task

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
