"""Agent start-up: seconds from launching ``fedwb agent`` to its retained status saying "online".

    python -m bench.startup --json [--fedwb PATH ...] [--repeats 5]

Each ``--fedwb`` is a ``fedwb`` executable (e.g. of a lean ``pip install .`` venv and of a full
``pip install '.[all]'`` one); default: this environment's. The agent runs the noop task against
a mosquitto started here; the median over ``--repeats`` launches is reported per executable.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
import uuid
from typing import Any

from bench.common import emit, ensure_project_python, machine


async def once(fedwb: str, host: str, port: int, url: str) -> float:
    import aiomqtt

    import schemas
    from schemas import AgentStatus, Topics

    job = f"startup-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(host, port) as c:
        await c.subscribe(Topics(job).agent_status("a"), qos=1)
        t0 = time.perf_counter()
        proc = subprocess.Popen([fedwb, "agent", "--broker", url, "--job", job, "--agent-id", "a", "--task", "noop"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with asyncio.timeout(120):
                async for m in c.messages:
                    if schemas.unpack(bytes(m.payload), AgentStatus).state == "online":
                        return time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(30)
    raise RuntimeError("no online status")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from broker import start_broker
    from fedwb import executable

    results = {}
    with start_broker(kind="auto") as b:
        for fedwb in args.fedwb or [executable()]:
            times = [await once(fedwb, b.host, b.port, b.url) for _ in range(args.repeats)]
            results[fedwb] = {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}
    return {"startup_to_online": results, "machine": machine()}


def main(argv: list[str] | None = None) -> None:
    ensure_project_python("bench.startup")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fedwb", action="append", help="A fedwb executable to time (repeatable).")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="One line of JSON.")
    args = p.parse_args(argv)
    emit(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
