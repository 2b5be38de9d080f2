"""Flower's side of the comparison: its environment and one Deployment Engine run.

Flower lives in its own virtual environment (``.venv-flower`` next to the project's
``.venv``), created on first use with ``pip install flwr==FLWR_VERSION``. It cannot
share the project's: flwr 1.42 needs ``typer<0.21``, amqtt 0.12 ``typer>=0.24`` and
amqtt 0.11 ``typer==0.15.4``, with which flwr's own CLI fails to start. Flower's
processes only need flwr and numpy, and they are separate processes either way. An
environment given with ``--flower-venv``, or this interpreter's, is used instead when
its ``flwr`` is FLWR_VERSION and its CLI starts.

A run: ``flower-superlink --insecure`` (Fleet, Control and Runtime APIs share one port
in 1.42), N ``flower-supernode --insecure`` each with its own runtime port, and
``flwr run APP bench`` against a connection in a private ``FLWR_HOME``, with runtime
dependency installation disabled (nothing is downloaded). The ServerApp writes one
JSON line per round (see ``flower_app/fedwb_flower_bench/server_app.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import progress, round_records
from broker.run import free_port, wait_for_port
from sim.runner import Processes

FLWR_VERSION = "1.42.0"  # the version this bench was written against
APP_DIR = Path(__file__).parent / "flower_app"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FlowerEnv:
    """Where Flower's console scripts are, and which flwr they run."""

    bin_dir: Path
    version: str

    def exe(self, name: str) -> str:
        return str(self.bin_dir / name)

    def env(self, flwr_home: Path) -> dict[str, str]:
        """Variables for Flower's processes: its bin first on PATH (SuperExec is found there)."""
        return {"PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home)}


def _flwr_version(python: Path) -> str | None:
    """flwr's version in the environment of ``python`` if its CLI starts there, else None."""
    flwr_cli = python.parent / "flwr"
    if not python.exists() or not flwr_cli.exists():
        return None
    r = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('flwr'))"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None
    cli = subprocess.run([str(flwr_cli), "--help"], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() if cli.returncode == 0 else None


def default_venv() -> Path:
    """``.venv-flower`` in the project checkout, else a per-user cache directory."""
    if (ROOT / "pyproject.toml").exists() and os.access(ROOT, os.W_OK):
        return ROOT / ".venv-flower"
    return Path.home() / ".cache" / "fedwb" / f"flower-{FLWR_VERSION}"


def find_or_create(venv: Path | None = None, create: bool = True) -> FlowerEnv:
    """Flower ``FLWR_VERSION``: from ``venv``, this interpreter's environment, or a venv made now."""
    if venv is None:
        here = Path(sys.executable)
        if _flwr_version(here) == FLWR_VERSION:
            return FlowerEnv(here.parent, FLWR_VERSION)
        venv = default_venv()
    python = venv / "bin" / "python"
    found = _flwr_version(python)
    if found == FLWR_VERSION:
        return FlowerEnv(python.parent, found)
    if not create:
        raise RuntimeError(f"a working flwr {FLWR_VERSION} is not in {venv} (found: {found})")
    progress(f"flower: installing flwr=={FLWR_VERSION} into {venv} (once; about 30 s)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          f"flwr=={FLWR_VERSION}", "numpy>=1.26"], capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install flwr=={FLWR_VERSION} into {venv} failed:\n{pip.stderr[-2000:]}")
    found = _flwr_version(python)
    if found != FLWR_VERSION:
        raise RuntimeError(f"installing flwr {FLWR_VERSION} into {venv} gave {found}")
    return FlowerEnv(python.parent, found)


def _connection_config(port: int) -> str:
    return ("[superlink]\ndefault = \"bench\"\n\n[superlink.bench]\n"
            f"address = \"127.0.0.1:{port}\"\ninsecure = true\n")


def _run_config(clients: int, params: int, rounds: int, noise: float, out: Path, timeout: float) -> str:
    return (f"num-clients={clients} num-params={params} num-rounds={rounds} noise={noise} "
            f"round-timeout={timeout} node-wait-timeout={timeout} out-file='{out}'")


def run(env: FlowerEnv, procs: Processes, watch: Any, work: Path, clients: int, params: int, rounds: int,
        noise: float, timeout: float, node_address: Callable[[int, int], str] | None = None) -> list[dict[str, Any]]:
    """One Flower run of ``rounds`` FedAvg rounds; the ServerApp's round records.

    ``watch(pid, role)`` is called with every long-running process (SuperLink, SuperNodes with
    their ClientApps as "clients") so their CPU can be sampled; ``flwr run`` only submits and exits.
    ``node_address(i, port)``: the address SuperNode ``i`` dials for the SuperLink listening on
    ``port`` (default ``127.0.0.1:port``; bench.network passes an emulated link's proxy).
    """
    home, app, out = work / "flwr-home", work / "flower-app", work / "flower-rounds.jsonl"
    home.mkdir(parents=True)
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    (home / "config.toml").write_text(_connection_config(port))
    penv = env.env(home)
    link = procs.start("superlink", [env.exe("flower-superlink"), "--insecure", "--port", str(port),
                                     "--disable-runtime-dependency-installation"], env=penv)
    watch(link.pid, "superlink")
    wait_for_port("127.0.0.1", port, timeout=60, proc=link)
    for i in range(clients):
        address = node_address(i, port) if node_address is not None else f"127.0.0.1:{port}"
        node = procs.start(f"supernode-{i}", [env.exe("flower-supernode"), "--insecure", "--superlink",
                                              address, "--port", str(free_port())], env=penv)
        watch(node.pid, "clients")
    submit = procs.start("flwr-run", [env.exe("flwr"), "run", str(app), "bench", "--run-config",
                                      _run_config(clients, params, rounds, noise, out, timeout)], env=penv)
    if submit.wait(120) != 0:
        raise RuntimeError(f"`flwr run` failed; see {work / 'flwr-run.log'}")
    deadline, done = time.monotonic() + timeout, 0
    while len(found := round_records(out)) < rounds:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Flower finished {len(found)} of {rounds} rounds in {timeout:.0f} s; logs in {work}")
        if procs.failed():
            raise RuntimeError(f"Flower process(es) {procs.failed()} exited; logs in {work}")
        if len(found) > done:
            done = len(found)
            progress(f"flower: round {done}/{rounds}")
        time.sleep(0.5)  # polling the ServerApp's record file
    return found
