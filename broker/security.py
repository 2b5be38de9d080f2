"""Credentials (mosquitto password file + ACL) and TLS material (a CA, server and client certs)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from broker.run import UPSTREAM_PREFIX

PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for the $7$ (PBKDF2-SHA512) format


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto 2.x password-file hash: ``$7$ITER$base64(salt)$base64(pbkdf2_sha512)``."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def job_acl(job: str, agents: list[str], prefix: str = "fedwb", site: str | None = None) -> str:
    """Mosquitto ACL lines for one job: every identity is pinned to ``prefix/job/...``.

    An agent may publish only its own update and status topic of this job and read the
    job's global model and statuses; ``aggregator-<job>`` reads the job's updates and
    control and publishes its global model and status; ``operator-<job>`` alone publishes
    control. Nothing reaches another job (no ``+`` in a job level), and since the broker
    sets client id = username (``use_username_as_clientid``), no identity can take over
    another's session. On a site broker (``site``), ``aggregator-<job>`` also sends its
    partial aggregate up and reads the center's global and confirmation, on the topics the
    bridge carries (``fedwbup/<job>/...``).
    """
    base = f"{prefix}/{job}"
    lines = [f"# job {job}"]
    for agent in agents:
        lines += [f"user {agent}", f"topic write {base}/update/{agent}", f"topic write {base}/status/agent/{agent}",
                  f"topic read {base}/global", f"topic read {base}/global/chunk/+", f"topic read {base}/status/#",
                  f"topic read {base}/ack/{agent}", ""]
    lines += [f"user aggregator-{job}", f"topic read {base}/update/+", f"topic read {base}/control",
              f"topic readwrite {base}/global", f"topic readwrite {base}/global/chunk/+",
              f"topic readwrite {base}/status/aggregator", f"topic write {base}/ack/+"]
    if site is not None:
        up = f"{UPSTREAM_PREFIX}/{job}"
        lines += [f"topic write {up}/update/{_check_name('site', site)}", f"topic read {up}/global",
                  f"topic read {up}/ack/{site}"]
    lines += ["", f"user operator-{job}", f"topic readwrite {base}/control", f"topic read {base}/status/#",
              f"topic read {base}/global", f"topic read {base}/global/chunk/+", ""]
    return "\n".join(lines) + "\n"


def _check_name(kind: str, value: str) -> str:
    if not value or any(c in value for c in "+#/\0 :\n"):
        raise ValueError(f"{kind} {value!r} cannot be a broker user / topic level (no + # / : space)")
    return value


def gen_credentials(out: Path, agents: int, prefix: str = "agent-", use_binary: bool = True,
                    job: str = "default", append: bool = False, site: str | None = None) -> dict[str, str]:
    """Passwords and the per-job ACL for N agents, ``aggregator-<job>`` and ``operator-<job>``.

    Writes ``passwd`` (mosquitto format), ``acl`` (``job_acl``), ``credentials.json`` and
    ``agents.json`` (the aggregator's ``--agents-file``: the job's agent ids, each with an
    optional ``max_num_samples``), all mode 600. ``append`` adds a job to a directory that
    already holds others (user names must not clash); ``site`` makes it a site broker's
    (see ``job_acl``). Returns the new users' passwords.
    """
    _check_name("job", job)
    out.mkdir(parents=True, exist_ok=True)
    creds_path = out / "credentials.json"
    known: dict[str, str] = json.loads(creds_path.read_text()) if append and creds_path.exists() else {}
    names = [_check_name("agent id", f"{prefix}{i}") for i in range(agents)]
    users = {name: secrets.token_urlsafe(18) for name in names}
    users[f"aggregator-{job}"] = secrets.token_urlsafe(18)
    users[f"operator-{job}"] = secrets.token_urlsafe(18)
    clash = sorted(set(users) & set(known))
    if clash:
        raise ValueError(f"user {clash[0]!r} already exists in {creds_path}; use another --prefix or job")
    passwd = out / "passwd"
    if not (append and passwd.exists()):
        passwd.write_text("")
    binary = shutil.which("mosquitto_passwd") if use_binary else None
    if binary:
        for user, pw in users.items():
            subprocess.run([binary, "-b", str(passwd), user, pw], check=True, capture_output=True)
    else:
        with passwd.open("a") as f:
            f.write("".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in users.items()))
    os.chmod(passwd, 0o600)
    acl = out / "acl"
    head = "# fedwb ACL: one block per job (fedwb broker gen-credentials)\n"
    if append and acl.exists():
        head = acl.read_text()
    acl.write_text(head + job_acl(job, names, site=site))
    os.chmod(acl, 0o600)
    creds_path.write_text(json.dumps({**known, **users}, indent=1))
    os.chmod(creds_path, 0o600)
    if not (out / "global-signing.key").exists():
        gen_signing_key(out)
    agents_path = out / (f"agents-{job}.json" if append else "agents.json")
    agents_path.write_text(json.dumps({name: {"max_num_samples": None} for name in names}, indent=1))
    os.chmod(agents_path, 0o600)
    return users


def gen_signing_key(out: Path) -> tuple[Path, Path]:
    """The global-model signing pair: ``global-signing.key`` (mode 600, the aggregator's
    ``--signing-key``) and ``global-signing.pub`` (the agents' ``--verify-key``), Ed25519 PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv, pub = out / "global-signing.key", out / "global-signing.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(priv, 0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key=None, cert=None) -> None:
    from cryptography.hazmat.primitives import serialization

    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        os.chmod(path, 0o600)
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def gen_tls(out: Path, hosts: list[str] | None = None, clients: list[str] | None = None,
            days: int = 825) -> dict[str, Path]:
    """A CA, a server certificate for ``hosts`` (default localhost, 127.0.0.1) and client certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    hosts = hosts or ["localhost", "127.0.0.1"]
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedwb CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.key", key=ca_key)
    _write(out / "ca.crt", cert=ca)

    def issue(name: str, sans: list[str], usage) -> tuple:
        key = _key()
        alt = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() else x509.DNSName(h)
               for h in sans]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    paths = {"ca": out / "ca.crt"}
    key, cert = issue(hosts[0], hosts, ExtendedKeyUsageOID.SERVER_AUTH)
    _write(out / "server.key", key=key)
    _write(out / "server.crt", cert=cert)
    paths["server"] = out / "server.crt"
    for client in clients or []:
        key, cert = issue(client, [], ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(out / f"{client}.key", key=key)
        _write(out / f"{client}.crt", cert=cert)
        paths[client] = out / f"{client}.crt"
    return paths


SECURE_FILES = {"passwd": "gen-credentials", "acl": "gen-credentials", "tls/ca.crt": "gen-tls",
                "tls/server.crt": "gen-tls", "tls/server.key": "gen-tls"}
MAKER_OUT = {"gen-credentials": ".", "gen-tls": "tls"}  # where in the --secure directory each command writes


def check_secure_dir(conf_dir: Path) -> None:
    """Raise ``ValueError`` naming every file of a ``--secure`` directory that is missing, and what makes it
    (mosquitto itself only says "Error: Unable to open..." in its own log and exits)."""
    missing = [name for name in SECURE_FILES if not (conf_dir / name).is_file()]
    if missing:
        makers = sorted({SECURE_FILES[m] for m in missing})
        made = " and ".join(f"{m} --out {conf_dir / MAKER_OUT[m]}" for m in makers)
        raise ValueError(f"--secure {conf_dir} lacks {', '.join(missing)} (make them with fedwb broker {made})")


def render_secure_config(conf_dir: Path, data_dir: Path, port: int, tls_port: int, bind: str = "127.0.0.1",
                         tls_bind: str = "0.0.0.0", user: str | None = None) -> str:
    import getpass

    text = resources.files("broker").joinpath("mosquitto-secure.conf").read_text()
    for key, value in {"@PORT@": port, "@BIND@": bind, "@TLS_PORT@": tls_port, "@TLS_BIND@": tls_bind,
                       "@CONF_DIR@": conf_dir, "@DATA_DIR@": data_dir, "@USER@": user or getpass.getuser()}.items():
        text = text.replace(key, str(value))
    return text
