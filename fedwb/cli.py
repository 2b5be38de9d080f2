"""The ``fedwb`` command line: one entry point, one subcommand per service or tool."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from fedwb import __version__
from fedwb.errors import fail, read_secret

if TYPE_CHECKING:
    from broker.run import Bridge

app = typer.Typer(
    name="fedwb",
    help="Asynchronous edge federation over MQTT with FedAvg and Wasserstein-barycenter fusion.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedwb {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """fedwb: edge agents publish weights over MQTT; the aggregator fuses and publishes."""


broker_app = typer.Typer(help="Run an MQTT broker, or make credentials and TLS material for one.",
                         invoke_without_command=True)
app.add_typer(broker_app, name="broker")


@broker_app.command("gen-credentials")
def gen_credentials(
    agents: Annotated[int, typer.Option(min=0, max=100_000, help="Number of agent users (agent-0 .. agent-N-1).")] = 3,
    out: Annotated[str, typer.Option(help="Directory for passwd, acl, credentials.json and agents.json.")] = "secrets",
    job: Annotated[str, typer.Option(help="The job these identities may use (the ACL pins every topic to it).")]
    = "default",
    prefix: Annotated[str, typer.Option(help="Agent user names are PREFIX0 .. PREFIX(N-1).")] = "agent-",
    append: Annotated[bool, typer.Option(help="Add this job to a directory that holds other jobs.")] = False,
    site: Annotated[str | None, typer.Option(help="For a site broker: aggregator-JOB may also send this site's "
                                                  "partial up the bridge (see gen-site-config).")] = None,
) -> None:
    """Passwords and a per-job ACL for N agents, aggregator-JOB and operator-JOB (mosquitto format)."""
    from pathlib import Path

    from broker.security import gen_credentials as gen

    try:
        users = gen(Path(out), agents, prefix=prefix, job=job, append=append, site=site)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {out}/passwd, {out}/acl, {out}/credentials.json and the agents file for job {job} "
               f"({len(users)} users: {agents} agents, aggregator-{job}, operator-{job}; mode 600)")


def _bridge(url: str, job: str, site: str, username: str | None, password_file: str | None,
            cafile: str | None) -> Bridge:
    """A site broker's bridge to the center; exit 2 naming the bad URL or password file."""
    from pathlib import Path

    from broker.run import Bridge

    password = read_secret(Path(password_file), "--bridge-password-file") if password_file else None
    bridge = Bridge(url, job, site, username, password, cafile)
    try:
        bridge.config()
    except ValueError as exc:
        fail(str(exc))
    return bridge


@broker_app.command("gen-site-config")
def gen_site_config(
    bridge_to: Annotated[str, typer.Option(help="The central broker: mqtt://HOST:PORT or mqtts://HOST:PORT.")],
    site: Annotated[str, typer.Option(help="This site's id at the center (its user name there).")],
    out: Annotated[str, typer.Option(help="The mosquitto.conf to write.")] = "site-mosquitto.conf",
    job: Annotated[str, typer.Option(help="The job whose site topics cross the bridge.")] = "default",
    bridge_username: Annotated[str | None, typer.Option(help="User at the central broker (default with a password "
                                                             "file: the site).")]
    = None,
    bridge_password_file: Annotated[str | None, typer.Option(help="File with that user's password.")] = None,
    bridge_cafile: Annotated[str | None, typer.Option(help="The center's CA, as the site broker sees it.")] = None,
    conf_dir: Annotated[str, typer.Option(help="Where the site broker finds passwd, acl and tls/ "
                                               "(gen-credentials --site, gen-tls).")] = "/mosquitto/secrets",
    data_dir: Annotated[str, typer.Option(help="Its persistence directory.")] = "/mosquitto/data",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Plain listener (the site's own network).")] = 1883,
    tls_port: Annotated[int, typer.Option(min=1, max=65535, help="TLS listener for the site's agents.")] = 8883,
    user: Annotated[str, typer.Option(help="The user mosquitto drops to.")] = "mosquitto",
    bind: Annotated[str, typer.Option(help="Address both listeners bind (the site's network).")] = "0.0.0.0",
) -> None:
    """A site broker's mosquitto.conf: authenticated like --secure, plus the bridge to the center.

    For the official mosquitto image (compose profile ``sites``) or any mosquitto 2; the same
    configuration ``fedwb broker --secure DIR --bridge-to URL --site S`` runs.
    """
    from pathlib import Path

    from broker.security import render_secure_config

    username = bridge_username or (site if bridge_password_file else None)  # a user needs a password
    bridge = _bridge(bridge_to, job, site, username, bridge_password_file, bridge_cafile)
    text = render_secure_config(Path(conf_dir), Path(data_dir), port, tls_port, bind=bind, tls_bind=bind,
                                user=user) + bridge.config()
    target = Path(out)
    target.write_text(text)
    target.chmod(0o600)  # it holds the bridge's password
    typer.echo(f"wrote {out}: site {site} of job {job}, bridged to {bridge_to}")


@broker_app.command("gen-tls")
def gen_tls(
    out: Annotated[str, typer.Option(help="Directory for ca.crt, server.crt/key and client certs.")] = "secrets/tls",
    host: Annotated[list[str] | None, typer.Option(help="Server host names/IPs (repeatable).")] = None,
    client: Annotated[list[str] | None, typer.Option(help="Client certificate names (repeatable).")] = None,
) -> None:
    """A CA, a server certificate and client certificates (the cryptography package)."""
    from pathlib import Path

    from broker.security import gen_tls as gen

    paths = gen(Path(out), host, client)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@broker_app.callback()
def broker(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 1883,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    embedded: Annotated[bool, typer.Option(help="Use the embedded amqtt broker even if "
                                                 "mosquitto is installed.")] = False,
    data_dir: Annotated[str | None, typer.Option(help="Persistence directory (mosquitto).")] = None,
    secure: Annotated[str | None, typer.Option(help="Directory from gen-credentials (+ tls/ from gen-tls): "
                                                    "authenticated, ACL, TLS listener.")] = None,
    tls_port: Annotated[int, typer.Option(min=1, max=65535, help="TLS listener port with --secure.")] = 8883,
    bridge_to: Annotated[str | None, typer.Option(help="A site broker: bridge to the central broker at this URL "
                                                       "(mosquitto's bridge; see docs/deploy.md).")] = None,
    bridge_job: Annotated[str, typer.Option(help="With --bridge-to: the job whose site topics cross.")] = "default",
    site: Annotated[str | None, typer.Option(help="With --bridge-to: this site's id at the center.")] = None,
    bridge_username: Annotated[str | None, typer.Option(help="With --bridge-to: user at the central broker.")]
    = None,
    bridge_password_file: Annotated[str | None, typer.Option(help="With --bridge-to: file with its password.")]
    = None,
    bridge_cafile: Annotated[str | None, typer.Option(help="With --bridge-to mqtts://: the center's CA.")] = None,
) -> None:
    """Start an MQTT broker: mosquitto with broker/mosquitto.conf, else the embedded one."""
    from pathlib import Path

    if ctx.invoked_subcommand is not None:
        return
    import ipaddress

    from broker import start_broker

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        fail(f"--host {host!r} is not an IP address or localhost")
    if not secure and not loopback:
        fail(f"--host {host}: the broker without --secure has no authentication and listens on loopback only; "
             "make credentials (fedwb broker gen-credentials) and pass --secure DIR for remote agents")
    kind = "embedded" if embedded else "auto"
    bridge = None
    if bridge_to is not None:
        if not site:
            fail("--bridge-to needs --site NAME (this site's id at the center)")
        bridge = _bridge(bridge_to, bridge_job, site, bridge_username, bridge_password_file, bridge_cafile)
    stop = {"sig": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        b = start_broker(port, kind="mosquitto" if (secure or bridge) else kind, host=host, quiet=True,
                         data_dir=Path(data_dir) if data_dir else None, bridge=bridge,
                         secure_dir=Path(secure) if secure else None, tls_port=tls_port if secure else None)
    except ValueError as exc:  # a bad setting, named by the message
        fail(f"the broker did not start on {host}:{port}: {exc}")
    except (RuntimeError, TimeoutError, OSError) as exc:
        fail(f"the broker did not start on {host}:{port}: {exc} (port in use? --secure files missing?)")
    typer.echo(f"fedwb broker ({b.kind}) listening on {b.url}  (Ctrl-C to stop)")
    if not secure:
        typer.echo("no authentication: for local use on this machine only (see docs/security.md)")
    sys.stdout.flush()
    try:
        while stop["sig"] is None and b.proc.poll() is None:
            try:
                b.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        code = b.proc.poll()
        b.close()
    if stop["sig"] is None and code not in (0, None):
        typer.echo(f"broker exited with code {code}", err=True)
        raise typer.Exit(1)
    typer.echo("broker stopped")


def _register_subcommands() -> None:
    """Subcommands living in their own packages (imported lazily by their modules)."""
    from fedwb import commands

    commands.register(app)


def main() -> None:
    """The entry point. An unexpected error is one line on stderr (exit 1); FEDWB_DEBUG=1 shows the traceback."""
    import os

    from fedwb.lifeline import watch_parent

    watch_parent()  # a child of `fedwb sim` (or of anything that asks): end with it, even after its SIGKILL
    _register_subcommands()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a raw traceback
        if os.environ.get("FEDWB_DEBUG"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (FEDWB_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
