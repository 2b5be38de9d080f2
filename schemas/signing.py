"""Signed global models: the aggregator signs, agents verify (Ed25519, the ``cryptography`` package).

On a broker where anyone may publish the global topic (the no-auth local broker, or a
misconfigured ACL), a signature is what lets an agent refuse a forged global model. The
signature covers ``job``, ``version``, ``method`` and every tensor's name, dtype, shape and
bytes (SHA-256 over them in name order), and travels hex-encoded in ``GlobalModel.signature``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from schemas.codec import encode_tensor
from schemas.messages import GlobalModel


def digest(msg: GlobalModel) -> bytes:
    """SHA-256 of what the signature covers."""
    h = hashlib.sha256(f"fedwb-global\n{msg.job}\n{msg.version}\n{msg.method}\n".encode())
    for name in sorted(msg.weights):
        enc = encode_tensor(msg.weights[name], name)
        h.update(f"{name}\n{enc['dtype']}\n{enc['shape']}\n".encode())
        h.update(enc["data"])
    return h.digest()


def load_private_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"signing key {path}: not a PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"verify key {path}: not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def sign(msg: GlobalModel, private_key: Any) -> GlobalModel:
    """``msg`` with its signature set."""
    return msg.model_copy(update={"signature": private_key.sign(digest(msg)).hex()})


def verify(msg: GlobalModel, public_key: Any) -> bool:
    """Whether ``msg`` carries a valid signature by ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(bytes.fromhex(msg.signature), digest(msg))
    except (InvalidSignature, ValueError):
        return False
    return True
