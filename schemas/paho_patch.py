"""Replacing a paho method on one client, safely: the shared mechanics of ``schemas.receive`` and ``schemas.send``.

Both install their own versions of private paho-mqtt 2.x methods on one aiomqtt client's paho
client. ``patchable`` says whether that client is one we may patch (paho 2.x, every attribute the
replacement relies on present); ``override`` installs a replacement once, keeping the original as
``_fedwb_paho<name>`` for the replacement to call.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt


def patchable(client: Any, needed: Iterable[str]) -> Any | None:
    """The paho client inside aiomqtt ``client`` when it is paho 2.x and has every attribute in ``needed``."""
    paho_client = getattr(client, "_client", None)
    if paho_client is None or str(getattr(paho.mqtt, "__version__", "0")).split(".")[0] != "2":
        return None
    return paho_client if all(hasattr(paho_client, n) for n in needed) else None


def override(paho_client: Any, name: str, fn: Callable) -> None:
    """Make ``fn`` this client's method ``name`` (once); the original stays callable as ``_fedwb_paho<name>``."""
    original = f"_fedwb_paho{name}"
    if not hasattr(paho_client, original):
        setattr(paho_client, original, getattr(paho_client, name))
        setattr(paho_client, name, types.MethodType(fn, paho_client))
