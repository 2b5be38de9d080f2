"""Fault injection: kill -9 the broker and the aggregator at random moments during a real job.

    python -m bench.faults --json [--agents 4] [--broker-kills 20] [--aggregator-kills 20] [--seed 0]

A mosquitto (persistence on, the project's config), an aggregator with a state dir and N
agents (noop task, small model, a random network delay so updates are in flight at any
moment), all real processes. Kills alternate in random order, each after a random 1-3 s of
running, and the killed process comes back 0-1 s later. After each recovery the retained
global model is read by a fresh subscriber and compared with the aggregator's version.

Verdicts, from the records alone (agents' logs, the aggregator's state.json and inbox):
``confirmed_lost`` (an update an agent saw confirmed that was neither fused, nor superseded
by a later fused update of the same agent, nor still buffered at the end), ``fused_twice``,
``replaced_fused`` (an agent's update fused after a newer one of the same agent),
``version_gaps``, ``retained_stale`` (recoveries after which the retained global stayed
older than the aggregator's version for 20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import emit, ensure_project_python, machine, progress

SHAPES = "64x64,64"
READY = re.compile(r"(\S+): round (\d+) from v(\d+) ready as update (\w+)")
CONFIRMED = re.compile(r"(\S+): update (\w+) confirmed: (\w+) at v(\d+)")


class Job:
    """The processes of one job; each can be killed (SIGKILL) and started again."""

    def __init__(self, root: Path, agents: int, seed: int) -> None:
        from broker import start_broker
        from fedwb import executable

        self.root, self.fedwb, self.seed = root, executable(), seed
        self.broker = start_broker(kind="mosquitto", data_dir=root / "broker")
        self.url = self.broker.url
        self.state = root / "state"
        self.aggregator: subprocess.Popen | None = None
        self.agents = [self._agent(i) for i in range(agents)]
        self.start_aggregator()

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        out = open(self.root / log, "a")  # noqa: SIM115 - the process owns it
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_aggregator(self) -> None:
        self.aggregator = self._spawn([self.fedwb, "aggregator", "--broker", self.url, "--job", "faults",
                                       "--task", "noop", "--task-option", f"shapes={SHAPES}", "--quorum", "2",
                                       "--deadline", "2", "--state-dir", str(self.state), "--device", "cpu"],
                                      "aggregator.log")

    def _agent(self, i: int) -> subprocess.Popen:
        return self._spawn([self.fedwb, "agent", "--broker", self.url, "--job", "faults", "--agent-id", f"a{i}",
                            "--task", "noop", "--task-option", f"shapes={SHAPES}", "--seed", str(self.seed + i),
                            "--delay", "uniform:0.05:0.6"], f"agent-{i}.log")

    def kill(self, what: str) -> None:
        if what == "broker":
            self.broker.kill()
        else:
            self.aggregator.kill()
            self.aggregator.wait(10)

    def revive(self, what: str) -> None:
        if what == "broker":
            from broker import start_broker

            fresh = start_broker(self.broker.port, kind="mosquitto", data_dir=self.broker.data_dir)
            self.broker.proc = fresh.proc
        else:
            self.start_aggregator()

    def version(self) -> int:
        try:
            return int(json.loads((self.state / "state.json").read_text())["version"])
        except (OSError, ValueError, KeyError):
            return -1

    def stop(self) -> None:
        for p in self.agents:
            p.send_signal(signal.SIGTERM)
        for p in self.agents:
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
        self.aggregator.send_signal(signal.SIGTERM)
        try:
            self.aggregator.wait(30)
        except subprocess.TimeoutExpired:
            self.aggregator.kill()
        self.broker.close()


async def retained_version(url: str, timeout: float) -> int:
    """The retained global model's version (-1 when none arrives within ``timeout``)."""
    import aiomqtt

    import schemas
    from schemas import BrokerAddress, GlobalModel, Topics

    try:
        async with asyncio.timeout(timeout), aiomqtt.Client(**BrokerAddress.parse(url).client_kwargs()) as c:
            await c.subscribe(Topics("faults").global_model, qos=1)
            async for m in c.messages:
                return schemas.unpack(bytes(m.payload), GlobalModel).version
    except (TimeoutError, aiomqtt.MqttError):
        return -1
    return -1


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def recovered(job: Job, timeout: float = 20.0) -> tuple[bool, int, int]:
    """After a restart: wait until the retained global is at the aggregator's version."""
    deadline = time.monotonic() + timeout
    retained = version = -1
    while time.monotonic() < deadline:
        version = job.version()
        retained = asyncio.run(retained_version(job.url, 3.0))
        if retained >= version >= 0:
            return True, retained, version
        time.sleep(0.3)
    return False, retained, version


def analyse(root: Path, agents: int) -> dict[str, Any]:
    """The verdicts (module docstring) from the logs, state.json and the inbox."""
    ready: dict[str, tuple[str, int]] = {}  # update id -> (agent, round)
    confirmed: dict[str, str] = {}
    for i in range(agents):
        for line in (root / f"agent-{i}.log").read_text().splitlines():
            if m := READY.search(line):
                ready[m.group(4)] = (m.group(1), int(m.group(2)))
            elif m := CONFIRMED.search(line):
                confirmed[m.group(2)] = m.group(3)
    state = json.loads((root / "state" / "state.json").read_text())
    history = state["history"]
    fused = Counter(uid for h in history for uid in h["update_ids"])
    inbox = {p.stem for p in (root / "state" / "inbox").glob("*.msgpack")}
    versions = [h["version"] for h in history]
    last_fused_round: dict[str, int] = {}
    replaced_fused = 0
    for h in history:
        for uid in h["update_ids"]:
            agent, rnd = ready.get(uid, ("?", -1))
            if rnd < last_fused_round.get(agent, -1):
                replaced_fused += 1
            last_fused_round[agent] = max(rnd, last_fused_round.get(agent, -1))
    kept = {uid for uid, outcome in confirmed.items() if outcome in ("accepted", "replaced", "duplicate")}
    lost = [uid for uid in kept if uid not in fused and uid not in inbox
            and last_fused_round.get(ready.get(uid, ("?", -1))[0], -1) <= ready.get(uid, ("?", -1))[1]]
    return {
        "updates_published": len(ready), "confirmed": len(confirmed), "confirmed_kept": len(kept),
        "confirmed_verdicts": dict(Counter(confirmed.values())), "fused_updates": sum(fused.values()),
        "confirmed_lost": len(lost), "lost_ids": lost[:10], "fused_twice": sum(1 for c in fused.values() if c > 1),
        "replaced_fused": replaced_fused, "buffered_at_end": len(inbox), "final_version": state["version"],
        "version_gaps": sum(1 for a, b in zip(versions, versions[1:], strict=False) if b != a + 1)
        + (0 if not versions or versions[0] == 1 else 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    plan = ["broker"] * args.broker_kills + ["aggregator"] * args.aggregator_kills
    rng.shuffle(plan)
    root = Path(tempfile.mkdtemp(prefix="fedwb-faults-"))
    job = Job(root, args.agents, args.seed)
    stale = []
    t0 = time.monotonic()
    try:
        if not wait_until(lambda: job.version() >= 1, 60):
            raise SystemExit(f"bench.faults: no fusion within 60 s; see {root}")
        for n, what in enumerate(plan, start=1):
            before = job.version()
            wait_until(lambda b=before: job.version() > b, rng.uniform(1.0, 3.0))  # progress, or 1-3 s
            time.sleep(rng.uniform(0.0, 0.5))  # a random moment, not right after a fusion
            job.kill(what)
            time.sleep(rng.uniform(0.0, 1.0))  # the outage
            job.revive(what)
            ok, retained, version = recovered(job)
            if not ok:
                stale.append({"kill": n, "what": what, "retained": retained, "version": version})
            progress(f"bench.faults: kill {n}/{len(plan)} ({what}) recovered at v{version} (retained v{retained})")
        wait_until(lambda: False, 5.0)  # a last stretch of normal running
    finally:
        job.stop()
    result = analyse(root, args.agents)
    result.update(kills={"broker": args.broker_kills, "aggregator": args.aggregator_kills}, agents=args.agents,
                  retained_stale=len(stale), retained_stale_cases=stale[:5], seconds=round(time.monotonic() - t0, 1),
                  records=str(root), machine=machine())
    return result


def main(argv: list[str] | None = None) -> None:
    ensure_project_python("bench.faults")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--broker-kills", type=int, default=20)
    p.add_argument("--aggregator-kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="One line of JSON.")
    args = p.parse_args(argv)
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
