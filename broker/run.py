"""Start and stop an MQTT broker process: mosquitto with the project's config, or amqtt."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fedwb.lifeline import ends_with_us, env_for_child

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


PORT_TRIES = 3  # broker starts on ports we picked ourselves, before giving up (start_broker)


class BrokerExited(RuntimeError):
    """The broker process exited before it listened (a bad config, or its port taken meanwhile)."""


def wait_for_port(host: str, port: int, timeout: float = 15.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections (with ``proc``: until ``proc`` itself listens
    there, where Linux's /proc tells, so another process on the port is never taken for it); raise on
    timeout or process exit."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BrokerExited(f"broker exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
            if proc is None or listens(proc.pid, port) is not False:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.05)


def listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` or one of its descendants (``fedwb broker`` runs mosquitto as its child)
    holds a listening TCP socket on ``port``, from Linux's /proc (their socket inodes against the
    listening sockets of /proc/net/tcp and tcp6); None where /proc cannot tell (no such tables, or
    the process's descriptors are not ours to read)."""
    if not os.path.exists("/proc/net/tcp"):
        return None
    inodes: set[str] = set()
    for p in _process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except FileNotFoundError:
            continue  # gone meanwhile
        except OSError:
            return None
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{p}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if (len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port
                        and cols[9] in inodes):
                    return True
    return False


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
                children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def render_config(port: int, data_dir: Path, bind: str = "127.0.0.1",
                  template: str | None = None) -> str:
    """The project's mosquitto.conf with port, bind address and data dir filled in."""
    text = template or resources.files("broker").joinpath("mosquitto.conf").read_text()
    import getpass

    return (text.replace("@PORT@", str(port)).replace("@BIND@", bind)
            .replace("@DATA_DIR@", str(data_dir)).replace("@USER@", getpass.getuser()))


@dataclass
class BrokerProcess:
    """A running broker; ``stop()`` (or the context manager) ends it."""

    kind: str
    host: str
    port: int
    proc: subprocess.Popen
    data_dir: Path
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    secure_dir: Path | None = None
    tls_port: int | None = None
    bridge: Bridge | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout: float = 15.0) -> None:
        """Stop and start again on the same port with the same data (persistence)."""
        self.stop()
        fresh = start_broker(self.port, kind=self.kind, host=self.host, data_dir=self.data_dir,
                             secure_dir=self.secure_dir, tls_port=self.tls_port, bridge=self.bridge)
        self.proc = fresh.proc

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A site's topics that the bridge carries to and from the central broker; the same value as
# schemas.topics.UPSTREAM_PREFIX (broker/ imports nothing of ours; tests/test_sites.py checks they agree).
UPSTREAM_PREFIX = "fedwbup"


@dataclass(frozen=True)
class Bridge:
    """A site broker's bridge to the central one (mosquitto's own bridge, not our code).

    On the site broker ``fedwbup/J/update/<site>`` (the site aggregator's partial aggregate)
    goes out as the center's ``fedwb/J/update/<site>``, and the center's ``fedwb/J/global``
    and ``fedwb/J/ack/<site>`` (its confirmation of the partial) come in under ``fedwbup/``:
    the site's agents and the site aggregator keep the plain ``fedwb/J/...`` topics, and
    nothing else crosses. QoS 1, a persistent bridge session (``cleansession false``), so
    the site's queue survives an outage of either side.
    """

    central: str  # mqtt[s]://HOST:PORT of the central broker
    job: str
    site: str
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    prefix: str = "fedwb"

    def config(self) -> str:
        from urllib.parse import urlsplit

        url = urlsplit(self.central if "://" in self.central else "mqtt://" + self.central)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError(f"--bridge-to {self.central!r}: use mqtt://HOST:PORT or mqtts://HOST:PORT")
        port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        lines = [f"connection fedwb-{self.job}-{self.site}", f"address {url.hostname}:{port}",
                 f"remote_clientid {self.username or f'fedwb-bridge-{self.job}-{self.site}'}",
                 "cleansession false", "bridge_protocol_version mqttv311", "try_private false",
                 "restart_timeout 1 10", "keepalive_interval 30",
                 f"topic {self.job}/update/{self.site} out 1 {UPSTREAM_PREFIX}/ {self.prefix}/",
                 f"topic {self.job}/global in 1 {UPSTREAM_PREFIX}/ {self.prefix}/",
                 f"topic {self.job}/ack/{self.site} in 1 {UPSTREAM_PREFIX}/ {self.prefix}/"]
        if self.username:
            lines += [f"remote_username {self.username}", f"remote_password {self.password or ''}"]
        if url.scheme == "mqtts" or self.cafile:
            lines += [f"bridge_cafile {self.cafile}"] if self.cafile else ["bridge_capath /etc/ssl/certs"]
        return "\n# Bridge to the central broker (fedwb broker --bridge-to)\n" + "\n".join(lines) + "\n"


def start_broker(port: int | None = None, *, kind: str = "auto", host: str = "127.0.0.1",
                 data_dir: Path | None = None, quiet: bool = True,
                 timeout: float = 15.0, secure_dir: Path | None = None,
                 tls_port: int | None = None, bridge: Bridge | None = None) -> BrokerProcess:
    """Start mosquitto (``kind='mosquitto'``), amqtt (``'embedded'``) or whichever exists.

    Ports left to us are free when picked but may be taken before the broker binds them (another
    process, or the TLS port drawn equal to the plain one): a broker that exits before listening
    on such ports is started again on fresh ones, up to ``PORT_TRIES`` times."""
    tries = 1 if port is not None and (secure_dir is None or tls_port is not None) else PORT_TRIES
    for _ in range(tries - 1):
        with contextlib.suppress(BrokerExited):
            return _start_broker(port, kind, host, data_dir, quiet, timeout, secure_dir, tls_port, bridge)
    return _start_broker(port, kind, host, data_dir, quiet, timeout, secure_dir, tls_port, bridge)


def _start_broker(port: int | None, kind: str, host: str, data_dir: Path | None, quiet: bool, timeout: float,
                  secure_dir: Path | None, tls_port: int | None, bridge: Bridge | None) -> BrokerProcess:
    port = port or free_port(host)
    mosquitto = find_mosquitto()
    if kind == "auto":
        kind = "mosquitto" if mosquitto else "embedded"
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedwb-broker-")
        data_dir = Path(tmp.name)
    data_dir.mkdir(parents=True, exist_ok=True)
    out = subprocess.DEVNULL if quiet else None
    if kind == "mosquitto":
        if mosquitto is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        conf = data_dir / "mosquitto.conf"
        if secure_dir is not None:
            from broker.security import check_secure_dir, render_secure_config

            check_secure_dir(Path(secure_dir).resolve())
            while tls_port is None or tls_port == port:
                tls_port = free_port(host)
            conf.write_text(render_secure_config(Path(secure_dir).resolve(), data_dir, port,
                                                 tls_port, bind=host, tls_bind=host))
        else:
            conf.write_text(render_config(port, data_dir, bind=host))
        if bridge is not None:
            conf.write_text(conf.read_text() + bridge.config())
        cmd = [mosquitto, "-c", str(conf)]
    elif kind == "embedded":
        if bridge is not None:
            raise ValueError("a bridge needs mosquitto (the embedded broker has none)")
        cmd = [sys.executable, "-m", "broker.embedded", "--host", host, "--port", str(port)]
    else:
        raise ValueError(f"unknown broker kind {kind!r}: use auto, mosquitto or embedded")
    # the broker ends with this process even after a SIGKILL (fedwb.lifeline): the embedded one watches
    # its parent, mosquitto gets the kernel's parent-death signal
    env = {**os.environ, **env_for_child()} if kind == "embedded" else None
    cmd = ends_with_us(cmd) if kind == "mosquitto" else cmd
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True, env=env)
    try:
        wait_for_port(host, port, timeout, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        if tmp is not None:
            tmp.cleanup()
        raise
    return BrokerProcess(kind, host, port, proc, data_dir, tmp, secure_dir, tls_port, bridge)
