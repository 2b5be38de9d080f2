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

PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for the $7$ (PBKDF2-SHA512) format


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto 2.x password-file hash: ``$7$ITER$base64(salt)$base64(pbkdf2_sha512)``."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def gen_credentials(out: Path, agents: int, prefix: str = "agent-", use_binary: bool = True) -> dict[str, str]:
    """Write ``passwd``, ``acl`` and ``credentials.json`` (mode 600) for N agents, aggregator, operator."""
    out.mkdir(parents=True, exist_ok=True)
    users = {f"{prefix}{i}": secrets.token_urlsafe(18) for i in range(agents)}
    users["aggregator"] = secrets.token_urlsafe(18)
    users["operator"] = secrets.token_urlsafe(18)
    passwd = out / "passwd"
    binary = shutil.which("mosquitto_passwd") if use_binary else None
    if binary:
        passwd.write_text("")
        for user, pw in users.items():
            subprocess.run([binary, "-b", str(passwd), user, pw], check=True, capture_output=True)
    else:
        passwd.write_text("".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in users.items()))
    os.chmod(passwd, 0o600)
    (out / "acl").write_text(resources.files("broker").joinpath("fedwb.acl").read_text())
    creds = out / "credentials.json"
    creds.write_text(json.dumps(users, indent=1))
    os.chmod(creds, 0o600)
    return users


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


def render_secure_config(conf_dir: Path, data_dir: Path, port: int, tls_port: int, bind: str = "127.0.0.1",
                         tls_bind: str = "0.0.0.0") -> str:
    import getpass

    text = resources.files("broker").joinpath("mosquitto-secure.conf").read_text()
    for key, value in {"@PORT@": port, "@BIND@": bind, "@TLS_PORT@": tls_port, "@TLS_BIND@": tls_bind,
                       "@CONF_DIR@": conf_dir, "@DATA_DIR@": data_dir, "@USER@": getpass.getuser()}.items():
        text = text.replace(key, str(value))
    return text
