"""A model larger than one MQTT packet, federated: chunked updates and global models, memory measured.

    python -m bench.bigmodel --json [--mib 1024] [--agents 3] [--versions 3] [--tensors 16] [--state-dir]

Real processes: mosquitto (the project's config), ``fedwb aggregator`` (noop task, quorum =
agents, ``--max-rounds versions``) and N ``fedwb agent`` s, all with the default chunking
(models over 128 MiB travel as a manifest plus 8 MiB chunks). The model is ``--tensors``
float32 tensors of ``--mib`` MiB in all. Every process's resident memory (VmRSS, file-backed
pages included) is sampled every 0.2 s; the result is the peak per process, the aggregator's
peak over the model size (the goal of issue 16: at most 3), the wall time to the last version
and the versions reached.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, ensure_project_python, machine, progress


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def shapes(mib: int, tensors: int) -> str:
    per = mib * 1024 * 1024 // 4 // tensors
    return ",".join([str(per)] * tensors)


def run(mib: int, agents: int, versions: int, tensors: int, state: bool, timeout: float,
        chunk_mib: float | None = None) -> dict[str, Any]:
    from broker import start_broker
    from fedwb import executable

    fedwb = executable()
    root = Path(tempfile.mkdtemp(prefix="fedwb-bigmodel-"))
    broker = start_broker(kind="mosquitto", data_dir=root / "broker")
    spec = shapes(mib, tensors)
    common = ["--broker", broker.url, "--job", "big", "--task", "noop", "--task-option", f"shapes={spec}"]
    if chunk_mib is not None:
        common += ["--chunk-mib", str(chunk_mib)]
    logs = []

    def spawn(cmd: list[str], name: str) -> subprocess.Popen:
        out = open(root / f"{name}.log", "w")  # noqa: SIM115 - the process owns it
        logs.append(root / f"{name}.log")
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    agg_cmd = [fedwb, "aggregator", *common, "--quorum", str(agents), "--max-rounds", str(versions),
               "--device", "cpu"] + (["--state-dir", str(root / "state")] if state else [])
    started = time.monotonic()
    aggregator = spawn(agg_cmd, "aggregator")
    procs = {"aggregator": aggregator, "broker": broker.proc}
    for i in range(agents):
        procs[f"agent-{i}"] = spawn([fedwb, "agent", *common, "--agent-id", f"a{i}", "--seed", str(i),
                                     "--max-rounds", str(versions)], f"agent-{i}")
    peak = dict.fromkeys(procs, 0.0)
    peak_at = dict.fromkeys(procs, 0.0)
    last_report = started
    try:
        while aggregator.poll() is None and time.monotonic() - started < timeout:
            for name, p in procs.items():
                now = rss_mib(p.pid)
                if now > peak[name]:
                    peak[name], peak_at[name] = now, time.monotonic() - started
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                progress(f"  {time.monotonic() - started:.0f}s: peak RSS " +
                         ", ".join(f"{k} {v:.0f} MiB" for k, v in peak.items()))
            time.sleep(0.2)
        wall = time.monotonic() - started
    finally:
        for name, p in procs.items():
            if name != "broker" and p.poll() is None:
                p.terminate()
        for name, p in procs.items():
            if name != "broker":
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
        broker.close()
        for bulky in ("broker", "state"):  # a model-sized copy each; the logs stay for reading
            shutil.rmtree(root / bulky, ignore_errors=True)
    text = (root / "aggregator.log").read_text()
    reached = max((int(w[1:]) for w in text.split() if w.startswith("v") and w[1:].isdigit()), default=0)
    model_mib = mib
    return {"model_mib": model_mib, "tensors": tensors, "agents": agents, "versions_asked": versions,
            "versions_reached": reached, "aggregator_exit": aggregator.returncode, "wall_seconds": round(wall, 1),
            "peak_rss_mib": {k: round(v) for k, v in peak.items()},
            "peak_at_seconds": {k: round(v, 1) for k, v in peak_at.items()},
            "aggregator_rss_over_model": round(peak["aggregator"] / model_mib, 2), "state_dir": state,
            "chunk_mib": chunk_mib,
            "logs": str(root)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="model size in MiB (float32)")
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--tensors", type=int, default=16, help="tensors the model is split into")
    ap.add_argument("--state-dir", action="store_true", help="run the aggregator with a durable state dir")
    ap.add_argument("--chunk-mib", type=float, default=None, help="chunk size (default: the services' default)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ensure_project_python("bench.bigmodel")
    progress(f"bigmodel: {args.mib} MiB model, {args.agents} agents, {args.versions} versions")
    result = run(args.mib, args.agents, args.versions, args.tensors, args.state_dir, args.timeout, args.chunk_mib)
    result["machine"] = machine()
    emit(result, args.json)


if __name__ == "__main__":
    main()
