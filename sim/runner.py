"""``fedwb sim``: a broker, the real aggregator and N real agents as subprocesses.

Processes (not an executor): every agent is ``fedwb agent`` and the aggregator is
``fedwb aggregator``, exactly as deployed; the simulator adds the broker (unless one is
given), straggler knobs per agent, an in-process evaluator of each global version, a
live display, and results. Every process it started is stopped on exit, on error and
on Ctrl-C (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import psutil

from edge_agent.stragglers import parse_stragglers
from fedwb import executable
from fedwb.lifeline import env_for_child
from schemas import BrokerAddress, Topics
from schemas.connection import run_loop
from sim.evaluator import Evaluator, headline


@dataclass
class SimConfig:
    task: str = "mnist"
    agents: int = 5
    rounds: int = 10
    policy: str = "fedavg"
    switch_after: int | None = None
    dispersion_below: float | None = None  # hybrid: also switch at the first fusion whose dispersion is below
    reg: float | None = None
    wb_method: str | None = None  # hybrid's FedWB phase: fedwb-sinkhorn | fedwb | fedwb-neurons
    max_iter: str | None = None  # entropic FedWB iterations, or "paper"
    stop_threshold: float | None = None
    solver: str | None = None
    task_options: tuple[str, ...] = ()  # extra KEY=VALUE task options for the agents and the aggregator
    clip_factor: float | None = None  # influence bounds (None: the aggregator's defaults)
    server_lr: float | None = None  # the aggregator's server learning rate (None: 1)
    max_share: float | None = None
    quorum: int | None = None
    deadline: float | None = None
    max_staleness: int = 10
    stragglers: str | None = None
    broker: str = "auto"  # auto | embedded | mosquitto | mqtt://HOST:PORT
    job: str | None = None
    out: str = "runs/sim"
    seed: int = 0
    quick: bool = False
    partition: str = "iid"
    pole_lengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5])
    held_out_lengths: list[float] = field(default_factory=lambda: [0.4, 1.25])
    env_params: list[str] = field(default_factory=list)  # cartpole: per-agent physics specs, cycled
    held_out_envs: list[str] = field(default_factory=list)  # cartpole: physics evaluated only
    local_epochs: int | None = None
    local_steps: int | None = None
    model: str = "mlp"
    preset: str = "stable"  # cartpole recipe: stable | paper
    init: str = "global"  # agents' first round: global | own (each its own random init)
    pretrain: int = 0  # with init own: extra local budget first (cartpole: steps alone, "trained apart")
    device: str = "cpu"
    timeout: float = 1800.0
    live: bool = True
    # False for a template that a subcommand varies (sweep, compare): its cells are checked instead
    check_policy: InitVar[bool] = True

    def __post_init__(self, check_policy: bool = True) -> None:
        if self.agents < 1 or self.rounds < 1:
            raise ValueError("--agents and --rounds must be >= 1")
        if self.quorum is not None and not 1 <= self.quorum <= self.agents:
            raise ValueError(f"--quorum must be between 1 and --agents ({self.agents})")
        if self.broker not in ("auto", "embedded", "mosquitto") and not self.broker.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"--broker {self.broker!r}: use auto, embedded, mosquitto or mqtt://HOST:PORT")
        bad = [t for t in self.task_options if "=" not in t or t.startswith("=")]
        if bad:
            raise ValueError(f"--task-option {bad[0]!r} is not KEY=VALUE")
        from edge_agent.tasks import resolve

        resolve(self.task)  # a built-in, an installed plugin or package.module:Class (ValueError names it)
        if self.init not in ("global", "own"):
            raise ValueError(f"--init must be global or own, got {self.init!r}")
        if self.preset not in ("stable", "paper"):
            raise ValueError(f"unknown cartpole preset {self.preset!r}: use stable or paper")
        parse_stragglers(self.stragglers)
        if (self.env_params or self.held_out_envs) and self.task != "cartpole":
            raise ValueError("--env-params and --held-out-envs are cartpole options")
        from edge_agent.tasks.cartpole import parse_env

        for spec in (*self.env_params, *self.held_out_envs):
            parse_env(spec)  # a bad key or value names itself
        if check_policy:
            self._check_policy()
        if self.task == "mnist":
            from edge_agent.tasks.mnist import partition

            partition(np.zeros(4, np.int64), 2, self.partition)  # ValueError names a bad scheme

    def _check_policy(self) -> None:
        """The aggregator's own policy checks, here, so a bad value fails before anything starts
        (a sweep's last cell included), as one line naming it."""
        from pydantic import ValidationError

        from schemas.messages import PolicySpec, parse_max_iter

        max_iter = parse_max_iter(self.max_iter) if isinstance(self.max_iter, str) else self.max_iter
        opts = {"name": self.policy, "switch_after": self.switch_after, "dispersion_below": self.dispersion_below,
                "wb_method": self.wb_method, "reg": self.reg, "max_iter": max_iter,
                "stop_threshold": self.stop_threshold, "solver": self.solver}
        try:
            PolicySpec(**{k: v for k, v in opts.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"])) or "policy"
            raise ValueError(f"invalid policy: {where}: {err['msg']}") from None

    @property
    def job_name(self) -> str:
        return self.job or f"sim-{self.task}-{self.policy}-s{self.seed}-{os.getpid()}"


def pole_lengths_for(cfg: SimConfig) -> list[float]:
    """Agent i's pole half-length: the list cycled."""
    return [cfg.pole_lengths[i % len(cfg.pole_lengths)] for i in range(cfg.agents)]


def agent_env(cfg: SimConfig, i: int) -> str:
    """Agent i's physics as an ``env`` spec: its ``--env-params`` entry (cycled), its pole length where
    the entry has none; just the pole length without ``--env-params``."""
    from edge_agent.tasks.cartpole import env_spec, parse_env

    params = parse_env(cfg.env_params[i % len(cfg.env_params)]) if cfg.env_params else {}
    params.setdefault("length", pole_lengths_for(cfg)[i])
    return env_spec(params)


def cartpole_local_steps(cfg: SimConfig) -> int:
    """Environment steps per round: given, the paper's 100, or 500 (quick) / 1,000 (the recipe's)."""
    if cfg.local_steps:
        return cfg.local_steps
    if cfg.preset == "paper":
        return 100
    return 500 if cfg.quick else 1000


def _agent_cmd(cfg: SimConfig, broker: str, job: str, i: int) -> list[str]:
    fedwb = executable()
    cmd = [fedwb, "agent", "--broker", broker, "--job", job, "--agent-id", f"agent-{i}", "--task", cfg.task,
           "--seed", str(cfg.seed * 1000 + i), "--device", cfg.device, "--log-level", "WARNING"]
    if cfg.task == "mnist":
        cmd += ["--shard", f"{i}/{cfg.agents}", "--partition", cfg.partition, "--model", cfg.model,
                "--local-epochs", str(cfg.local_epochs or 1)]
    elif cfg.task == "cartpole":
        steps = cartpole_local_steps(cfg)
        cmd += ["--task-option", f"env={agent_env(cfg, i)}", "--local-steps", str(steps),
                "--task-option", f"preset={cfg.preset}",
                "--task-option", f"total_steps={steps * cfg.rounds}"]  # the schedules span the whole run
    elif cfg.task == "noop":
        cmd += ["--task-option", "shapes=[[100, 100]]"]
    elif cfg.local_epochs or cfg.local_steps:  # a plugin task: its budget as given, its own defaults otherwise
        budget = ["--local-epochs", str(cfg.local_epochs)] if cfg.local_epochs else []
        cmd += budget or ["--local-steps", str(cfg.local_steps)]
    for item in cfg.task_options:
        cmd += ["--task-option", item]
    if cfg.init != "global":
        cmd += ["--init", cfg.init, "--pretrain", str(cfg.pretrain)]
    knobs = parse_stragglers(cfg.stragglers).agent_knobs(i, cfg.agents)
    if knobs["slowdown"] != 1.0:
        cmd += ["--slowdown", str(knobs["slowdown"])]
    if knobs["delay"]:
        cmd += ["--delay", str(knobs["delay"])]
    if knobs["drop"]:
        cmd += ["--drop", str(knobs["drop"])]
    if knobs["crash"]:
        cmd += ["--crash", str(knobs["crash"])]
    return cmd


def _aggregator_cmd(cfg: SimConfig, broker: str, job: str, state_dir: str) -> list[str]:
    fedwb = executable()
    quorum = cfg.quorum or cfg.agents
    cmd = [fedwb, "aggregator", "--broker", broker, "--job", job, "--task", cfg.task, "--quorum", str(quorum),
           "--min-updates", "1", "--policy", cfg.policy, "--max-staleness", str(cfg.max_staleness),
           "--state-dir", state_dir, "--device", "auto" if cfg.device != "cpu" else "cpu",
           "--seed", str(cfg.seed), "--max-rounds", str(cfg.rounds)]
    if cfg.task == "mnist":
        cmd += ["--task-option", f"model={cfg.model}"]
    if cfg.task == "noop":
        cmd += ["--task-option", "shapes=[[100, 100]]"]
    if cfg.task == "cartpole":
        cmd += ["--task-option", f"preset={cfg.preset}"]
    for item in cfg.task_options:
        cmd += ["--task-option", item]
    if cfg.switch_after is not None:
        cmd += ["--switch-after", str(cfg.switch_after)]
    if cfg.dispersion_below is not None:
        cmd += ["--dispersion-below", str(cfg.dispersion_below)]
    if cfg.reg is not None:
        cmd += ["--reg", str(cfg.reg)]
    for flag, value in (("--wb-method", cfg.wb_method), ("--max-iter", cfg.max_iter),
                        ("--stop-threshold", cfg.stop_threshold), ("--solver", cfg.solver),
                        ("--clip-factor", cfg.clip_factor), ("--max-share", cfg.max_share),
                        ("--server-lr", cfg.server_lr)):
        if value is not None:
            cmd += [flag, str(value)]
    if cfg.deadline is not None:
        cmd += ["--deadline", str(cfg.deadline)]
    return cmd


def _eval_options(cfg: SimConfig) -> dict[str, Any]:
    """The evaluator builds the same model as the agents: the task's own options plus ``--task-option``s."""
    from aggregator.cli import parse_task_options

    return {**_task_eval_options(cfg), **parse_task_options(list(cfg.task_options))}


def _task_eval_options(cfg: SimConfig) -> dict[str, Any]:
    if cfg.task == "mnist":
        return {"model": cfg.model}
    if cfg.task == "cartpole":
        episodes = 2 if cfg.quick else 5
        if not (cfg.env_params or cfg.held_out_envs):
            lengths = sorted(set(cfg.pole_lengths[: cfg.agents]) | set(cfg.held_out_lengths))
            return {"eval_lengths": lengths, "eval_episodes": episodes, "preset": cfg.preset}
        trained = list(dict.fromkeys(agent_env(cfg, i) for i in range(cfg.agents)))
        return {"eval_envs": ";".join(trained + cfg.held_out_envs), "eval_lengths": list(cfg.held_out_lengths),
                "eval_episodes": episodes, "preset": cfg.preset}
    return {"shapes": [[100, 100]]} if cfg.task == "noop" else {}


class Processes:
    """The children of one run; ``stop()`` ends them all and their descendants (SIGTERM, then SIGKILL)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own session, output to ``log_dir/name.log``; ``env`` adds variables."""
        log = (self.log_dir / f"{name}.log").open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_for_child(), **(env or {})}
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs[name] = p
        return p

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the ones started here (some tools start their own sessions)."""
        found: list[psutil.Process] = []
        for p in self.procs.values():
            with contextlib.suppress(psutil.Error):
                found += psutil.Process(p.pid).children(recursive=True)
        return found

    def stop(self, grace: float = 10.0) -> None:
        below = self.descendants()
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for d in below:
            with contextlib.suppress(psutil.Error):
                d.terminate()
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        _, alive = psutil.wait_procs(below, timeout=max(0.1, deadline - time.monotonic()))
        for d in alive:
            with contextlib.suppress(psutil.Error):
                d.kill()

    def failed(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() not in (None, 0)]


async def _clear_retained(broker: str, topics: Topics) -> None:
    """A fresh job: remove retained global, control and status left by an earlier run."""
    addr = BrokerAddress.parse(broker)
    async with aiomqtt.Client(**addr.client_kwargs()) as c:
        for t in (topics.global_model, topics.control, topics.aggregator_status):
            await c.publish(t, b"", qos=1, retain=True)


def _display(cfg: SimConfig, ev: Evaluator, t0: float) -> Any:
    from rich.table import Table

    st = ev.status
    table = Table(title=f"fedwb sim  {cfg.task}  {cfg.agents} agents  policy {cfg.policy}", expand=False)
    for col in ("version", "policy", "quorum fill", "metric", "elapsed"):
        table.add_column(col)
    last = ev.evaluated[max(ev.evaluated)] if ev.evaluated else None
    key, value = headline(last["eval"]) if last else ("", None)
    table.add_row(f"{st.version if st else 0}/{cfg.rounds}",
                  (st.last_choice or st.policy.describe()) if st else "-",
                  f"{st.buffer_fill}/{st.quorum}" if st else "-",
                  f"{key}={value:.3f}" if value is not None else "-", f"{time.time() - t0:.0f}s")
    return table


async def _run(cfg: SimConfig, out: Path) -> dict[str, Any]:
    from broker import start_broker

    job = cfg.job_name
    topics = Topics(job)
    t0 = time.time()
    broker_proc = None
    if cfg.broker.startswith(("mqtt://", "mqtts://")):
        broker_url = cfg.broker
    else:
        broker_proc = start_broker(kind=cfg.broker if cfg.broker != "auto" else "auto")
        broker_url = broker_proc.url
    procs = Processes(out)
    rounds_path = out / "rounds.jsonl"
    rounds_path.write_text("")
    records: list[dict[str, Any]] = []

    def on_record(rec: dict[str, Any]) -> None:
        records.append(rec)
        with rounds_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    state_dir = tempfile.mkdtemp(prefix="fedwb-sim-state-")
    ev = Evaluator(broker_url, job, cfg.task, _eval_options(cfg), on_record, started=t0, seed=cfg.seed)
    ev_task = None
    live = None
    try:
        await _clear_retained(broker_url, topics)
        ev_task = asyncio.create_task(ev.run())
        procs.start("aggregator", _aggregator_cmd(cfg, broker_url, job, state_dir))
        for i in range(cfg.agents):
            procs.start(f"agent-{i}", _agent_cmd(cfg, broker_url, job, i))
        if cfg.live and sys.stderr.isatty():
            from rich.live import Live

            live = Live(_display(cfg, ev, t0), refresh_per_second=2, transient=False)
            live.start()
        deadline = time.monotonic() + cfg.timeout
        last_print = -1
        while len(ev.evaluated) < cfg.rounds + 1:  # versions 0..R
            if procs.failed() and "aggregator" in procs.failed():
                raise RuntimeError(f"the aggregator exited early; see {out / 'aggregator.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"simulation did not reach {cfg.rounds} versions in {cfg.timeout:.0f}s")
            ev.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.changed.wait(), 1.0)
            if live is not None:
                live.update(_display(cfg, ev, t0))
            elif ev.evaluated and max(ev.evaluated) != last_print:
                last_print = max(ev.evaluated)
                rec = ev.evaluated[last_print]
                key, value = headline(rec["eval"])
                print(f"  [{cfg.policy}] v{last_print}/{cfg.rounds} {rec['method'] or 'init'}: {key}="
                      f"{value:.3f}  ({rec['wall_seconds']:.0f}s)", file=sys.stderr, flush=True)
    finally:
        if live is not None:
            live.stop()
        procs.stop()
        ev.stop()
        if ev_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ev_task, 10)
        if broker_proc is not None:
            broker_proc.close()
        shutil.rmtree(state_dir, ignore_errors=True)  # 4-5 MB a run: a sweep would leave gigabytes
    rounds = sorted((r for r in records if r["version"] >= 1), key=lambda r: r["version"])[: cfg.rounds]
    initial = next((r for r in records if r["version"] == 0), None)
    st = ev.status
    summary = {
        "config": asdict(cfg), "job": job, "broker": broker_url, "initial": initial, "rounds": rounds,
        "totals": {"wall_seconds": round(time.time() - t0, 2), "rounds": len(rounds),
                   "final": rounds[-1]["eval"] if rounds else None,
                   "accepted": st.accepted if st else None, "rejected": st.rejected if st else None,
                   "stale": st.stale if st else None, "duplicate": st.duplicate if st else None},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if rounds:
        from sim.plots import plot_run  # matplotlib (0.4 s): imported once there is something to plot

        summary["plots"] = [str(p) for p in plot_run(rounds, out, f"{cfg.task} {cfg.policy}")]
    return summary


async def _run_until_stopped(cfg: SimConfig, out: Path) -> dict[str, Any]:
    """``_run``, cancelled by SIGTERM as by Ctrl-C: its ``finally`` stops every process it started
    (a scheduler's SIGTERM used to leave the aggregator and the agents running)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    handled = False
    if task is not None and threading.current_thread() is threading.main_thread():
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        handled = True
    try:
        return await _run(cfg, out)
    except asyncio.CancelledError:
        raise KeyboardInterrupt("SIGTERM") from None
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)


AGENT_MB = 180  # a `fedwb agent` process's own memory (USS) at least: 187 MiB measured with noop, 300 with mnist


def check_room(agents: int, available_mb: float | None = None) -> None:
    """Refuse a fleet whose agent processes cannot fit in this machine's available memory (a typo such as
    ``--agents 5000`` would start 5,000 torch processes and swap the machine to a halt)."""
    if available_mb is None:
        available_mb = psutil.virtual_memory().available / 2**20
    need = agents * AGENT_MB
    if need > available_mb:
        raise ValueError(f"--agents {agents} needs at least {need / 1024:,.1f} GiB ({AGENT_MB} MiB per agent "
                         f"process) and {available_mb / 1024:,.1f} GiB are available: use fewer agents, or "
                         "run them on several machines (docs/deploy.md)")


def run_sim(cfg: SimConfig) -> dict[str, Any]:
    """Run one simulation; results in ``cfg.out``. Ctrl-C or SIGTERM stops everything it started."""
    check_room(cfg.agents)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return run_loop(_run_until_stopped(cfg, out))
