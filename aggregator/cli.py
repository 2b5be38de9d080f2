"""``fedwb aggregator`` and ``fedwb policy set|show``."""

from __future__ import annotations

import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from fedwb.errors import fail
from schemas import PolicySpec
from schemas.connection import run_loop
from schemas.messages import parse_max_iter as parse_iterations

policy_app = typer.Typer(help="Show or change the fusion policy of a running job.", no_args_is_help=True)

Broker = Annotated[str, typer.Option("--broker", help="Broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT.")]
Job = Annotated[str, typer.Option("--job", help="Job name (topic fedwb/JOB/...).")]
MaxIter = Annotated[str | None, typer.Option(help="Entropic FedWB iterations (default 1000; 'paper' = the "
                                                    "authors' 10,000).")]
StopThreshold = Annotated[float | None, typer.Option(help="Entropic FedWB stopping error (default 1e-4).")]
Solver = Annotated[str | None, typer.Option(help="Entropic solver: auto | plain | plain-torch | triton | log | "
                                                 "wide (CPU, no range limit) | pot-plain (the authors' POT call, "
                                                 "dense; studies only).")]
TrimRatio = Annotated[float | None, typer.Option(help="trimmed-mean: fraction dropped at each end, per "
                                                       "coordinate (default 0.2).")]
Byzantine = Annotated[int | None, typer.Option(help="krum: attackers assumed, f (default (K-3)//2).")]
PolicyName = "fedavg | fedwb | fedwb-sinkhorn | fedwb-neurons | hybrid | median | trimmed-mean | krum"
User = Annotated[str | None, typer.Option("--username", envvar="FEDWB_USERNAME", help="Broker username.")]
Password = Annotated[str | None, typer.Option("--password", envvar="FEDWB_PASSWORD", help="Broker password.")]
TlsCa = Annotated[str | None, typer.Option("--tls-ca", envvar="FEDWB_TLS_CA", help="CA certificate (turns TLS on).")]
TlsCert = Annotated[str | None, typer.Option("--tls-cert", envvar="FEDWB_TLS_CERT", help="Client certificate.")]
TlsKey = Annotated[str | None, typer.Option("--tls-key", envvar="FEDWB_TLS_KEY", help="Client key.")]


def check_broker_url(url: str) -> None:
    """Exit 2 naming the URL unless it is mqtt://HOST[:PORT] or mqtts://HOST[:PORT]."""
    from schemas import BrokerAddress

    try:
        BrokerAddress.parse(url)
    except ValueError as exc:
        fail(f"--broker: {exc}")


def parse_task_options(items: list[str] | None) -> dict[str, Any]:
    """``["shapes=1000x1000", "noise=0.01"]`` -> ``{"shapes": "1000x1000", "noise": 0.01}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--task-option {item!r} is not KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def parse_max_iter(value: str | None) -> int | None:
    """``--max-iter``: a whole number, or ``paper`` for the authors' 10,000 iterations."""
    if value is None:
        return None
    try:
        return parse_iterations(value)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def policy_spec(name: str, switch_after: int | None, dispersion_below: float | None,
                wb_method: str | None, reg: float | None, biases: str | None = None, *,
                max_iter: str | None = None, stop_threshold: float | None = None,
                solver: str | None = None, trim_ratio: float | None = None,
                byzantine: int | None = None) -> PolicySpec:
    fields: dict[str, Any] = {"name": name, "switch_after": switch_after, "dispersion_below": dispersion_below,
                              "wb_method": wb_method, "reg": reg, "biases": biases,
                              "max_iter": parse_max_iter(max_iter), "stop_threshold": stop_threshold,
                              "solver": solver, "trim_ratio": trim_ratio, "byzantine": byzantine}
    from pydantic import ValidationError

    try:
        return PolicySpec(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(map(str, err["loc"])) or "policy"
            typer.echo(f"error: invalid policy: {where}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


def aggregator(
    broker: Annotated[str | None, typer.Option(help="Broker URL [default: mqtt://127.0.0.1:1883].")] = None,
    job: Annotated[str | None, typer.Option(help="Job name [default: default].")] = None,
    task: Annotated[str | None, typer.Option(help="Task that builds version 0: mnist, cartpole, noop.")] = None,
    task_option: Annotated[list[str] | None, typer.Option(help="Task option KEY=VALUE (repeatable).")] = None,
    init: Annotated[str | None, typer.Option(help="Version 0 from a .safetensors file instead.")] = None,
    quorum: Annotated[int | None, typer.Option(help="Fuse when this many updates are buffered.")] = None,
    min_updates: Annotated[int | None, typer.Option(help="Fewest updates fused at the deadline.")] = None,
    deadline: Annotated[float | None, typer.Option(help="Round deadline in seconds.")] = None,
    max_staleness: Annotated[int | None, typer.Option(help="Drop updates staler than this.")] = None,
    staleness_alpha: Annotated[float | None, typer.Option(help="Weight n_k (1+tau)^-alpha.")] = None,
    policy: Annotated[str | None, typer.Option(help=PolicyName)] = None,
    switch_after: Annotated[int | None, typer.Option(help="hybrid: FedWB fusions before FedAvg.")] = None,
    dispersion_below: Annotated[float | None, typer.Option(help="hybrid: switch early below this.")] = None,
    wb_method: Annotated[str | None, typer.Option(help="hybrid's FedWB phase: fedwb-sinkhorn | fedwb | "
                                                       "fedwb-neurons.")] = None,
    reg: Annotated[float | None, typer.Option(help="Entropic regularization (cost (i-j)^2).")] = None,
    max_iter: MaxIter = None, stop_threshold: StopThreshold = None, solver: Solver = None,
    trim_ratio: TrimRatio = None, byzantine: Byzantine = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    state_dir: Annotated[str | None, typer.Option(help="Checkpoint directory (resume from it).")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Stop after this global version.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    rate_limit: Annotated[float | None, typer.Option(help="Most updates per agent per minute (off).")] = None,
    max_update_norm: Annotated[float | None, typer.Option(help="Reject updates farther than this from the "
                                                                "global model (off).")] = None,
    max_share: Annotated[float | None, typer.Option(help="Most weight share of one update in a round "
                                                         "[default: 2/quorum].")] = None,
    clip_factor: Annotated[float | None, typer.Option(help="Clip update deltas at this many times the round's "
                                                           "median delta norm; 0 turns it off [default: 3].")] = None,
    server_lr: Annotated[float | None, typer.Option(help="Server learning rate: W <- W + lr (fused - W) "
                                                         "[default: 1, the fusion is the model].")] = None,
    max_num_samples: Annotated[int | None, typer.Option(help="Cap on an update's num_samples "
                                                             "[default: 10,000,000].")] = None,
    agents_file: Annotated[str | None, typer.Option(help="JSON of the job's agent ids (and per-agent "
                                                         "max_num_samples); other ids are rejected.")] = None,
    signing_key: Annotated[str | None, typer.Option(help="Ed25519 key (PEM) that signs every global model "
                                                         "(from gen-credentials).")] = None,
    upstream: Annotated[str | None, typer.Option(help="'bridge': a site aggregator; its fused model goes to the "
                                                      "center through the site broker's bridge.")] = None,
    site: Annotated[str | None, typer.Option(help="With --upstream: this site's id at the center.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of version 0.")] = None,
    chunk_mib: Annotated[float | None, typer.Option(min=0, max=255, help="Global models larger than 128 MiB travel "
                                                                         "as a manifest plus chunks of this many "
                                                                         "MiB (0: never) [default: 8].")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON or TOML file with these settings.")] = None,
    username: User = None, password: Password = None, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the aggregator: buffer updates, fuse at quorum or deadline, publish global models.

    Settings come from these options, else the --config file, else FEDWB_AGG_* variables.
    """
    from pydantic import ValidationError

    from aggregator.settings import AggregatorSettings

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = read_config(config)
    given = {
        "broker": broker, "job": job, "task": task, "init": init, "quorum": quorum,
        "min_updates": min_updates, "deadline": deadline, "max_staleness": max_staleness,
        "staleness_alpha": staleness_alpha, "device": device, "state_dir": state_dir,
        "max_rounds": max_rounds, "metrics_port": metrics_port, "seed": seed, "username": username,
        "rate_limit": rate_limit, "max_update_norm": max_update_norm, "max_share": max_share,
        "clip_factor": clip_factor, "max_num_samples": max_num_samples, "server_lr": server_lr,
        "agents_file": agents_file,
        "signing_key": signing_key, "upstream": upstream, "site": site,
        "chunk_bytes": chunk_size(chunk_mib) if chunk_mib is not None else None,
        "password": password, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key,
    }
    base.update({k: v for k, v in given.items() if v is not None})
    if task_option:
        base["task_options"] = parse_task_options(task_option)
    if not base.get("task") and not base.get("init"):
        fail("give --task (mnist, cartpole, noop) or --init MODEL.safetensors to build version 0")
    check_task(base.get("task"))
    for key in ("init", "agents_file", "signing_key"):
        if base.get(key) is not None and not Path(base[key]).is_file():
            fail(f"--{key.replace('_', '-')} {base[key]}: no such file")
    wb_opts = {"max_iter": max_iter, "stop_threshold": stop_threshold, "solver": solver, "trim_ratio": trim_ratio,
               "byzantine": byzantine}
    if policy is not None or any(v is not None for v in (switch_after, dispersion_below, wb_method, reg,
                                                         *wb_opts.values())):
        base["policy"] = policy_spec(policy or "fedavg", switch_after, dispersion_below, wb_method, reg, **wb_opts)
    if "min_updates" not in base and "quorum" in base:
        base["min_updates"] = 1
    try:
        settings = AggregatorSettings(**base)
    except ValidationError as exc:
        for err in exc.errors():
            typer.echo(f"error: {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}", err=True)
        raise typer.Exit(2) from None
    from aggregator.service import run_service  # torch and the solvers: only once the options are good

    raise typer.Exit(run_service(settings))


def chunk_size(mib: float) -> int:
    """``--chunk-mib`` in bytes (0: chunking off); a size below 1 KiB is an error."""
    size = int(mib * 1024 * 1024)
    if 0 < size < 1024:
        fail(f"--chunk-mib {mib:g} is below 1 KiB; use 0 to turn chunking off")
    return size


def read_config(path: Path | None) -> dict[str, Any]:
    """Settings from a JSON or TOML file; a missing or malformed file is one clear error line."""
    if path is None:
        return {}
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as exc:
        fail(f"--config {path}: {exc.strerror or exc}")
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        fail(f"--config {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}")
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a table of settings")
    return data


def check_task(name: str | None) -> None:
    """Exit 2 with the known task names when ``name`` is not one."""
    from edge_agent.tasks import resolve

    if name is not None:
        try:
            resolve(name)
        except ValueError as exc:
            fail(str(exc))


def broker_call(url: str, coro: Any) -> Any:
    """Run an operator's broker round trip; an unreachable broker or a bad URL is one line, exit 2."""
    import aiomqtt

    try:
        return run_loop(coro)
    except aiomqtt.MqttError as exc:
        fail(f"cannot reach the broker at {url}: {exc}")
    except (OSError, ValueError) as exc:
        fail(str(exc))


@policy_app.command("set")
def policy_set(
    name: Annotated[str, typer.Argument(help=PolicyName)],
    broker: Broker = "mqtt://127.0.0.1:1883",
    job: Job = "default",
    switch_after: Annotated[int | None, typer.Option(help="hybrid: FedWB fusions before FedAvg.")] = None,
    dispersion_below: Annotated[float | None, typer.Option(help="hybrid: switch early below this.")] = None,
    wb_method: Annotated[str | None, typer.Option(help="hybrid's FedWB phase.")] = None,
    reg: Annotated[float | None, typer.Option(help="Entropic regularization.")] = None,
    max_iter: MaxIter = None, stop_threshold: StopThreshold = None, solver: Solver = None,
    trim_ratio: TrimRatio = None, byzantine: Byzantine = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the aggregator's acknowledgment.")] = 15.0,
    username: User = None, password: Password = None, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Publish a PolicyCommand (retained) and wait for the aggregator to acknowledge it.

    Exit code 0: accepted; 1: rejected; 2: no acknowledgment within --wait seconds.
    """
    from aggregator.control import NoAggregator, send_policy

    spec = policy_spec(name, switch_after, dispersion_below, wb_method, reg, max_iter=max_iter,
                       stop_threshold=stop_threshold, solver=solver, trim_ratio=trim_ratio, byzantine=byzantine)
    check_broker_url(broker)
    try:
        ack = broker_call(broker, send_policy(broker, job, spec, wait, username=username, password=password,
                                              tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key))
    except NoAggregator as exc:
        fail(str(exc))
    if ack is None:
        typer.echo(f"no acknowledgment of {spec.describe()} for job {job} within {wait:g}s; the retained "
                   "command was cleared", err=True)
        raise typer.Exit(2)
    if not ack.accepted:
        typer.echo(f"rejected: {ack.reason}", err=True)
        raise typer.Exit(1)
    typer.echo(f"accepted: {ack.reason or spec.describe()}")


@policy_app.command("show")
def policy_show(
    broker: Broker = "mqtt://127.0.0.1:1883",
    job: Job = "default",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the retained status.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole status as JSON.")] = False,
    username: User = None, password: Password = None, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Print the aggregator's current policy and status."""
    from aggregator.control import read_status

    check_broker_url(broker)
    st = broker_call(broker, read_status(broker, job, wait, username=username, password=password,
                                         tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key))
    if st is None:
        typer.echo(f"no aggregator status for job {job} within {wait:g}s", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(st.model_dump_json(indent=1))
        return
    typer.echo(f"job {st.job}: {st.state}, version {st.version}")
    typer.echo(f"policy: {st.policy.describe()}" + (f" (pending: {st.pending_policy.describe()})"
                                                     if st.pending_policy else ""))
    typer.echo(f"last choice: {st.last_choice} ({st.last_choice_reason})")
    typer.echo(f"buffer: {st.buffer_fill}/{st.quorum}; accepted {st.accepted}, stale {st.stale}, "
               f"duplicate {st.duplicate}, rejected {st.rejected}")
    if st.fusion_failures:
        now = f"failing now: {st.last_fusion_error}" if st.last_fusion_error else "the latest fusion succeeded"
        typer.echo(f"fusion failures: {st.fusion_failures}; {now}")
    if st.last_command:
        typer.echo(f"last command: {st.last_command.command_id} accepted={st.last_command.accepted} "
                   f"{st.last_command.reason}")
