"""How to reach the broker: parsed from ``mqtt://[user:pass@]host:port`` or ``mqtts://``."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


REFUSED = (4, 5, 134, 135)  # CONNACK: bad user name or password, not authorized (MQTT 3.1.1; MQTT 5)


def credentials_refused(exc: BaseException, ever_connected: bool, address: BrokerAddress) -> str | None:
    """One line for an operator when ``exc`` is the broker refusing our credentials at CONNECT (CONNACK 4, 5,
    134, 135) before any session of this process was up, else None: a refusal after a session was up (the
    broker's passwd changed under a running fleet) and every other failure are outages, retried."""
    rc = getattr(exc, "rc", None)
    try:
        refused = int(getattr(rc, "value", rc)) in REFUSED
    except (TypeError, ValueError):
        refused = False
    if not refused or ever_connected:
        return None
    who = f"user {address.username!r}" if address.username else "an anonymous client"
    return (f"the broker at {address.host}:{address.port} refused {who} ({exc}): check the user and password "
            "(--broker mqtt://USER:PASS@..., FEDWB_USERNAME / FEDWB_PASSWORD) and the broker's passwd and acl")


def outage(exc: BaseException, ever_connected: bool, address: BrokerAddress) -> str:
    """What a failed MQTT session was, in a line: a connection that was up and is lost, or a broker this
    process has never reached (named, so a wrong host or port reads as one, not as an outage)."""
    if ever_connected:
        return f"connection lost ({exc})"
    return f"cannot reach the broker at {address.host}:{address.port} ({exc})"


class BrokerAddress(BaseModel):
    """Broker address and credentials shared by the aggregator, agents and tools."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def parse(cls, url: str, **overrides: object) -> BrokerAddress:
        """Parse ``mqtt://host:port`` (``mqtts://`` turns TLS on); overrides win."""
        if "://" not in url:
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {url!r}: "
                             "use mqtt://HOST:PORT or mqtts://HOST:PORT")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r} has an invalid port") from exc
        fields: dict[str, object] = {
            "host": parts.hostname, "port": port, "tls": tls,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = fields.get(key)
            if path is not None and not os.path.isfile(str(path)):
                raise ValueError(f"--{key.replace('_', '-')} {path}: no such file")
        if fields.get("tls_ca") or fields.get("tls_cert"):
            fields["tls"] = True
        return cls(**fields)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def client_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``aiomqtt.Client`` (credentials and TLS)."""
        kwargs: dict[str, object] = {"hostname": self.host, "port": self.port}
        if self.username is not None:
            kwargs["username"] = self.username
            kwargs["password"] = self.password
        if self.tls:
            import ssl

            try:
                ctx = ssl.create_default_context(cafile=self.tls_ca)
                if self.tls_cert:
                    ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as exc:  # a file that is not a certificate or key
                raise ValueError(f"TLS files ({self.tls_ca}, {self.tls_cert}, {self.tls_key}): {exc}") from None
            kwargs["tls_context"] = ctx
        return kwargs


def _late_socket_callback(context: dict[str, Any]) -> bool:
    """Whether an event-loop error is aiomqtt registering a socket that was closed meanwhile.

    paho asks for write interest from its own call sites; aiomqtt forwards that with
    ``call_soon_threadsafe(loop.add_writer, fd, ...)``, and a client that disconnects (or is
    cancelled) before the loop runs it leaves a callback on a closed descriptor: harmless,
    but asyncio prints its traceback.
    """
    exc = context.get("exception")
    handle = repr(context.get("handle", ""))
    return isinstance(exc, OSError) and exc.errno == errno.EBADF and ("add_writer" in handle or
                                                                       "add_reader" in handle)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` without the traceback of a late socket callback (see above)."""

    async def wrapped() -> T:
        loop = asyncio.get_running_loop()

        def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if not _late_socket_callback(context):
                lp.default_exception_handler(context)

        loop.set_exception_handler(handler)
        return await main

    return asyncio.run(wrapped())
