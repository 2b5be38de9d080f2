"""Each broker kind carries a packed ModelUpdate bit-exactly; the CLI starts one."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import aiomqtt
import torch

import schemas
from broker import BrokerProcess, free_port, wait_for_port
from fedwb import executable
from schemas import ModelUpdate, Topics


async def test_update_round_trip_through_broker(any_broker: BrokerProcess, job: str) -> None:
    topics = Topics(job)
    weights = {"w": torch.randn(1000, 1000), "b": torch.randn(1000).half(), "n": torch.tensor(7)}
    payload = schemas.pack(ModelUpdate(job=job, agent_id="a1", base_version=3, num_samples=5,
                                       weights=weights))
    async with asyncio.timeout(30):
        async with aiomqtt.Client(any_broker.host, any_broker.port, identifier=f"sub-{job}") as sub, \
                aiomqtt.Client(any_broker.host, any_broker.port, identifier=f"pub-{job}") as pub:
            await sub.subscribe(topics.updates, qos=1)
            await pub.publish(topics.update("a1"), payload, qos=1)
            async for message in sub.messages:
                assert topics.agent_of(str(message.topic)) == "a1"
                got = schemas.unpack(message.payload, ModelUpdate)
                break
    assert got.base_version == 3
    for name, t in weights.items():
        assert got.weights[name].dtype == t.dtype
        assert torch.equal(got.weights[name], t)


def test_cli_broker_accepts_connections_and_stops_on_sigint() -> None:
    port = free_port()
    fedwb = executable()
    proc = subprocess.Popen([fedwb, "broker", "--port", str(port)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, timeout=20, proc=proc)

        async def ping() -> None:
            async with asyncio.timeout(10):
                async with aiomqtt.Client("127.0.0.1", port) as c:
                    await c.publish("fedwb/ping", b"x", qos=1)

        asyncio.run(ping())
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert f"mqtt://127.0.0.1:{port}" in out
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_taken_before_the_broker_binds_it_is_retried(mosquitto_bin, monkeypatch, tmp_path) -> None:
    """free_port() can hand out a port that is taken before mosquitto binds it (another process; or, for the
    secure config, the TLS port drawn equal to the plain one): the broker is started again on fresh ports
    instead of failing the caller."""
    import socket

    from broker import run
    from broker.security import gen_credentials

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # bound, not listening: mosquitto cannot bind it, and nothing answers on it
    draws = [taken.getsockname()[1]]
    real = run.free_port
    monkeypatch.setattr(run, "free_port", lambda host="127.0.0.1": draws.pop(0) if draws else real(host))
    with taken, run.start_broker(kind="mosquitto") as b:
        assert b.port != taken.getsockname()[1]
        wait_for_port(b.host, b.port, 5)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()  # another process's listener answers on the port mosquitto cannot bind
    draws[:] = [listening.getsockname()[1]]
    with listening, run.start_broker(kind="mosquitto") as b:
        assert b.port != listening.getsockname()[1], "a foreign listener was taken for the broker"
        assert run.listens(b.proc.pid, b.port) is True
        assert run.listens(b.proc.pid, listening.getsockname()[1]) is False
    same = real()
    draws[:] = [same, same]  # the plain and the TLS port drawn equal
    conf = tmp_path / "secrets"
    gen_credentials(conf, agents=1, job="j")
    from broker.security import gen_tls

    gen_tls(conf / "tls", clients=[])
    with run.start_broker(kind="mosquitto", secure_dir=conf) as b:
        assert b.port == same and b.tls_port != same
        wait_for_port(b.host, b.tls_port, 5)
